"""Import labelled cardiac data into the raw dataset layout.

* :func:`convert_mmwhs` — the MM-WHS 2017 release (``ct_train_1001_image.nii.gz`` /
  ``ct_train_1001_label.nii.gz``, ``mr_train_...``, test images ``ct_test_2001_image.nii.gz``).
* :func:`import_dataset` — any folder of paired image/label files with code-mapped labels, paired by
  the text that the wildcards of two glob patterns match (``image_*.nii.gz`` ↔ ``label_*.nii.gz``).

Original label codes (e.g. 205/500/600) become consecutive training labels; ``dataset.json`` keeps
the map back in ``label_codes``. Images are copied byte for byte when they already are NIfTI, so
their geometry (including oblique, mixed direction matrices) is exactly what it was; label maps are
rewritten on the source file's own NIfTI header for the same reason. Inputs are only read.
"""
from __future__ import annotations

import gzip
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS
from heartcascade.dataset.image_io import Geometry, image_array, label_array, read_image, write_array, write_image
from heartcascade.dataset.writer import DatasetWriter, copy_nifti
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError
from heartcascade.utils.progress import progress_bar

MMWHS_NAMES = [name for name in MMWHS_LABELS if name != "background"]
MMWHS_CODE_TO_LABEL = {code: label for label, code in MMWHS_CODES.items()}
# Known slip in some MM-WHS label maps: a few LA voxels carry 421 instead of 420.
MMWHS_STRAY = {421: MMWHS_LABELS["LA"]}
MODALITY_NAMES = {"ct": "CT", "mr": "MR"}


def warn(message: str) -> None:
    """One-line warning on stderr that does not break a running progress bar."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# Label codes
# ---------------------------------------------------------------------------------------------------

def remap_labels(array: np.ndarray, code_to_label: dict[int, int], path: str | os.PathLike,
                 stray: dict[int, int] | None = None, unknown_to_background: bool = False,
                 warn_fn: Callable[[str], None] = warn) -> np.ndarray:
    """Map original codes to training labels (uint8). 0 stays background.

    ``stray`` codes are known slips mapped with a warning; any other value not in ``code_to_label``
    is a one-line error naming the file and the values, unless ``unknown_to_background``.
    """
    stray = stray or {}
    small_ints = array.dtype.kind in "iu" and array.size > 0 and int(array.min()) >= 0 and int(array.max()) < (1 << 20)
    if small_ints:  # bincount/LUT: ~10x faster than unique/searchsorted on a 512x512x200 map
        hist = np.bincount(array.ravel())
        values = np.nonzero(hist)[0]
        counts = hist[values]
    else:
        values, counts = np.unique(array, return_counts=True)
    known = set(code_to_label) | {0}
    unknown = [(int(v), int(c)) for v, c in zip(values, counts) if int(v) not in known and int(v) not in stray]
    if unknown and not unknown_to_background:
        shown = ", ".join(f"{v} ({c} voxels)" for v, c in unknown[:8])
        expected = ", ".join(str(c) for c in sorted(code_to_label))
        raise HCError(f"{path}: unknown label values {shown}; expected 0, {expected} "
                      f"(use --unknown-to-background to map them to 0)")
    mapping = {int(c): int(l) for c, l in code_to_label.items()}
    for v, c in zip(values, counts):
        if int(v) in stray:
            warn_fn(f"{path}: {int(c)} voxels with value {int(v)} mapped to "
                    f"{_label_name(stray[int(v)])} (known labelling slip)")
            mapping[int(v)] = int(stray[int(v)])
    if unknown:
        warn_fn(f"{path}: unknown values {', '.join(str(v) for v, _ in unknown[:8])} "
                f"({sum(c for _, c in unknown)} voxels) mapped to background")
    if small_ints:
        lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
        for code, label in mapping.items():
            if code < lut.size:
                lut[code] = label
        return lut[array]
    src = np.array(sorted(mapping), dtype=np.int64)
    dst = np.array([mapping[c] for c in sorted(mapping)], dtype=np.uint8)
    flat = array.astype(np.int64, copy=False)
    pos = np.clip(np.searchsorted(src, flat), 0, len(src) - 1)
    return np.where(src[pos] == flat, dst[pos], 0).astype(np.uint8)


def _label_name(label: int) -> str:
    return {v: k for k, v in MMWHS_LABELS.items()}.get(label, str(label))


def parse_codes(text: str) -> dict[int, str]:
    """``"200:Myo,500:LV,600:RV"`` → ``{200: "Myo", 500: "LV", 600: "RV"}`` (known names canonicalised)."""
    codes: dict[int, str] = {}
    canonical = {name.lower(): name for name in MMWHS_NAMES}
    for item in [part.strip() for part in str(text).split(",") if part.strip()]:
        code_text, sep, name = item.partition(":")
        name = name.strip()
        try:
            code = int(code_text.strip())
        except ValueError:
            code = -1
        if not sep or code < 0 or not name:
            raise HCError(f"--codes: bad entry {item!r}; expected CODE:NAME, e.g. 500:LV")
        if code == 0:
            raise HCError("--codes: code 0 is background and cannot be mapped to a structure")
        if code in codes:
            raise HCError(f"--codes: code {code} given twice")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", name) or name.lower() == "background":
            raise HCError(f"--codes: bad structure name {name!r}")
        codes[code] = canonical.get(name.lower(), name)
    if not codes:
        raise HCError("--codes: no CODE:NAME entries given")
    return codes


def plan_labels(codes: dict[int, str]) -> tuple[dict[str, int], dict[int, int], dict[int, int]]:
    """Training labels for named codes: MM-WHS names first in their canonical order, then the rest.

    Returns ``labels`` (name → label, with background 0), ``code_to_label`` and ``label_codes``
    (label → its first original code).
    """
    names = list(dict.fromkeys(codes.values()))
    ordered = [n for n in MMWHS_NAMES if n in names] + [n for n in names if n not in MMWHS_NAMES]
    labels = {"background": 0, **{name: i + 1 for i, name in enumerate(ordered)}}
    code_to_label = {code: labels[name] for code, name in codes.items()}
    label_codes: dict[int, int] = {}
    for code, name in codes.items():
        label_codes.setdefault(labels[name], code)
    return labels, code_to_label, dict(sorted(label_codes.items()))


# ---------------------------------------------------------------------------------------------------
# Writing with exact geometry
# ---------------------------------------------------------------------------------------------------

def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def check_image(path: Path) -> sitk.Image:
    """Read an image, rejecting non-3D, vector and NaN/Inf images with one-line errors."""
    image = read_image(path)
    image_array(image, path)  # read_image already refused NaN/Inf (raw NIfTI scan included)
    return image


def write_image_exact(source: Path, image: sitk.Image, dest: Path) -> None:
    """NIfTI sources are copied byte for byte (exact geometry); others go through SimpleITK."""
    if is_nifti(source) and source.is_file():
        copy_nifti(source, dest)
    else:
        write_image(image, dest)


def _nifti_bytes_like(source: Path, array: np.ndarray) -> bytes | None:
    """The source NIfTI-1 file with its voxel data replaced by ``array`` (uint8); None if not possible."""
    raw = source.read_bytes()
    if source.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    if len(raw) < 352:
        return None
    endian = next((e for e in "<>" if struct.unpack(e + "i", raw[:4])[0] == 348), None)
    if endian is None or raw[344:348] != b"n+1\x00":
        return None
    dims = struct.unpack(endian + "8h", raw[40:56])
    if dims[0] != 3 or (dims[1], dims[2], dims[3]) != tuple(array.shape[::-1]):
        return None
    vox_offset = int(struct.unpack(endian + "f", raw[108:112])[0])
    if vox_offset < 348 or vox_offset > len(raw):
        return None
    header = bytearray(raw[:vox_offset])
    struct.pack_into(endian + "h", header, 70, 2)        # datatype DT_UINT8
    struct.pack_into(endian + "h", header, 72, 8)        # bitpix
    struct.pack_into(endian + "f", header, 112, 1.0)     # scl_slope
    struct.pack_into(endian + "f", header, 116, 0.0)     # scl_inter
    struct.pack_into(endian + "f", header, 124, float(array.max(initial=0)))  # cal_max
    struct.pack_into(endian + "f", header, 128, 0.0)     # cal_min
    return bytes(header) + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_label_like(array: np.ndarray, source: Path, source_image: sitk.Image, dest: Path) -> None:
    """Write a remapped label map with exactly the geometry SimpleITK reads from ``source``.

    SimpleITK's NIfTI writer re-derives the header from the (double) direction, which reads back
    ~1e-8 off for oblique scans; rewriting the data on the source's own header avoids that. The
    result is read back and compared; any doubt falls back to a plain SimpleITK write.
    """
    geometry = Geometry.of(source_image)
    data = _nifti_bytes_like(source, array) if is_nifti(source) else None
    if data is not None:
        with atomic_path(dest) as tmp:
            with gzip.open(tmp, "wb", compresslevel=6) as out:
                out.write(data)
            try:
                back = sitk.ReadImage(str(tmp))
                ok = Geometry.of(back) == geometry and np.array_equal(sitk.GetArrayViewFromImage(back), array)
            except RuntimeError:
                ok = False
            if ok:
                return
    write_array(array.astype(np.uint8), geometry, dest)


def _check_pair_geometry(image_path: Path, image: sitk.Image, label_path: Path, label: sitk.Image) -> None:
    problem = Geometry.of(image).mismatch(Geometry.of(label))
    if problem:
        raise HCError(f"{label_path}: geometry differs from its image {image_path.name}: {problem}")


@dataclass
class _Pair:
    case_id: str
    image: Path
    label: Path | None


def _import_pairs(out: DatasetWriter, pairs: Iterable[_Pair], code_to_label: dict[int, int], test: bool,
                  stray: dict[int, int] | None, unknown_to_background: bool, desc: str) -> int:
    pairs = list(pairs)
    for pair in progress_bar(pairs, enabled=bool(pairs), desc=desc, unit="case"):
        image = check_image(pair.image)
        if pair.label is not None:
            label_image = read_image(pair.label)
            _check_pair_geometry(pair.image, image, pair.label, label_image)
            label = remap_labels(label_array(label_image, pair.label), code_to_label, pair.label, stray,
                                 unknown_to_background)
            write_label_like(label, pair.label, label_image, out.label_path(pair.case_id, test))
        write_image_exact(pair.image, image, out.image_path(pair.case_id, 0, test))
    return len(pairs)


# ---------------------------------------------------------------------------------------------------
# MM-WHS 2017
# ---------------------------------------------------------------------------------------------------

MMWHS_FILE = re.compile(r"^(ct|mr)_(train|test)_(\d+)_(image|label)\.nii(\.gz)?$", re.IGNORECASE)


def scan_mmwhs(folder: Path, modality: str | None = None) -> tuple[str, list[_Pair], list[_Pair]]:
    """Training pairs and test images of one modality in an MM-WHS release folder (searched recursively)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HCError(f"{folder}: no such folder")
    found: dict[tuple[str, str, str, str], Path] = {}
    for path in sorted(folder.rglob("*")):
        match = MMWHS_FILE.match(path.name)
        if not match or not path.is_file():
            continue
        key = (match.group(1).lower(), match.group(2).lower(), match.group(3), match.group(4).lower())
        if key in found:
            raise HCError(f"{path}: duplicate of {found[key]}")
        found[key] = path
    modalities = sorted({k[0] for k in found})
    if not modalities:
        raise HCError(f"{folder}: no MM-WHS files found (expected e.g. ct_train_1001_image.nii.gz and "
                      f"ct_train_1001_label.nii.gz)")
    if modality is None:
        if len(modalities) > 1:
            raise HCError(f"{folder}: holds both CT and MR files; choose one with --modality ct|mr")
        modality = modalities[0]
    if modality not in modalities:
        raise HCError(f"{folder}: no {modality.upper()} files (found {', '.join(m.upper() for m in modalities)})")
    train, test = [], []
    for split, out in (("train", train), ("test", test)):
        numbers = sorted({k[2] for k in found if k[0] == modality and k[1] == split}, key=int)
        for number in numbers:
            image = found.get((modality, split, number, "image"))
            label = found.get((modality, split, number, "label"))
            if image is None:
                raise HCError(f"{label}: label map without its image {modality}_{split}_{number}_image.nii.gz")
            if label is None and split == "train":
                raise HCError(f"{image}: training image without its label {modality}_{split}_{number}_label.nii.gz")
            out.append(_Pair(f"{modality}_{number}", image, label))
    if not train:
        raise HCError(f"{folder}: no {modality.upper()} training cases ({modality}_train_NNNN_image/label)")
    return modality, train, test


def convert_mmwhs(input_dir: str | os.PathLike, dataset_id: int, modality: str | None = None,
                  unknown_to_background: bool = False, overwrite: bool = False, name: str | None = None) -> Path:
    """Convert an MM-WHS 2017 folder into raw dataset ``dataset_id``; returns the dataset folder."""
    input_dir = Path(input_dir)
    if modality is not None and modality not in MODALITY_NAMES:
        raise HCError(f"modality must be ct or mr, got {modality!r}")
    modality, train, test = scan_mmwhs(input_dir, modality)
    name = name or f"MMWHS{modality.upper()}"
    with DatasetWriter(dataset_id, name, overwrite, protect=[input_dir]) as out:
        _import_pairs(out, train, MMWHS_CODE_TO_LABEL, False, MMWHS_STRAY, unknown_to_background, "training cases")
        _import_pairs(out, test, MMWHS_CODE_TO_LABEL, True, MMWHS_STRAY, unknown_to_background, "test cases")
        return out.commit({"0": MODALITY_NAMES[modality]}, MMWHS_LABELS, MMWHS_CODES,
                          {"description": f"MM-WHS 2017 {modality.upper()} converted by heartcascade",
                           "source": str(input_dir.resolve())})


# ---------------------------------------------------------------------------------------------------
# Generic paired folders
# ---------------------------------------------------------------------------------------------------

def glob_regex(pattern: str) -> re.Pattern:
    """Regex matching what ``pattern`` matches, with one group per wildcard (``*``, ``**``, ``?``, ``[..]``)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append("(.*)")
            i += 2
        elif c == "*":
            out.append("([^/]*)")
            i += 1
        elif c == "?":
            out.append("([^/])")
            i += 1
        elif c == "[" and pattern.find("]", i + 2) > 0:
            end = pattern.find("]", i + 2)
            body = pattern[i + 1:end]
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"([{body}])")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _matches(folder: Path, pattern: str) -> dict[tuple[str, ...], Path]:
    if not re.search(r"[*?\[]", pattern):
        raise HCError(f"pattern {pattern!r} has no wildcard; use e.g. 'image_*.nii.gz'")
    if Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise HCError(f"pattern {pattern!r} must be relative to the input folder")
    regex = glob_regex(pattern)
    out: dict[tuple[str, ...], Path] = {}
    for path in sorted(folder.glob(pattern)):
        if path.name.startswith(".") or not (path.is_file() or path.is_dir()):
            continue
        match = regex.match(path.relative_to(folder).as_posix())
        if match:
            out[match.groups()] = path
    return out


def _case_key(groups: tuple[str, ...]) -> str:
    parts = [g.zfill(3) if g.isdigit() else re.sub(r"[^A-Za-z0-9-]+", "_", g).strip("_") for g in groups]
    return "_".join(p for p in parts if p) or "case"


def pair_files(folder: Path, images: str, labels: str, prefix: str) -> tuple[list[_Pair], list[_Pair]]:
    """(labelled pairs, unlabelled images) matched by the text of the wildcards."""
    image_files = _matches(folder, images)
    if not image_files:
        raise HCError(f"{folder}: no files match --images {images!r}")
    label_files = _matches(folder, labels)
    if not label_files:
        raise HCError(f"{folder}: no files match --labels {labels!r}")
    orphans = sorted(set(label_files) - set(image_files))
    if orphans:
        shown = ", ".join(label_files[k].name for k in orphans[:5])
        raise HCError(f"{folder}: {len(orphans)} label file(s) without a matching image: {shown}"
                      f"{' ...' if len(orphans) > 5 else ''}")
    pairs, unlabelled, ids = [], [], {}
    for groups, image in sorted(image_files.items(), key=lambda kv: _case_key(kv[0])):
        case_id = f"{prefix}_{_case_key(groups)}"
        if case_id in ids:
            raise HCError(f"{image}: case id {case_id} clashes with {ids[case_id]}")
        ids[case_id] = image
        (pairs if groups in label_files else unlabelled).append(_Pair(case_id, image, label_files.get(groups)))
    return pairs, unlabelled


def guess_modality(image: sitk.Image) -> str:
    """CT images hold air near -1000 HU; MR intensities are non-negative."""
    array = sitk.GetArrayViewFromImage(image)
    return "ct" if float(np.percentile(array[::4, ::4, ::4], 1)) < -500 else "mr"


def import_dataset(input_dir: str | os.PathLike, dataset_id: int, images: str, labels: str, codes: str | dict[int, str],
                   modality: str | None = None, name: str | None = None, overwrite: bool = False,
                   unknown_to_background: bool = False) -> Path:
    """Import a folder of image/label pairs with code-mapped labels; returns the dataset folder."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise HCError(f"{input_dir}: no such folder")
    if modality is not None and modality not in MODALITY_NAMES:
        raise HCError(f"modality must be ct or mr, got {modality!r}")
    code_names = parse_codes(codes) if isinstance(codes, str) else dict(codes)
    label_map, code_to_label, label_codes = plan_labels(code_names)
    name = name or (re.sub(r"[^A-Za-z0-9_-]+", "", input_dir.resolve().name) or "Imported")
    prefix = re.sub(r"[^A-Za-z0-9_-]+", "", name) or "case"
    pairs, unlabelled = pair_files(input_dir, images, labels, prefix)
    if not pairs:
        raise HCError(f"{input_dir}: no image has a matching label (check --images/--labels)")
    if unlabelled:
        warn(f"{len(unlabelled)} image(s) without a label go to imagesTs, e.g. {unlabelled[0].image.name}")
    if modality is None:
        modality = guess_modality(check_image(pairs[0].image))
        warn(f"modality guessed as {modality.upper()} from the intensities of {pairs[0].image.name} (set --modality)")
    with DatasetWriter(dataset_id, name, overwrite, protect=[input_dir]) as out:
        _import_pairs(out, pairs, code_to_label, False, None, unknown_to_background, "training cases")
        _import_pairs(out, unlabelled, code_to_label, True, None, unknown_to_background, "test cases")
        return out.commit({"0": MODALITY_NAMES[modality]}, label_map, label_codes,
                          {"description": f"imported by heartcascade from {input_dir.name}",
                           "source": str(input_dir.resolve())})

