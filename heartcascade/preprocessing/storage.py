"""On-disk format of one preprocessed case.

Format: uncompressed ``.npy`` files opened memory-mapped. We measured blosc2 (ZSTD + shuffle, several
chunk/block shapes) against ``.npy`` on a CT-sized image (see documentation/preprocessing.md and
``scripts/benchmark_preprocessing.py``): normalised CT with noise compresses poorly (~80% of raw size),
blosc2 writing took ~7 s per case instead of 0.1 s, and random subvolume / slice-stack reads were 5-15x
slower warm. A memory-mapped ``.npy`` lets the data loader read exactly the voxels of a subvolume or a
K-slice stack (contiguous in canonical (C, D, H, W) order) without decoding whole chunks.

Files of a case ``ID`` in a folder (usually ``<preprocessed dataset>/data``)::

    ID_image.npy          (C, D, H, W) float32  full resolution, cropped, canonical, normalised
    ID_seg.npy            (D, H, W) uint8       training labels (absent for unlabelled cases)
    ID_coarse_image.npy   (C, d, h, w) float32  Net1's coarse grid
    ID_coarse_seg.npy     (d, h, w) uint8
    ID_locations.npz      per-class voxel lists: ``full_<c>`` (n, 3) and ``coarse_<c>`` (n, 3) int32
    ID_properties.json    geometry, crop, spacings, shapes, ...; written LAST

Every file is written atomically; the properties file is removed first and written last, so its presence
marks a complete case (:func:`list_cases` relies on it) and a crash never leaves a case that looks done.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heartcascade.utils.atomic import atomic_path, atomic_write_json, remove_temp_files_of
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

DATA_FOLDER = "data"
PROPERTIES_SUFFIX = "_properties.json"
_ARRAYS = ("image", "seg", "coarse_image", "coarse_seg")


@dataclass
class PreprocessedCase:
    """One preprocessed case (arrays may be read-only memory maps when loaded with ``mmap=True``)."""

    case_id: str
    image: np.ndarray                       # (C, D, H, W) float32
    seg: np.ndarray | None                  # (D, H, W) uint8
    coarse_image: np.ndarray                # (C, d, h, w) float32
    coarse_seg: np.ndarray | None           # (d, h, w) uint8
    class_locations: dict[int, np.ndarray] = field(default_factory=dict)         # full-res (n, 3)
    coarse_class_locations: dict[int, np.ndarray] = field(default_factory=dict)  # coarse (n, 3)
    properties: dict[str, Any] = field(default_factory=dict)


def data_dir(preprocessed_dataset_dir: str | os.PathLike) -> Path:
    """Folder holding the case files of a preprocessed dataset."""
    return Path(preprocessed_dataset_dir) / DATA_FOLDER


def case_files(folder: str | os.PathLike, case_id: str) -> dict[str, Path]:
    folder = Path(folder)
    files = {name: folder / f"{case_id}_{name}.npy" for name in _ARRAYS}
    files["locations"] = folder / f"{case_id}_locations.npz"
    files["properties"] = folder / f"{case_id}{PROPERTIES_SUFFIX}"
    return files


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _save_locations(path: Path, full: dict[int, np.ndarray], coarse: dict[int, np.ndarray]) -> None:
    arrays = {f"full_{int(c)}": np.asarray(v, dtype=np.int32).reshape(-1, 3) for c, v in full.items()}
    arrays.update({f"coarse_{int(c)}": np.asarray(v, dtype=np.int32).reshape(-1, 3) for c, v in coarse.items()})
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def save_case(folder: str | os.PathLike, case_id: str, case: PreprocessedCase) -> None:
    """Write a case atomically (properties last; see module docstring)."""
    files = case_files(folder, case_id)
    Path(folder).mkdir(parents=True, exist_ok=True)
    files["properties"].unlink(missing_ok=True)
    for path in files.values():  # leftovers of a killed earlier write of this case (one worker per case)
        remove_temp_files_of(path)
    _save_npy(files["image"], np.asarray(case.image, dtype=np.float32))
    _save_npy(files["coarse_image"], np.asarray(case.coarse_image, dtype=np.float32))
    for name in ("seg", "coarse_seg"):
        value = getattr(case, name)
        if value is None:
            files[name].unlink(missing_ok=True)
        else:
            _save_npy(files[name], np.asarray(value, dtype=np.uint8))
    _save_locations(files["locations"], case.class_locations, case.coarse_class_locations)
    properties = dict(case.properties)
    properties["case_id"] = case_id
    atomic_write_json(files["properties"], properties)


def load_properties(folder: str | os.PathLike, case_id: str) -> dict[str, Any]:
    return load_json(case_files(folder, case_id)["properties"])


def load_case(folder: str | os.PathLike, case_id: str, mmap: bool = True, load_seg: bool = True) -> PreprocessedCase:
    """Read a case; with ``mmap`` the big arrays are read-only memory maps (cheap random subvolume reads)."""
    files = case_files(folder, case_id)
    if not files["properties"].is_file():
        raise HCError(f"{files['properties']}: preprocessed case '{case_id}' not found or incomplete")
    properties = load_json(files["properties"])
    mode = "r" if mmap else None

    def read(name: str, required: bool) -> np.ndarray | None:
        path = files[name]
        if not path.is_file():
            if required:
                raise HCError(f"{path}: missing file of preprocessed case '{case_id}'")
            return None
        try:
            return np.load(path, mmap_mode=mode, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise HCError(f"{path}: cannot read ({exc})") from None

    full: dict[int, np.ndarray] = {}
    coarse: dict[int, np.ndarray] = {}
    if files["locations"].is_file():
        with np.load(files["locations"], allow_pickle=False) as npz:
            for key in npz.files:
                kind, _, label = key.rpartition("_")
                (full if kind == "full" else coarse)[int(label)] = npz[key].astype(np.int64)
    return PreprocessedCase(
        case_id=case_id,
        image=read("image", True),
        seg=read("seg", False) if load_seg else None,
        coarse_image=read("coarse_image", True),
        coarse_seg=read("coarse_seg", False) if load_seg else None,
        class_locations=full,
        coarse_class_locations=coarse,
        properties=properties,
    )


def damaged_files(folder: str | os.PathLike, case_id: str) -> list[Path]:
    """Files of a stored case that are missing, truncated or unreadable (cheap: headers and sizes only).

    Why: "up to date" must not mean "the properties file exists" -- a truncated ``.npy`` from a full
    disk or a copy gone wrong would otherwise be skipped by preprocessing and break training later.
    """
    files = case_files(folder, case_id)
    bad = []
    for name in _ARRAYS:
        path = files[name]
        if not path.is_file():
            if name in ("image", "coarse_image"):
                bad.append(path)
            continue
        if not _npy_complete(path):
            bad.append(path)
    if files["locations"].is_file():
        try:
            with zipfile.ZipFile(files["locations"]) as zf:
                if any(info.header_offset + info.compress_size > files["locations"].stat().st_size
                       for info in zf.infolist()):
                    bad.append(files["locations"])
        except (zipfile.BadZipFile, OSError):
            bad.append(files["locations"])
    return bad


def _npy_complete(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(fh)
            offset = fh.tell()
    except (ValueError, OSError, EOFError):
        return False
    count = 1
    for n in shape:
        count *= int(n)
    return path.stat().st_size >= offset + count * dtype.itemsize


def list_cases(folder: str | os.PathLike) -> list[str]:
    """Ids of the complete cases in ``folder`` (those whose properties file exists), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(PROPERTIES_SUFFIX)] for p in folder.iterdir()
                  if p.name.endswith(PROPERTIES_SUFFIX) and not p.name.startswith("."))


def remove_case(folder: str | os.PathLike, case_id: str) -> None:
    """Delete every file of a case (properties first, so it stops counting as complete at once)."""
    files = case_files(folder, case_id)
    files["properties"].unlink(missing_ok=True)
    for path in files.values():
        path.unlink(missing_ok=True)
        remove_temp_files_of(path)
