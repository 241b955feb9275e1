"""Cropping to the body, so networks do not spend memory and time on air around the patient.

The crop must be computable at prediction time, when there is no label, and it must never cut the heart.
It is therefore taken from the image alone, generously:

* CT (values in HU, i.e. the image has voxels below -500): body = voxels > -500 HU (air and lungs are
  below; fat, soft tissue, blood, bone above).
* MR, or CT not in HU: body = voxels above ``p1 + 0.1 * (p99 - p1)`` of the image's own intensity
  percentiles (background noise is far below the 10% level of the robust range).

The mask is computed on a subsampled grid (fast and robust to speckle), its *largest connected component*
is kept (drops the CT table, blankets and noise outside the body), and its bounding box is grown by a
margin (default 10 mm) on every side. A mask covering less than 1% of the image (blank or unusual scan)
means "do not crop". During training the bounding box of the label is also included (union), a
belt-and-braces guarantee that no labelled voxel is lost.

Boxes are in SimpleITK array order (z, y, x), half-open: ``[[z0, z1], [y0, y1], [x0, x1]]``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from acvl_utils.cropping_and_padding.bounding_boxes import get_bbox_from_mask
from scipy import ndimage

HU_THRESHOLD = -500.0
MR_RELATIVE_THRESHOLD = 0.1
DEFAULT_MARGIN_MM = 10.0
MIN_MASK_FRACTION = 0.01
# Target number of voxels of the subsampled grid used for the mask.
_MASK_VOXELS = 2_000_000

BBox = list[list[int]]


def full_bbox(shape: Sequence[int]) -> BBox:
    return [[0, int(n)] for n in shape]


def body_threshold(array: np.ndarray, modality: str) -> float:
    """Intensity above which a voxel counts as body (see module docstring)."""
    step = max(1, int(round((array.size / _MASK_VOXELS) ** (1 / 3))))
    sample = np.asarray(array[::step, ::step, ::step], dtype=np.float32)
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if modality == "ct" and p1 < HU_THRESHOLD:
        return HU_THRESHOLD
    return p1 + MR_RELATIVE_THRESHOLD * (p99 - p1)


def body_bbox(array: np.ndarray, spacing_zyx: Sequence[float], modality: str,
              margin_mm: float = DEFAULT_MARGIN_MM) -> BBox:
    """Bounding box of the body in a (z, y, x) array, grown by ``margin_mm`` and clipped to the image."""
    shape = array.shape
    step = max(1, int(round((array.size / _MASK_VOXELS) ** (1 / 3))))
    steps = tuple(min(step, max(1, n // 8)) for n in shape)  # keep thin axes (few MR slices) intact
    small = np.asarray(array[::steps[0], ::steps[1], ::steps[2]])
    mask = small > body_threshold(array, modality)
    if mask.mean() < MIN_MASK_FRACTION:
        return full_bbox(shape)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(np.argmax(sizes))
    if mask.sum() < MIN_MASK_FRACTION * mask.size:
        return full_bbox(shape)
    box = []
    for axis, (lo, hi) in enumerate(get_bbox_from_mask(mask)):  # half-open, on the subsampled grid
        lo, hi = lo * steps[axis], min(shape[axis], hi * steps[axis])
        pad = int(np.ceil(margin_mm / float(spacing_zyx[axis])))
        box.append([max(0, lo - pad), min(shape[axis], hi + pad)])
    return box


def label_bbox(seg: np.ndarray, margin_vox: Sequence[int] = (0, 0, 0)) -> BBox | None:
    """Bounding box of the non-zero labels (grown by ``margin_vox``), or None when the label is empty."""
    if not np.any(seg):
        return None
    return [[max(0, int(lo) - int(m)), min(n, int(hi) + int(m))]
            for (lo, hi), m, n in zip(get_bbox_from_mask(np.asarray(seg) != 0), margin_vox, seg.shape)]


def union_bbox(a: BBox, b: BBox | None) -> BBox:
    if b is None:
        return [list(x) for x in a]
    return [[min(p[0], q[0]), max(p[1], q[1])] for p, q in zip(a, b)]


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """Crop the last three axes (z, y, x) of ``array`` to ``bbox`` (a view)."""
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    return array[(Ellipsis,) + sl]


def uncrop(array: np.ndarray, bbox: BBox, full_shape: Sequence[int], fill: float | int | Sequence[float] = 0) -> np.ndarray:
    """Inverse of :func:`crop`: place ``array`` (..., z, y, x) into a ``full_shape`` array filled with ``fill``.

    ``fill`` may give one value per leading channel (e.g. background probability 1, others 0).
    """
    lead = array.shape[:-3]
    out = np.empty(lead + tuple(int(n) for n in full_shape), dtype=array.dtype)
    if np.ndim(fill) == 0:
        out[...] = fill
    else:
        out[...] = np.asarray(fill, dtype=array.dtype).reshape(lead + (1, 1, 1))
    sl = tuple(slice(lo, hi) for lo, hi in bbox)
    expected = tuple(hi - lo for lo, hi in bbox)
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(f"cropped array shape {array.shape[-3:]} does not match bbox extent {expected}")
    out[(Ellipsis,) + sl] = array
    return out
