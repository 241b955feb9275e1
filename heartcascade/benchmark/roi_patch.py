"""An ROI rule for the benchmark: the reference heart box (what a *trained* Net1 gives).

The benchmark predicts with a freshly initialised model (no trained weights ship with the code). An
untrained Net1 labels almost every voxel as foreground, so its ROI -- the box where Net2 runs -- is the
whole body crop: the worst case, several times the work of a real prediction, where the ROI is the
heart plus ``inference.roi_margin_mm``. ``--roi reference`` predicts with :class:`ReferenceBoxRoi`
(``Predictor(roi_rule=...)``): the box of the case's reference label map grown by the same margin (the
predictor's margin rule, :func:`heartcascade.inference.roi.grow_roi`), so Net2 does the work it does
with a trained model. Everything else (Net1 on the whole coarse volume, preprocessing, restoring,
writing) is unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import label_array, read_image
from heartcascade.inference import roi as roi_mod

Box = tuple[tuple[int, int], ...]


def reference_box(label_zyx: np.ndarray, properties: Mapping[str, Any], margin_mm: float,
                  coarse_shape: Sequence[int] | None = None) -> Box:
    """Box (canonical preprocessed grid, half-open) of the label's foreground grown by ``margin_mm``."""
    crop = properties["crop_bbox_zyx"]
    cropped = label_zyx[tuple(slice(int(a), int(b)) for a, b in crop)]
    canon = image_io.to_canonical(cropped, int(properties["slice_axis"]))
    shape = tuple(int(n) for n in properties["shape"])
    box = roi_mod.foreground_box(np.asarray(canon) != 0)
    if box is None:
        return roi_mod.full_box(shape)
    if tuple(canon.shape) != shape:  # in-plane resampled grid: scale the box
        box = tuple((int(math.floor(a * s / n)), int(math.ceil(b * s / n)))
                    for (a, b), n, s in zip(box, canon.shape, shape))
    coarse = coarse_shape if coarse_shape is not None else properties.get("coarse_shape", shape)
    return roi_mod.grow_roi(box, margin_mm, properties, coarse)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ReferenceBoxRoi:
    """ROI rule: the reference label's box, whatever Net1 says (``margin_mm=None``: the plans' margin)."""

    label_zyx: np.ndarray = field(repr=False, compare=False)
    margin_mm: float | None = None

    @classmethod
    def from_file(cls, label_path: str | Path) -> "ReferenceBoxRoi":
        return cls(label_array(read_image(label_path), label_path))

    def __call__(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> Box:
        return reference_box(self.label_zyx, properties, float(self.margin_mm or 0.0), tuple(mean_probs.shape[2:]))
