"""Pin the predictor's region of interest to the reference heart box (what a *trained* Net1 gives).

The benchmark predicts with a freshly initialised model (no trained weights ship with the code). An
untrained Net1 labels almost every voxel as foreground, so its ROI -- the box where Net2 runs -- is the
whole body crop: the worst case, several times the work of a real prediction, where the ROI is the
heart plus ``inference.roi_margin_mm``. ``--roi reference`` replaces :meth:`Predictor.roi_box` by the
box of the case's reference label map grown by the same margin (at least one coarse voxel, as the
predictor does), so Net2 does the work it does with a trained model. Everything else (Net1 on the whole
coarse volume, preprocessing, restoring, writing) is unchanged.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

Box = tuple[tuple[int, int], ...]


def reference_box(label_zyx: np.ndarray, properties: dict[str, Any], margin_mm: float,
                  coarse_shape: Sequence[int] | None = None) -> Box:
    """Box (canonical preprocessed grid, half-open) of the label's foreground grown by ``margin_mm``."""
    from heartcascade.dataset import image_io
    from heartcascade.inference import roi as roi_mod

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
    spacing = [float(s) for s in properties["spacing"]]
    coarse = coarse_shape if coarse_shape is not None else properties.get("coarse_shape", shape)
    margin = [max(math.ceil(margin_mm / s), math.ceil(n / max(int(c), 1))) for s, n, c in zip(spacing, shape, coarse)]
    return roi_mod.grow_box(box, margin, shape)


def pin_roi_to_reference(label_path: str | Path) -> None:
    """Patch :class:`~heartcascade.inference.predictor.Predictor` so every case's ROI is the box of this label map."""
    from heartcascade.dataset.image_io import label_array, read_image
    from heartcascade.inference.predictor import Predictor

    label = label_array(read_image(label_path), label_path)

    def roi_box(self, mean_probs, properties):  # same signature as Predictor.roi_box
        box = reference_box(label, properties, self.settings.roi_margin_mm, tuple(mean_probs.shape[2:]))
        self.last_roi_box = box
        return box

    Predictor.roi_box = roi_box  # type: ignore[method-assign]
