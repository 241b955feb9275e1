"""Connected-component postprocessing of predicted label maps, as chosen on validation cases.

Two kinds of step, applied in this order (nnU-Net's rule): keep only the largest connected component
of the whole foreground (every label != 0; voxels of other components become background), then, for
each listed structure, keep only that structure's largest component. Which steps help depends on the
data and the model, so they are not fixed: ``heartcascade.evaluation.postprocessing`` keeps a step only
where it raises mean Dice on validation predictions and stores the decision as ``postprocessing.json``
with the model (a fold folder, or the configuration folder for cross-validation); the predictor loads
it (:func:`find_postprocessing`) and applies it to every label map it writes
(``Predictor.predict_preprocessed``), so final validation, ``hc_predict`` and the determination share
this one implementation. Components are 26-connected (``cc3d.largest_k``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import cc3d
import numpy as np
from scipy import ndimage

from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

POSTPROCESSING_FILE = "postprocessing.json"
POSTPROCESSING_VERSION = 1
CONNECTIVITIES = (6, 18, 26)


def keep_largest_component(mask: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Boolean mask of the largest connected component of ``mask`` (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    return cc3d.largest_k(mask, k=1, connectivity=connectivity, binary_image=True) > 0


def _foreground_box(labels: np.ndarray) -> tuple[slice, ...] | None:
    boxes = ndimage.find_objects((labels != 0).astype(np.uint8))
    return boxes[0] if boxes and boxes[0] is not None else None


@dataclass(frozen=True)
class Postprocessing:
    """The chosen steps: ``keep_largest_foreground`` and the training labels in ``keep_largest_per_label``."""

    keep_largest_foreground: bool = False
    keep_largest_per_label: tuple[int, ...] = ()
    connectivity: int = 26

    @property
    def is_identity(self) -> bool:
        return not self.keep_largest_foreground and not self.keep_largest_per_label

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """Apply the steps to an integer label map (training labels) in place; returns it.

        Works on the bounding box of the foreground only: components never reach outside it.
        """
        if self.is_identity:
            return labels
        box = _foreground_box(labels)
        if box is None:
            return labels
        crop = labels[box]
        if self.keep_largest_foreground:
            foreground = crop != 0
            crop[foreground & ~keep_largest_component(foreground, self.connectivity)] = 0
        for label in self.keep_largest_per_label:
            mask = crop == label
            crop[mask & ~keep_largest_component(mask, self.connectivity)] = 0
        return labels

    def check_labels(self, num_classes: int, source: str) -> "Postprocessing":
        bad = [c for c in self.keep_largest_per_label if not 0 < c < num_classes]
        if bad:
            raise HCError(f"{source}: keep_largest_per_label has label(s) {bad} outside 1..{num_classes - 1}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": POSTPROCESSING_VERSION, "connectivity": self.connectivity,
                "keep_largest_foreground": self.keep_largest_foreground,
                "keep_largest_per_label": list(self.keep_largest_per_label)}

    @classmethod
    def from_dict(cls, data: Any, source: str = "postprocessing") -> "Postprocessing":
        if not isinstance(data, Mapping):
            raise HCError(f"{source}: postprocessing must be a JSON object")
        if data.get("format_version") != POSTPROCESSING_VERSION:
            raise HCError(f"{source}: format_version {data.get('format_version')!r} is not {POSTPROCESSING_VERSION}")
        fg = data.get("keep_largest_foreground", False)
        per_label = data.get("keep_largest_per_label", [])
        conn = data.get("connectivity", 26)
        if not isinstance(fg, bool):
            raise HCError(f"{source}: keep_largest_foreground must be true or false, got {fg!r}")
        if not isinstance(per_label, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in per_label):
            raise HCError(f"{source}: keep_largest_per_label must be a list of training labels, got {per_label!r}")
        if conn not in CONNECTIVITIES:
            raise HCError(f"{source}: connectivity must be one of {CONNECTIVITIES}, got {conn!r}")
        return cls(fg, tuple(int(v) for v in per_label), int(conn))


def load_postprocessing(path: str | Path) -> Postprocessing:
    return Postprocessing.from_dict(load_json(Path(path)), str(path))


def find_postprocessing(model_dir: str | Path, fold_dirs: Sequence[Path]) -> Path | None:
    """The ``postprocessing.json`` that belongs to a set of folds, or None.

    One fold: its own file, else the configuration folder's. Several folds (an ensemble): the
    configuration folder's (chosen on their cross-validation, ``hc_determine_postprocessing``), else
    the first fold's.
    """
    model_dir = Path(model_dir)
    own = [Path(d) / POSTPROCESSING_FILE for d in fold_dirs[:1]]
    shared = [] if model_dir in [Path(d) for d in fold_dirs] else [model_dir / POSTPROCESSING_FILE]
    order = own + shared if len(fold_dirs) == 1 else shared + own
    return next((p for p in order if p.is_file()), None)
