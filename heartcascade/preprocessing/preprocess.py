"""The per-case preprocessing pipeline, shared by preprocessing (training data) and prediction.

Order of operations for one case (images of all channels, optionally a label map):

1. check every channel (and the label) lies on the same voxel grid;
2. choose the slice axis (:func:`heartcascade.dataset.image_io.choose_slice_axis`);
3. crop to the body (:mod:`.cropping`; during training also to include the label's bounding box);
4. transpose to the canonical order (slice axis first) and normalise to [-1, 1] (:mod:`.normalization`)
   in one pass into a fresh float32 buffer;
5. only if the plans ask for a common in-plane spacing: resample in-plane (slices are never resampled);
6. the coarse version for Net1 (:func:`compute_coarse`) and, for training, per-class voxel lists.

Prediction calls :func:`preprocess_images`, runs the networks on the canonical array and writes its
result with :func:`restore_to_original`, which undoes steps 5, 4 and 3 and returns an array with the
original image's size in SimpleITK order, ready for ``image_io.write_array(..., Geometry.from_dict(
properties['geometry']), path)``.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.preprocessing import cropping, normalization, resampling
from heartcascade.preprocessing.storage import PreprocessedCase
from heartcascade.utils.errors import HCError

PREPROCESSING_VERSION = 1
#: An axis is not resampled to Net1's grid when that would change it by less than this fraction.
COARSE_SNAP = 0.1
DEFAULT_MAX_LOCATIONS = 10_000


@dataclass(frozen=True)
class PreprocessSettings:
    """The plans fields preprocessing follows, each named as in the plans. Built from the typed plans by
    :func:`heartcascade.planning.plans.preprocess_settings` (preprocessing is a stage before the plans'
    types, so it declares what it needs and never reads the plans dict)."""

    modality: str
    num_input_channels: int
    num_classes: int
    normalization: tuple[Mapping[str, Any], ...]  # the plans' entries, one per channel
    margin_mm: float                              # cropping.margin_mm
    inplane_spacing: tuple[float, float] | None   # full_resolution.inplane_spacing (None: native)
    coarse_spacing: tuple[float, float, float]    # net1.coarse_spacing
    max_locations_per_class: int                  # sampling.max_locations_per_class


def read_images(paths: Sequence[str | Path]) -> list[sitk.Image]:
    return [image_io.read_image(p) for p in paths]


def _voxels_view(image: sitk.Image, name: str) -> np.ndarray:
    """(z, y, x) view of a SimpleITK image's buffer, without a copy; rejects NaN/Inf."""
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise HCError(f"{name}: image contains {int(np.count_nonzero(~np.isfinite(array)))} NaN/Inf voxels")
    return array


def read_labels(label: sitk.Image, num_classes: int, name: str = "label") -> np.ndarray:
    """Label map as uint8 (z, y, x); every value must be a class of dataset.json (0..num_classes-1).

    Integer maps are checked and cast straight from SimpleITK's buffer (no int32 detour, this is on the
    critical path for 512^3 CT); float maps go through ``image_io.label_array`` (must be integral).
    """
    view = sitk.GetArrayViewFromImage(label)
    if np.issubdtype(view.dtype, np.integer):
        lo, hi = int(view.min(initial=0)), int(view.max(initial=0))
        if lo < 0 or hi >= num_classes:
            bad = np.unique(view[(view < 0) | (view >= num_classes)])[:5]
            raise HCError(f"{name}: label values {sorted(int(v) for v in bad)} are not in dataset.json 'labels' "
                          f"(0..{num_classes - 1})")
        return view.astype(np.uint8)
    seg = image_io.label_array(label, name)
    if int(seg.max(initial=0)) >= num_classes:
        bad = np.unique(seg[seg >= num_classes])[:5]
        raise HCError(f"{name}: label values {sorted(int(v) for v in bad)} are not in dataset.json 'labels' "
                      f"(0..{num_classes - 1})")
    return seg.astype(np.uint8)


def _check_grids(images: Sequence[sitk.Image], label: sitk.Image | None, name: str) -> Geometry:
    if not images:
        raise HCError(f"{name}: no image channels given")
    ref = Geometry.of(images[0])
    for c, image in enumerate(images[1:], start=1):
        diff = ref.mismatch(Geometry.of(image))
        if diff:
            raise HCError(f"{name}: channel {c} is not on the grid of channel 0 ({diff})")
    if label is not None:
        diff = ref.mismatch(Geometry.of(label))
        if diff:
            raise HCError(f"{name}: label is not on the image grid ({diff})")
    return ref


def coarse_scale_factors(spacing: Sequence[float], coarse_spacing: Sequence[float]) -> tuple[float, float, float]:
    """Per-axis full->coarse factors of a case (<= 1; axes within ``COARSE_SNAP`` of 1 are left alone)."""
    factors = []
    for s, t in zip(spacing, coarse_spacing):
        f = min(1.0, float(s) / float(t))
        factors.append(1.0 if f > 1.0 - COARSE_SNAP else f)
    return tuple(factors)  # type: ignore[return-value]


def coarse_shape(shape: Sequence[int], factors: Sequence[float]) -> tuple[int, int, int]:
    """Net1 grid of a full-resolution shape: ``floor(n * f + 0.5)`` (the rule of networks.cascade.coarse_shape_for)."""
    return tuple(max(1, int(math.floor(n * f + 0.5))) for n, f in zip(shape, factors))  # type: ignore[return-value]


def prepare_arrays(images: Sequence[sitk.Image], settings: PreprocessSettings, label: sitk.Image | None = None,
                   case_id: str = "case") -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Steps 1-5: full-resolution canonical, cropped, normalised image (C, D, H, W), labels and properties."""
    geometry = _check_grids(images, label, case_id)
    num_classes = settings.num_classes
    if len(images) != settings.num_input_channels:
        raise HCError(f"{case_id}: {len(images)} image channels given, plans expect {settings.num_input_channels}")
    views = [_voxels_view(img, f"{case_id} channel {c}") for c, img in enumerate(images)]
    spacing_xyz = image_io.working_spacing(geometry.spacing)
    spacing_zyx = tuple(reversed(spacing_xyz))
    slice_axis = image_io.choose_slice_axis(spacing_xyz, geometry.direction)
    margin_mm = settings.margin_mm

    seg_zyx = None if label is None else read_labels(label, num_classes, case_id)

    bbox = cropping.body_bbox(views[0], spacing_zyx, settings.modality, margin_mm)
    if seg_zyx is not None:
        margin_vox = [int(math.ceil(margin_mm / s)) for s in spacing_zyx]
        bbox = cropping.union_bbox(bbox, cropping.label_bbox(seg_zyx, margin_vox))

    canonical = [image_io.to_canonical(cropping.crop(v, bbox), slice_axis) for v in views]
    shape = tuple(int(n) for n in canonical[0].shape)
    image = np.empty((len(views),) + shape, dtype=np.float32)
    for c, view in enumerate(canonical):
        image[c] = view  # one pass: cast + transpose + crop
    image, windows = normalization.normalize_image_inplace(image, list(settings.normalization))
    seg = None
    if seg_zyx is not None:
        seg = np.ascontiguousarray(image_io.to_canonical(cropping.crop(seg_zyx, bbox), slice_axis))

    native_spacing = image_io.canonical_spacing(spacing_xyz, slice_axis)
    spacing = native_spacing
    target = settings.inplane_spacing
    resampled = False
    if target is not None and not np.allclose(native_spacing[1:], target, rtol=1e-3):
        spacing = (native_spacing[0], float(target[0]), float(target[1]))
        new_shape = resampling.shape_for_spacing(shape, native_spacing, spacing)
        image = resampling.resample_image(image, new_shape, mode="auto")
        if seg is not None:
            seg = resampling.resample_labels(seg, new_shape, num_classes)
        resampled = True

    properties: dict[str, Any] = {
        "case_id": case_id,
        "preprocessing_version": PREPROCESSING_VERSION,
        "geometry": geometry.to_dict(),
        "original_shape_zyx": [int(n) for n in reversed(geometry.size)],
        "slice_axis": int(slice_axis),
        "crop_bbox_zyx": [[int(a), int(b)] for a, b in bbox],
        "cropped_shape": [int(n) for n in shape],
        "native_spacing": [float(s) for s in native_spacing],
        "inplane_resampled": resampled,
        "spacing": [float(s) for s in spacing],
        "shape": [int(n) for n in image.shape[1:]],
        "normalization": windows,
    }
    return image, seg, properties


def preprocess_images(images: Sequence[sitk.Image], settings: PreprocessSettings,
                      case_id: str = "case") -> tuple[np.ndarray, dict[str, Any]]:
    """Prediction entry point: full-res canonical, cropped, normalised float32 (C, D, H, W) and properties.

    The properties also carry Net1's grid for this case (``coarse_shape``, ``coarse_scale_factors``,
    ``coarse_spacing``); build the coarse image with :func:`compute_coarse` or on the GPU with
    ``resampling.resample_torch(image, properties['coarse_shape'], 'area')``.
    """
    image, _, properties = prepare_arrays(images, settings, None, case_id)
    properties.update(coarse_grid(properties, settings.coarse_spacing))
    return image, properties


def coarse_grid(properties: dict[str, Any], coarse_spacing: Sequence[float]) -> dict[str, Any]:
    """Net1's grid for a case: shape, per-axis scale factors and the resulting actual spacing."""
    spacing = properties["spacing"]
    factors = coarse_scale_factors(spacing, coarse_spacing)
    shape = coarse_shape(properties["shape"], factors)
    actual = [s * n / m for s, n, m in zip(spacing, properties["shape"], shape)]
    return {"coarse_scale_factors": [float(f) for f in factors], "coarse_shape": [int(n) for n in shape],
            "coarse_spacing": [float(s) for s in actual]}


def compute_coarse(image: np.ndarray, properties: dict[str, Any], num_classes: int,
                   seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Resample a full-res image (area average) and labels (class fractions + argmax) to Net1's grid.

    ``properties`` must contain ``coarse_shape`` (see :func:`coarse_grid`).
    """
    shape = tuple(properties["coarse_shape"])
    coarse_image = resampling.resample_image(image, shape, mode="auto")
    coarse_seg = None if seg is None else resampling.resample_labels(seg, shape, num_classes)
    return coarse_image, coarse_seg


def sample_class_locations(seg: np.ndarray, num_classes: int, max_per_class: int = DEFAULT_MAX_LOCATIONS,
                           seed: int = 0) -> dict[int, np.ndarray]:
    """Canonical (n, 3) voxel indices of every foreground class, a uniform random subset of at most
    ``max_per_class`` (sorted, so reads are cache friendly). Background is not listed: it is most of the
    volume and the sampler draws it by rejection."""
    rng = np.random.default_rng(seed)
    flat = np.asarray(seg).ravel()
    idx = np.flatnonzero(flat)
    values = flat[idx]
    out: dict[int, np.ndarray] = {}
    for c in range(1, num_classes):
        sel = idx[values == c]
        if sel.size > max_per_class:
            sel = np.sort(rng.choice(sel, max_per_class, replace=False))
        out[c] = np.stack(np.unravel_index(sel, seg.shape), axis=1).astype(np.int32) if sel.size else \
            np.zeros((0, 3), dtype=np.int32)
    return out


def case_seed(case_id: str) -> int:
    return zlib.crc32(case_id.encode("utf-8"))


def preprocess_case(images: Sequence[sitk.Image], settings: PreprocessSettings, label: sitk.Image | None = None,
                    case_id: str = "case") -> PreprocessedCase:
    """Everything training needs of one case: full-res and coarse arrays, voxel lists and properties."""
    num_classes = settings.num_classes
    image, seg, properties = prepare_arrays(images, settings, label, case_id)
    properties.update(coarse_grid(properties, settings.coarse_spacing))
    coarse_image, coarse_seg = compute_coarse(image, properties, num_classes, seg)
    full_locs: dict[int, np.ndarray] = {}
    coarse_locs: dict[int, np.ndarray] = {}
    if seg is not None:
        max_per_class = settings.max_locations_per_class
        seed = case_seed(case_id)
        full_locs = sample_class_locations(seg, num_classes, max_per_class, seed)
        coarse_locs = sample_class_locations(coarse_seg, num_classes, max_per_class, seed + 1)
        counts = torch.bincount(torch.from_numpy(seg).ravel(), minlength=num_classes).numpy()
        properties["class_voxels"] = [int(n) for n in counts]
        properties["classes_present"] = [int(c) for c in np.flatnonzero(counts)]
        properties["coarse_classes_present"] = [int(c) for c in np.flatnonzero(np.bincount(coarse_seg.ravel(), minlength=num_classes))]
    return PreprocessedCase(case_id=case_id, image=image, seg=seg, coarse_image=coarse_image, coarse_seg=coarse_seg,
                            class_locations=full_locs, coarse_class_locations=coarse_locs, properties=properties)


def original_geometry(properties: dict[str, Any]) -> Geometry:
    """Geometry of the case's original image (what a prediction must be written with)."""
    return Geometry.from_dict(properties["geometry"])


def restore_to_original(array: np.ndarray, properties: dict[str, Any]) -> np.ndarray:
    """Undo in-plane resampling, transposition and cropping of a canonical full-res result.

    ``array`` is either an integer label map (D, H, W) or float class scores (C, D, H, W) on the grid of
    the preprocessed image (``properties['shape']``). Returns the same kind of array in SimpleITK order
    (z, y, x) with the original image's size; outside the crop labels are 0 (background) and
    probabilities are 1 for class 0 and 0 for the others. Exact (lossless) for labels when no in-plane
    resampling was done.
    """
    array = np.asarray(array)
    is_labels = array.ndim == 3
    if array.ndim not in (3, 4):
        raise HCError(f"restore_to_original expects (D, H, W) labels or (C, D, H, W) scores, got {array.shape}")
    if list(array.shape[-3:]) != list(properties["shape"]):
        raise HCError(f"case {properties.get('case_id')}: array of shape {array.shape[-3:]} does not match the "
                      f"preprocessed shape {properties['shape']}")
    cropped = tuple(properties["cropped_shape"])
    if tuple(array.shape[-3:]) != cropped:
        if is_labels:
            array = resampling.resample_labels(array, cropped, int(array.max(initial=0)) + 1, keep_classes=False)
        else:
            array = resampling.resample_image(array.astype(np.float32, copy=False), cropped, mode="linear")
    zyx = image_io.from_canonical(array, int(properties["slice_axis"]))
    if is_labels:
        fill: Any = 0
    else:
        fill = np.zeros(array.shape[0], dtype=array.dtype)
        fill[0] = 1
    return np.ascontiguousarray(cropping.uncrop(zyx, properties["crop_bbox_zyx"], properties["original_shape_zyx"], fill))
