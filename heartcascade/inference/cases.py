"""Finding the cases to predict in what the user passed as input.

Accepted inputs:

* a folder of image files named the nnU-Net way, ``CASE_0000.nii.gz`` .. ``CASE_000C.nii.gz`` (one
  file per channel);
* a folder of plain image files (``scan.nii.gz``, ``patient7.mha``): each file is a single-channel case;
* a single image file;
* a folder holding one DICOM series, or a folder whose sub-folders each hold one DICOM series;
* a case list (cohort runs): a ``.txt`` file with one image path (file or DICOM series folder) per
  line, or a ``.csv`` file whose header names the image column(s) (``image``, or ``image_0000``,
  ``image_0001`` ... one per channel, in header order) and optionally the case id (``case`` or
  ``case_id``; default: the first image's name). Relative paths are relative to the list's folder;
  blank lines and lines starting with ``#`` are ignored. A listed file that is missing fails its case
  alone.

Discovery never reads voxel data; a case whose files are incomplete (a missing channel) or ambiguous
(two files for the same output name) is returned with ``error`` set so that the caller can report it
as failed and go on with the others.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import SimpleITK as sitk

from heartcascade.dataset.image_io import IMAGE_ENDINGS, is_image_file, strip_image_ending
from heartcascade.utils.errors import HCError

_CHANNEL_RE = re.compile(r"^(.+)_(\d{4})$")
#: Output ending per input ending; formats that need a second file (.mhd/.raw, .nhdr/.raw) and DICOM
#: are written as a single self-contained file instead.
_OUTPUT_ENDING = {".nii.gz": ".nii.gz", ".nii": ".nii", ".nrrd": ".nrrd", ".seg.nrrd": ".nrrd", ".nhdr": ".nrrd", ".mha": ".mha",
                  ".mhd": ".mha", ".dcm": ".nii.gz"}
DEFAULT_OUTPUT_ENDING = ".nii.gz"


@dataclass
class InputCase:
    """One case to predict.

    Attributes:
        case_id: output file name without ending.
        files: one path per channel (a DICOM series folder counts as one file).
        output_ending: ending of the prediction file (follows the input's format).
        error: set when discovery already knows the case cannot be predicted.
    """

    case_id: str
    files: list[Path]
    output_ending: str = DEFAULT_OUTPUT_ENDING
    error: str | None = None

    def output_path(self, output_dir: str | Path) -> Path:
        return Path(output_dir) / f"{self.case_id}{self.output_ending}"


def image_ending(name: str) -> str | None:
    lower = name.lower()
    for ending in IMAGE_ENDINGS:
        if lower.endswith(ending):
            return ending
    return None


def output_ending_for(path: Path) -> str:
    if path.is_dir():
        return DEFAULT_OUTPUT_ENDING
    return _OUTPUT_ENDING.get(image_ending(path.name) or "", DEFAULT_OUTPUT_ENDING)


def _is_dicom_series_folder(folder: Path) -> bool:
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError:
        return False


def discover_cases(input_path: str | Path, num_channels: int = 1,
                   output_dir: str | Path | None = None, output_ending: str | None = None) -> list[InputCase]:
    """The cases under ``input_path``, sorted by case id (the order sharding relies on).

    With ``output_dir`` given, label maps this command wrote there earlier are not taken for inputs
    (``-i`` may equal ``-o``), and a case whose output would replace one of its inputs is failed.
    ``output_ending`` (``--output-format``) replaces every case's own output ending first.
    """
    cases = _discover(Path(input_path), num_channels)
    if output_ending is not None:
        for case in cases:
            case.output_ending = output_ending
    return _mark_duplicates(_guard_inputs(sorted(cases, key=lambda c: c.case_id), output_dir))


def _discover(path: Path, num_channels: int) -> list[InputCase]:
    if not path.exists():
        if path.is_symlink():
            raise HCError(f"{path}: broken symbolic link (its target does not exist or links back to itself)")
        raise HCError(f"{path}: input not found")
    if path.is_file() and path.suffix.lower() in CASE_LIST_ENDINGS:
        return read_case_list(path, num_channels)
    if path.is_file():
        return [_single_file_case(path, num_channels)]
    entries = sorted((p for p in path.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    files = [p for p in entries if is_image_file(p) and image_ending(p.name) != ".dcm"]
    odd = [_odd_entry_case(p) for p in entries
           if image_ending(p.name) not in (None, ".dcm") and not is_image_file(p)]
    if files or odd:
        cases = _group_files(files, num_channels) + odd
    elif _is_dicom_series_folder(path):
        cases = [_dicom_case(path, num_channels)]
    else:
        cases = [_dicom_case(sub, num_channels) for sub in sorted(path.iterdir(), key=lambda p: p.name)
                 if sub.is_dir() and not sub.name.startswith(".") and _is_dicom_series_folder(sub)]
    if not cases:
        raise HCError(f"{path}: no images found (expected files ending in {', '.join(IMAGE_ENDINGS)} "
                      f"or DICOM series)")
    return cases


#: Endings of a case list file (``hc_predict -i cases.csv``).
CASE_LIST_ENDINGS = (".txt", ".csv")
_CASE_COLUMNS = ("case", "case_id", "id")


def read_case_list(path: Path, num_channels: int = 1) -> list[InputCase]:
    """The cases of a ``.txt`` (one image path per line) or ``.csv`` (header with image column(s) and an
    optional case id) case list; see the module docstring."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise HCError(f"{path}: cannot read the case list ({exc})") from None
    rows: list[tuple[str | None, list[str]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
        header = [h.strip() for h in (reader.fieldnames or [])]
        image_columns = [h for h in header if h.lower().startswith("image")]
        id_column = next((h for h in header if h.lower() in _CASE_COLUMNS), None)
        if not image_columns:
            raise HCError(f"{path}: the header names no image column (expected 'image' or 'image_0000', "
                          f"'image_0001' ..., optionally 'case'); got {', '.join(header) or 'nothing'}")
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            rows.append((row.get(id_column) or None if id_column else None, [row[c] for c in image_columns]))
    else:
        rows = [(None, [line.strip()]) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not rows:
        raise HCError(f"{path}: the case list names no images")
    cases = []
    for line, (case_id, names) in enumerate(rows, start=2 if path.suffix.lower() == ".csv" else 1):
        files = [_listed_path(path, n) for n in names if n]
        if not files:
            cases.append(InputCase(case_id or f"row{line}", [path], error=f"{path}: row {line} names no image"))
            continue
        first = files[0]
        if case_id is None:
            stem = strip_image_ending(first.name)
            match = _CHANNEL_RE.match(stem)
            case_id = match.group(1) if match and int(match.group(2)) == 0 else stem
        ending = DEFAULT_OUTPUT_ENDING if first.is_dir() else output_ending_for(first)
        case = InputCase(case_id, files, ending)
        missing = [f for f in files if not f.exists()]
        if missing:
            case.error = f"{missing[0]}: listed in {path.name} but not found"
        elif len(files) != num_channels:
            case.error = f"{path}: case {case_id}: {len(files)} image(s) listed, the model needs {num_channels}"
        cases.append(case)
    return cases


def _listed_path(list_file: Path, name: str) -> Path:
    p = Path(name).expanduser()
    return p if p.is_absolute() else list_file.parent / p


def _odd_entry_case(path: Path) -> InputCase:
    """A name that looks like an image but is no readable file: a failed case, never silently skipped."""
    if path.is_symlink() and not path.exists():
        reason = "broken symbolic link (its target does not exist or links back to itself)"
    elif path.is_dir():
        reason = "is a folder, not an image file"
    else:
        reason = "not a regular file"
    stem = strip_image_ending(path.name)
    match = _CHANNEL_RE.match(stem)
    case_id = match.group(1) if match else stem
    return InputCase(case_id, [path], output_ending_for(path), error=f"{path}: {reason}")


def _guard_inputs(cases: list[InputCase], output_dir: str | Path | None) -> list[InputCase]:
    """Drop earlier outputs found among the inputs; fail a case whose output would overwrite its input."""
    if output_dir is None:
        return cases
    inputs_of = {id(c): {_resolved(f) for f in c.files} for c in cases}
    produced = {}
    for case in cases:
        out = _resolved(case.output_path(output_dir))
        if out not in inputs_of[id(case)] and not case.error:
            produced[out] = case
    kept = []
    for case in cases:
        inputs = inputs_of[id(case)]
        if len(inputs) == 1 and next(iter(inputs)) in produced and not case.error:
            continue  # CASE.nii.gz written earlier for CASE_0000.nii.gz: an output, not an input
        if _resolved(case.output_path(output_dir)) in inputs and not case.error:
            case.error = (f"{case.files[0]}: the output {case.output_path(output_dir).name} would overwrite this "
                          f"input; choose another output folder (-o)")
        kept.append(case)
    return kept


def _resolved(path: Path) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        return Path(path).absolute()


def _single_file_case(path: Path, num_channels: int) -> InputCase:
    stem = strip_image_ending(path.name)
    match = _CHANNEL_RE.match(stem)
    case_id = match.group(1) if match and int(match.group(2)) == 0 else stem
    case = InputCase(case_id, [path], output_ending_for(path))
    if num_channels != 1:
        case.error = f"{path}: the model needs {num_channels} channels but a single file was given"
    return case


def _dicom_case(folder: Path, num_channels: int) -> InputCase:
    case = InputCase(folder.name, [folder], DEFAULT_OUTPUT_ENDING)
    if num_channels != 1:
        case.error = f"{folder}: the model needs {num_channels} channels but a DICOM series holds one"
    return case


def _group_files(files: Sequence[Path], num_channels: int) -> list[InputCase]:
    groups: dict[str, dict[int, Path]] = {}
    plain: list[Path] = []
    for f in files:
        match = _CHANNEL_RE.match(strip_image_ending(f.name))
        if match:
            groups.setdefault(match.group(1), {}).setdefault(int(match.group(2)), f)
        else:
            plain.append(f)
    cases = []
    wanted = set(range(num_channels))
    for case_id, channels in groups.items():
        first = channels[min(channels)]
        if set(channels) == wanted:
            cases.append(InputCase(case_id, [channels[c] for c in range(num_channels)], output_ending_for(first)))
        elif num_channels == 1 and 0 not in channels:
            # Numbered plain files (scan_0001, scan_0002 ...) of a single-channel model: one case each.
            plain.extend(channels.values())
        elif num_channels == 1:
            names = ", ".join(channels[c].name for c in sorted(channels))
            cases.append(InputCase(case_id, [channels[c] for c in sorted(channels)], output_ending_for(first),
                                   error=f"{first.parent}: case {case_id}: the model takes 1 channel but "
                                         f"{len(channels)} channel files were given ({names})"))
        else:
            missing = sorted(wanted - set(channels))
            extra = sorted(set(channels) - wanted)
            what = []
            if missing:
                what.append("missing channel file(s) " + ", ".join(f"{case_id}_{c:04d}" for c in missing))
            if extra:
                what.append(f"unexpected channel(s) {', '.join(f'_{c:04d}' for c in extra)} "
                            f"(the model takes {num_channels})")
            cases.append(InputCase(case_id, [channels[c] for c in sorted(channels)], output_ending_for(first),
                                   error=f"{first.parent}: case {case_id}: {'; '.join(what)}"))
    for f in plain:
        case = InputCase(strip_image_ending(f.name), [f], output_ending_for(f))
        if num_channels != 1:
            case.error = (f"{f}: the model needs {num_channels} channels; name the files "
                          f"CASE_0000..CASE_{num_channels - 1:04d}")
        cases.append(case)
    return cases


def _mark_duplicates(cases: list[InputCase]) -> list[InputCase]:
    seen: dict[str, InputCase] = {}
    for case in cases:
        other = seen.get(case.case_id)
        if other is not None:
            case.error = case.error or (f"{case.files[0]}: case {case.case_id} also given as {other.files[0]}; "
                                        f"rename one of them")
        else:
            seen[case.case_id] = case
    return cases


def shard(cases: Sequence[InputCase], part_id: int, num_parts: int) -> list[InputCase]:
    """Part ``part_id`` of ``num_parts`` of the (sorted) case list: ``cases[part_id::num_parts]``."""
    if num_parts < 1:
        raise HCError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise HCError(f"--part-id must be between 0 and {num_parts - 1}, got {part_id}")
    ordered = sorted(cases, key=lambda c: c.case_id)
    return ordered[part_id::num_parts]


def cases_from_file_lists(files_per_case: Sequence[Sequence[str | Path]],
                          case_ids: Sequence[str] | None = None) -> list[InputCase]:
    """Build cases from explicit file lists (programmatic API); ids default to the first file's stem."""
    cases = []
    for i, files in enumerate(files_per_case):
        files = [Path(f) for f in ([files] if isinstance(files, (str, Path)) else files)]
        if not files:
            raise HCError(f"case {i}: empty file list")
        if case_ids is not None:
            case_id = case_ids[i]
        else:
            stem = strip_image_ending(files[0].name)
            match = _CHANNEL_RE.match(stem)
            case_id = match.group(1) if match else stem
        cases.append(InputCase(case_id, files, output_ending_for(files[0])))
    return _mark_duplicates(cases)
