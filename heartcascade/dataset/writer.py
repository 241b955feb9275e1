"""Create a raw dataset folder all at once: build it hidden, then move it into place.

Why: a dataset id must never point to a half-written folder (an interrupted import, a crash while
generating), and re-running a command must not silently mix old and new cases. ``DatasetWriter``
writes every case into a hidden temporary folder next to the target, writes ``dataset.json`` last
and renames the folder into place; on error the temporary folder is removed. An existing dataset
with the same id is refused unless ``overwrite`` is set, in which case it is replaced only after the
new one is complete.

Usage::

    with DatasetWriter(7, "MyData", overwrite=False) as out:
        out.write_case("case_000", [image_array], label_array, geometry)
        out.copy_image(source_file, "case_001")           # exact bytes, exact geometry
        folder = out.commit({"0": "CT"}, MMWHS_LABELS, label_codes=MMWHS_CODES)
"""
from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from heartcascade.dataset.dataset_json import DatasetInfo, write_dataset_json
from heartcascade.dataset.image_io import Geometry, write_array
from heartcascade.paths import dataset_folder_name, raw_root
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError

FILE_ENDING = ".nii.gz"


def existing_dataset_folders(dataset_id: int, root: Path) -> list[Path]:
    """Every ``DatasetXXX_*`` folder for this id (normally zero or one)."""
    if not root.is_dir():
        return []
    prefix = f"Dataset{int(dataset_id):03d}_"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))


def check_target(dataset_id: int, name: str, overwrite: bool, root: Path | None = None) -> Path:
    """Final folder for (id, name); one-line error if the id is taken and ``overwrite`` is not set."""
    root = raw_root() if root is None else Path(root)
    folder = root / dataset_folder_name(dataset_id, name)
    existing = existing_dataset_folders(dataset_id, root)
    if existing and not overwrite:
        raise HCError(f"dataset {int(dataset_id)} already exists: {existing[0]}; pass --overwrite to replace it")
    return folder


class DatasetWriter:
    """Writes a raw dataset into a hidden temporary folder; :meth:`commit` moves it into place."""

    def __init__(self, dataset_id: int, name: str, overwrite: bool = False, root: Path | None = None,
                 protect: Sequence[Path] = ()) -> None:
        self.dataset_id = int(dataset_id)
        self.root = raw_root() if root is None else Path(root)
        self.folder = check_target(self.dataset_id, name, overwrite, self.root)
        self.overwrite = overwrite
        self.protect = [Path(p).resolve() for p in protect]
        self._check_protected()
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.tmp-", dir=self.root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes it private; the dataset should not be
        self._committed = False

    # -- context manager: remove the temporary folder unless committed ------------------------------
    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()

    def abort(self) -> None:
        if not self._committed and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- paths ----------------------------------------------------------------------------------------
    def image_path(self, case_id: str, channel: int = 0, test: bool = False) -> Path:
        return self.tmp / ("imagesTs" if test else "imagesTr") / f"{case_id}_{channel:04d}{FILE_ENDING}"

    def label_path(self, case_id: str, test: bool = False) -> Path:
        return self.tmp / ("labelsTs" if test else "labelsTr") / f"{case_id}{FILE_ENDING}"

    # -- writing --------------------------------------------------------------------------------------
    def write_case(self, case_id: str, images: Sequence[np.ndarray], label: np.ndarray | None, geometry: Geometry,
                   test: bool = False) -> None:
        """Write channel arrays and the label (SimpleITK order z, y, x) with ``geometry``."""
        for channel, image in enumerate(images):
            write_array(image, geometry, self.image_path(case_id, channel, test))
        if label is not None:
            write_array(label, geometry, self.label_path(case_id, test))

    def copy_image(self, source: str | os.PathLike, case_id: str, channel: int = 0, test: bool = False) -> Path:
        """Copy a NIfTI file byte for byte (gzip-compressing a ``.nii``), so geometry is exactly kept."""
        return copy_nifti(source, self.image_path(case_id, channel, test))

    def commit(self, channel_names: dict[str, str], labels: dict[str, int], label_codes: dict[int, int] | None = None,
               extra: dict | None = None) -> Path:
        """Write ``dataset.json`` and move the folder into place (replacing the old one if allowed)."""
        labels_tr = self.tmp / "labelsTr"
        num_training = len([p for p in labels_tr.iterdir() if p.name.endswith(FILE_ENDING)]) if labels_tr.is_dir() else 0
        info = DatasetInfo(folder=self.tmp, channel_names=dict(channel_names), labels=dict(labels),
                           num_training=num_training, file_ending=FILE_ENDING, label_codes=label_codes,
                           extra=dict(extra or {}))
        write_dataset_json(info)
        existing = existing_dataset_folders(self.dataset_id, self.root)
        if existing and not self.overwrite:
            raise HCError(f"dataset {self.dataset_id} already exists: {existing[0]}; pass --overwrite to replace it")
        self._check_protected()
        trash: list[tuple[Path, Path]] = []
        try:
            for old in existing:
                moved = self.root / f".{old.name}.old-{os.getpid()}"
                os.replace(old, moved)
                trash.append((old, moved))
            os.replace(self.tmp, self.folder)
        except OSError as exc:
            for old, moved in trash:  # put the previous dataset back
                os.replace(moved, old)
            raise HCError(f"{self.folder}: cannot move the new dataset into place ({exc.strerror or exc})") from None
        self._committed = True
        for _, moved in trash:
            shutil.rmtree(moved, ignore_errors=True)
        return self.folder

    def _check_protected(self) -> None:
        """Refuse to replace a dataset folder that holds one of the inputs (inputs are never modified)."""
        for old in existing_dataset_folders(self.dataset_id, self.root):
            old = old.resolve()
            for path in self.protect:
                if path == old or old in path.parents:
                    raise HCError(f"input {path} lies inside {old}, which --overwrite would replace; "
                                  f"use another dataset id")


def copy_nifti(source: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Atomic byte copy of a ``.nii.gz`` (or gzip of a ``.nii``) to a ``.nii.gz`` destination."""
    source, dest = Path(source), Path(dest)
    name = source.name.lower()
    with atomic_path(dest) as tmp:
        if name.endswith(".nii.gz"):
            shutil.copyfile(source, tmp)
        elif name.endswith(".nii"):
            with open(source, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as out:
                shutil.copyfileobj(src, out, length=1 << 20)
        else:
            raise HCError(f"{source}: can only copy NIfTI files (.nii, .nii.gz)")
    return dest
