"""Overlap and surface-distance metrics for segmentations (Dice, Jaccard, ASSD, HD95).

Definitions (documentation/evaluation.md has the full text):

* Arrays may be in any axis order; ``spacing`` must be given in the *same* order as the array axes
  (for a SimpleITK array that is ``image.GetSpacing()[::-1]``). Distances are in the unit of the spacing
  (mm for medical images).
* Surface of a binary mask = the mask minus its erosion by the 6-connected (face-neighbour) structuring
  element, with everything outside the array counted as background. A voxel is thus on the surface when
  at least one of its face neighbours is background (or outside the image).
* Surface distances are Euclidean distances between voxel centres: for every surface voxel of one mask
  the distance to the nearest surface voxel of the other mask. ASSD is the mean of both directed sets
  pooled; HD95 is, by default (``hd95="pooled"``), the 95th percentile (linear interpolation) of the
  same pooled set; with ``hd95="max"`` it is the larger of the two directed 95th percentiles (MONAI's
  and MedPy's convention, which weighs a stray far-away blob much more).
* Empty-structure rule: both masks empty -> status "both_empty" and, by default
  (``both_empty="one"``), Dice = Jaccard = 1, ASSD = HD95 = 0; with ``both_empty="nan"`` every metric
  is NaN and so left out of means (nnU-Net's convention). Exactly one empty -> Dice = Jaccard = 0,
  ASSD = HD95 = NaN (null in JSON), status "pred_empty" or "ref_empty"; such NaN distances are left
  out of distance means and counted as "missing".

Everything is computed on the bounding box of ``ref | pred`` plus a one-voxel margin; because the margin
is background, the cropped surfaces and distances are identical to those of the full volume.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

WHOLE_HEART = "whole_heart"
STRUCTURE_MEAN = "mean"
METRIC_NAMES: tuple[str, ...] = ("dice", "jaccard", "assd", "hd95")

STATUS_OK = "ok"
STATUS_BOTH_EMPTY = "both_empty"
STATUS_PRED_EMPTY = "pred_empty"  # structure in the reference, absent from the prediction
STATUS_REF_EMPTY = "ref_empty"  # structure predicted, absent from the reference
MISSING_STATUSES = (STATUS_PRED_EMPTY, STATUS_REF_EMPTY)
#: HD95 conventions: 95th percentile of the pooled distances, or the max of the directed 95th percentiles.
HD95_CONVENTIONS = ("pooled", "max")
#: Scores of a structure absent from both maps: perfect ("one") or undefined and left out of means ("nan").
BOTH_EMPTY_RULES = ("one", "nan")


def check_conventions(hd95: str, both_empty: str) -> None:
    if hd95 not in HD95_CONVENTIONS:
        raise ValueError(f"hd95 must be one of {', '.join(HD95_CONVENTIONS)}, got {hd95!r}")
    if both_empty not in BOTH_EMPTY_RULES:
        raise ValueError(f"both_empty must be one of {', '.join(BOTH_EMPTY_RULES)}, got {both_empty!r}")


@dataclass(frozen=True)
class StructureMetrics:
    """Metrics of one structure in one case; NaN distances mean "undefined" (exactly one mask empty)."""

    dice: float
    jaccard: float
    assd: float
    hd95: float
    ref_voxels: int
    pred_voxels: int
    status: str

    def to_dict(self) -> dict:
        """JSON-ready dict: NaN becomes None so that the JSON stays standard (null)."""
        return {k: _none_if_nan(v) for k, v in asdict(self).items()}


def _none_if_nan(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _check_pair(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]) -> tuple[float, ...]:
    if ref.shape != pred.shape:
        raise ValueError(f"reference shape {ref.shape} != prediction shape {pred.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {ref.ndim}-D array")
    sp = tuple(float(s) for s in spacing)
    if any(not s > 0 for s in sp):
        raise ValueError(f"spacing must be positive, got {sp}")
    return sp


def bounding_box(mask: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding all True voxels, grown by ``margin`` (clipped); None if empty."""
    box = ndi.find_objects(mask.astype(np.uint8, copy=False))
    if not box or box[0] is None:
        return None
    return _grow(box[0], mask.shape, margin)


def _grow(box: Sequence[slice], shape: Sequence[int], margin: int) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union_box(a: Sequence[slice] | None, b: Sequence[slice] | None) -> tuple[slice, ...] | None:
    if a is None:
        return None if b is None else tuple(b)
    if b is None:
        return tuple(a)
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


_FACE_STRUCTURES: dict[int, np.ndarray] = {}


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: ``mask & ~erode(mask)`` with 6-connectivity (4 in 2-D), outside = background."""
    mask = np.asarray(mask, dtype=bool)
    structure = _FACE_STRUCTURES.setdefault(mask.ndim, ndi.generate_binary_structure(mask.ndim, 1))
    eroded = ndi.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _distance_map(surface: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (spacing units) from every voxel centre to the nearest ``surface`` voxel centre.

    SimpleITK's Maurer transform is used because it is exact, anisotropic and multi-threaded (several
    times faster than scipy's EDT on a whole-heart box). Surface voxels get 0.
    """
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)))  # SimpleITK wants (x, y, z)
    dist = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    return np.maximum(sitk.GetArrayFromImage(dist), 0.0)


def surface_distances(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances: (ref surface -> pred surface, pred surface -> ref surface).

    Both masks must be non-empty. The arrays are cropped to the box of ``ref | pred`` first, which
    leaves the result unchanged (see module docstring) but makes full-size CT fast.
    """
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    sp = _check_pair(ref, pred, spacing)
    box = _union_box(bounding_box(ref), bounding_box(pred))
    if box is None or not ref.any() or not pred.any():
        raise ValueError("surface distances need two non-empty masks")
    return _surface_distances_cropped(ref[box], pred[box], sp)


def _surface_distances_cropped(
    ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    ref_surface = surface_mask(ref)
    pred_surface = surface_mask(pred)
    ref_to_pred = _distance_map(pred_surface, spacing)[ref_surface]
    pred_to_ref = _distance_map(ref_surface, spacing)[pred_surface]
    return ref_to_pred.astype(np.float64), pred_to_ref.astype(np.float64)


def binary_metrics(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], hd95: str = "pooled",
                   both_empty: str = "one") -> StructureMetrics:
    """Dice, Jaccard, ASSD and HD95 of two binary masks, following the empty-structure rule."""
    check_conventions(hd95, both_empty)
    ref = np.asarray(ref, dtype=bool)
    pred = np.asarray(pred, dtype=bool)
    sp = _check_pair(ref, pred, spacing)
    box = _union_box(bounding_box(ref), bounding_box(pred))
    if box is None:
        return _metrics_of_cropped(ref[:0], pred[:0], sp, hd95, both_empty)
    return _metrics_of_cropped(ref[box], pred[box], sp, hd95, both_empty)


def _metrics_of_cropped(ref: np.ndarray, pred: np.ndarray, spacing: Sequence[float], hd95: str = "pooled",
                        both_empty: str = "one") -> StructureMetrics:
    n_ref = int(np.count_nonzero(ref))
    n_pred = int(np.count_nonzero(pred))
    if n_ref == 0 and n_pred == 0:
        if both_empty == "nan":
            return StructureMetrics(math.nan, math.nan, math.nan, math.nan, 0, 0, STATUS_BOTH_EMPTY)
        return StructureMetrics(1.0, 1.0, 0.0, 0.0, 0, 0, STATUS_BOTH_EMPTY)
    if n_ref == 0 or n_pred == 0:
        status = STATUS_REF_EMPTY if n_ref == 0 else STATUS_PRED_EMPTY
        return StructureMetrics(0.0, 0.0, math.nan, math.nan, n_ref, n_pred, status)
    n_both = int(np.count_nonzero(ref & pred))
    dice = 2.0 * n_both / (n_ref + n_pred)
    jaccard = n_both / (n_ref + n_pred - n_both)
    d_rp, d_pr = _surface_distances_cropped(ref, pred, spacing)
    pooled = np.concatenate([d_rp, d_pr])
    if hd95 == "max":
        hd = max(float(np.percentile(d_rp, 95)), float(np.percentile(d_pr, 95)))
    else:
        hd = float(np.percentile(pooled, 95))
    return StructureMetrics(
        dice=dice,
        jaccard=jaccard,
        assd=float(pooled.mean()),
        hd95=hd,
        ref_voxels=n_ref,
        pred_voxels=n_pred,
        status=STATUS_OK,
    )


def label_metrics(
    ref_labels: np.ndarray,
    pred_labels: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[str, int],
    whole_heart: bool = True,
    hd95: str = "pooled",
    both_empty: str = "one",
) -> dict[str, StructureMetrics]:
    """Metrics for every structure ``name -> label value`` of two integer label maps.

    With ``whole_heart`` the union of all listed structures is added under ``"whole_heart"``. Bounding
    boxes of all labels come from one pass of ``ndimage.find_objects`` per map, so each structure is then
    evaluated on its own small box.
    """
    if ref_labels.shape != pred_labels.shape:
        raise ValueError(f"reference shape {ref_labels.shape} != prediction shape {pred_labels.shape}")
    if not np.issubdtype(ref_labels.dtype, np.integer) or not np.issubdtype(pred_labels.dtype, np.integer):
        raise ValueError("label maps must have an integer dtype")
    for name in (WHOLE_HEART, STRUCTURE_MEAN):
        if name in labels:
            raise ValueError(f"structure name {name!r} is reserved")
    values = [int(v) for v in labels.values()]
    if any(v <= 0 for v in values):
        raise ValueError(f"structure labels must be positive, got {values}")
    sp = _check_pair(ref_labels, pred_labels, spacing)
    check_conventions(hd95, both_empty)
    max_label = max(values) if values else 0
    ref_boxes = _label_boxes(ref_labels, max_label)
    pred_boxes = _label_boxes(pred_labels, max_label)

    result: dict[str, StructureMetrics] = {}
    heart_box: tuple[slice, ...] | None = None
    for name, value in labels.items():
        box = _union_box(ref_boxes.get(int(value)), pred_boxes.get(int(value)))
        heart_box = _union_box(heart_box, box)
        result[name] = _metrics_for_box(ref_labels, pred_labels, box, (int(value),), sp, hd95, both_empty)
    if whole_heart:
        result[WHOLE_HEART] = _metrics_for_box(ref_labels, pred_labels, heart_box, tuple(values), sp, hd95,
                                               both_empty)
    return result


def _label_boxes(label_map: np.ndarray, max_label: int) -> dict[int, tuple[slice, ...]]:
    if max_label <= 0:
        return {}
    boxes = ndi.find_objects(label_map, max_label)  # values <= 0 or > max_label are ignored
    return {i + 1: _grow(b, label_map.shape, 1) for i, b in enumerate(boxes) if b is not None}


def _metrics_for_box(
    ref_labels: np.ndarray,
    pred_labels: np.ndarray,
    box: tuple[slice, ...] | None,
    values: tuple[int, ...],
    spacing: Sequence[float],
    hd95: str = "pooled",
    both_empty: str = "one",
) -> StructureMetrics:
    if box is None:
        empty = np.zeros((0,) * ref_labels.ndim, dtype=bool)
        return _metrics_of_cropped(empty, empty, spacing, hd95, both_empty)
    ref_crop, pred_crop = ref_labels[box], pred_labels[box]
    if len(values) == 1:
        return _metrics_of_cropped(ref_crop == values[0], pred_crop == values[0], spacing, hd95, both_empty)
    return _metrics_of_cropped(np.isin(ref_crop, values), np.isin(pred_crop, values), spacing, hd95, both_empty)


def mean_over_structures(metrics: Mapping[str, StructureMetrics]) -> dict[str, float | int | None]:
    """Per-case mean over the structures (whole heart excluded).

    Each metric averages the defined (finite) values: Dice and Jaccard of every structure (unless a
    structure absent from both maps is NaN, ``both_empty="nan"``), ASSD and HD95 where both masks exist. Also counts "missing" and "both_empty".
    """
    items = [m for name, m in metrics.items() if name not in (WHOLE_HEART, STRUCTURE_MEAN)]
    out: dict[str, float | int | None] = {}
    for key in METRIC_NAMES:
        vals = np.array([getattr(m, key) for m in items], dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        out[key] = float(vals.mean()) if vals.size else None
    out["missing"] = sum(m.status in MISSING_STATUSES for m in items)
    out["both_empty"] = sum(m.status == STATUS_BOTH_EMPTY for m in items)
    return out
