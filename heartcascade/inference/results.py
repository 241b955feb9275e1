"""What the predictor returns and writes: label maps, probabilities inside the ROI, per-run reports."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from heartcascade.dataset import image_io
from heartcascade.inference import roi as roi_mod
from heartcascade.preprocessing.preprocess import restore_to_original
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError

@dataclass
class RoiProbabilities:
    """Class probabilities inside a box; everything outside is background with probability 1.

    ``array`` is (C, *box extent) and ``box`` half-open per axis, both in the axis order of the grid
    they describe (canonical (D, H, W) inside the predictor, SimpleITK (z, y, x) once restored).
    """

    array: np.ndarray
    box: tuple[tuple[int, int], ...]
    shape: tuple[int, int, int]

    def full(self, dtype=np.float32) -> np.ndarray:
        out = np.zeros((self.array.shape[0],) + tuple(self.shape), dtype=dtype)
        out[0] = 1
        out[(slice(None),) + roi_mod.box_slices(self.box)] = self.array
        return out


@dataclass
class CaseResult:
    """Prediction of one case on the original grid (SimpleITK order)."""

    labels: np.ndarray                       # (z, y, x) training labels, uint8
    probabilities: RoiProbabilities | None   # in (z, y, x) of the original image
    properties: dict[str, Any]
    roi_box: tuple[tuple[int, int], ...]     # canonical preprocessed grid
    timings: dict[str, float] = field(default_factory=dict)
    brightening: list[float] | None = None   # per channel factor of the second pass; None = one pass


@dataclass
class PredictionReport:
    """What :func:`heartcascade.inference.batch.predict_files` did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # prediction time per predicted case
    existing: dict[str, Path] = field(default_factory=dict)  # output of each skipped case (an earlier run's)
    notes: list[str] = field(default_factory=list)  # side files (failures.csv, ...) that could not be written

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        text = f"{len(self.written)} predicted, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed"
        if self.failed:
            text += ": " + ", ".join(sorted(self.failed))
        return text


def one_line(exc: BaseException) -> str:
    if isinstance(exc, HCError):
        return str(exc)
    text = " ".join(str(exc).split()) or "no message"
    return f"{type(exc).__name__}: {text[:300]}"


def save_roi_probabilities(probabilities: RoiProbabilities, path: str | Path, num_classes: int) -> None:
    """heartcascade's ``CASE.npz``: the probabilities inside the region of interest and where it lies."""
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, probabilities=probabilities.array, bbox_zyx=np.asarray(probabilities.box),
                            shape_zyx=np.asarray(probabilities.shape), num_classes=np.asarray(num_classes))


def probabilities_path(label_path: str | Path) -> Path:
    label_path = Path(label_path)
    return label_path.with_name(image_io.strip_image_ending(label_path.name) + ".npz")


def load_probabilities(path: str | Path) -> RoiProbabilities:
    """Read a ``CASE.npz`` written with ``--save-probabilities``."""
    with np.load(path) as data:
        return RoiProbabilities(data["probabilities"], tuple(tuple(int(v) for v in r) for r in data["bbox_zyx"]),
                                tuple(int(v) for v in data["shape_zyx"]))


def restore_probabilities(probs: RoiProbabilities, properties: dict[str, Any]) -> RoiProbabilities:
    """ROI probabilities of the canonical preprocessed grid in the original image's (z, y, x) grid."""
    original = tuple(int(n) for n in properties["original_shape_zyx"])
    if properties.get("inplane_resampled"):
        full = restore_to_original(probs.full(np.float32), properties)
        return RoiProbabilities(full.astype(np.float16), roi_mod.full_box(original), original)
    slice_axis = int(properties["slice_axis"])
    axes = image_io.canonical_axes(slice_axis)  # canonical axis k is zyx axis axes[k]
    crop = properties["crop_bbox_zyx"]
    box_zyx: list[tuple[int, int]] = [(0, 0)] * 3
    for k, (a, b) in enumerate(probs.box):
        off = int(crop[axes[k]][0])
        box_zyx[axes[k]] = (a + off, b + off)
    array = np.ascontiguousarray(image_io.from_canonical(probs.array, slice_axis))
    return RoiProbabilities(array, tuple(box_zyx), original)
