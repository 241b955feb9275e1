"""Data augmentation: rotation, translation, shear, scaling, elastic deformation, flipping and intensity.

Spatial augmentation is fused with patch extraction. For every sample one random transform is drawn
(:func:`random_spatial`): an affine map -- rotation, shear and scaling composed in *physical* space (so
anisotropic voxels are handled correctly) plus a translation -- and optionally a smooth elastic
displacement field. The patch is then read straight from the full case volume at the transformed
coordinates (:func:`extract`), so there is no intermediate crop, no border artefacts from rotating a
too-small crop, and the cost is proportional to the patch size. Images are interpolated linearly
(order 1), label maps by nearest neighbour (order 0), so labels stay exact label values (no mixing).
When no spatial augmentation was drawn the patch is a plain slice (fast path).

batchgenerators has rotation, scaling and elastic deformation in ``SpatialTransform`` but no shear
and no translation; and it rotates a pre-cut crop. Hence this module. Flipping uses batchgenerators'
``MirrorTransform`` in the worker pipeline (:func:`batch_transforms`), and so do the intensity
transforms (Gaussian noise, Gaussian blur, multiplicative brightness, contrast, simulated low
resolution, gamma -- nnU-Net's set -- plus an MR bias field, :class:`BiasFieldTransform`, a random
intensity curve, :class:`HistogramShiftTransform`, and per-structure gains, :class:`ClassIntensityTransform`),
after the spatial transform and only on the *image* channels: :class:`ImageChannelsTransform` hands them a
copy of the first ``image_channels`` channels of ``data`` (and the labels to read), so Net1's probability
channels of step 4 and the label maps are never altered.

All randomness comes from the ``numpy.random.Generator`` passed in (the data loaders derive it from
the run seed and the batch number), except batchgenerators' transforms, which use numpy's global
generator and Python's ``random`` (noise level, blur sigma) -- the loaders reseed both per batch, so
every batch is a deterministic function of (seed, step, batch number) whatever the number of worker
processes.

Parameters (``AugmentationParams``) come from the plans' ``augmentation`` section; see
documentation/training.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform
from scipy import ndimage

from heartcascade.planning.augmentation_plan import AugmentationParams
from heartcascade.preprocessing.resampling import linear_source_weights
from heartcascade.training.shape_augmentation import CavityContractionTransform


@dataclass
class SpatialSample:
    """One drawn transform: source = centre + matrix @ offset + translation + elastic(offset)."""

    matrix: np.ndarray | None = None  # (3, 3) in voxel units, None = identity
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))
    elastic: np.ndarray | None = None  # (3, d, h, w) displacement in voxels (d = 1 when in-plane), None = none
    applied: list[str] = field(default_factory=list)
    inplane: bool = False  # drawn for slice stacks: every output slice reads its own input slice, same 2D map

    @property
    def is_identity(self) -> bool:
        return self.matrix is None and self.elastic is None and not np.any(self.translation)


def _rot(axis: int, angle: float) -> np.ndarray:
    """Rotation by ``angle`` (radians) in the plane of the two axes other than ``axis``."""
    a, b = [i for i in range(3) if i != axis]
    m = np.eye(3)
    c, s = math.cos(angle), math.sin(angle)
    m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
    return m


def random_spatial(rng: np.random.Generator, params: AugmentationParams, spacing: Sequence[float],
                   out_shape: Sequence[int], inplane_only: bool = False) -> SpatialSample:
    """Draw a random transform for a patch of ``out_shape`` voxels on a grid of ``spacing`` mm.

    ``inplane_only`` (slice stacks of step 4): rotation only about D, shear/scale/translation/elastic
    only within the (H, W) plane, the same for every slice of the stack.
    """
    sample = SpatialSample(inplane=inplane_only)
    if not params.enabled:
        return sample
    sp = np.asarray(spacing, dtype=float)
    phys = np.eye(3)
    if rng.random() < params.p_rotation:
        axes = (0,) if inplane_only else (0, 1, 2)
        for axis in axes:
            limit = math.radians(params.rotation_deg[axis])
            if limit > 0:
                phys = _rot(axis, rng.uniform(-limit, limit)) @ phys
        sample.applied.append("rotation")
    if rng.random() < params.p_shear and params.shear > 0:
        shear = np.eye(3)
        pairs = [(1, 2), (2, 1)] if inplane_only else [(i, j) for i in range(3) for j in range(3) if i != j]
        for i, j in pairs:
            shear[i, j] = rng.uniform(-params.shear, params.shear)
        phys = phys @ shear
        sample.applied.append("shear")
    if rng.random() < params.p_scale:
        lo, hi = params.scale_range
        per_axis = params.p_scale_per_axis > 0 and rng.random() < params.p_scale_per_axis
        # log-uniform: symmetric in/out; one zoom for all axes, or one per axis (changes the heart's shape)
        zoom = np.exp(rng.uniform(math.log(lo), math.log(hi), size=3 if per_axis else 1)) * np.ones(3)
        if inplane_only:
            zoom[0] = 1.0
        phys = phys @ np.diag(1.0 / zoom)
        sample.applied.append("scale")
    if sample.applied:
        sample.matrix = np.diag(1.0 / sp) @ phys @ np.diag(sp)
    if rng.random() < params.p_translation and params.translation_mm > 0:
        shift = rng.uniform(-params.translation_mm, params.translation_mm, size=3) / sp
        if inplane_only:
            shift[0] = 0.0
        sample.translation = shift
        sample.applied.append("translation")
    if rng.random() < params.p_elastic and params.elastic_magnitude_mm > 0:
        sample.elastic = _elastic_field(rng, params, sp, out_shape, inplane_only)
        sample.applied.append("elastic")
    return sample


def _elastic_field(rng: np.random.Generator, params: AugmentationParams, sp: np.ndarray,
                   out_shape: Sequence[int], inplane_only: bool) -> np.ndarray:
    """Smooth random displacement (3, *out_shape) in voxels: random control points, smoothed, upsampled."""
    out_shape = tuple(int(s) for s in out_shape)
    ctrl = [max(2, int(math.ceil(s * sp[i] / params.elastic_spacing_mm)) + 1) for i, s in enumerate(out_shape)]
    if inplane_only:
        ctrl[0] = 1
        out_shape = (1,) + out_shape[1:]  # the same displacement for every slice (broadcast over D)
    field_ = np.zeros((3,) + out_shape, dtype=np.float32)
    for axis in range(3):
        if inplane_only and axis == 0:
            continue
        coarse = rng.normal(0.0, params.elastic_magnitude_mm / sp[axis], size=ctrl)
        coarse = ndimage.gaussian_filter(coarse, sigma=0.5, mode="nearest")
        field_[axis] = upsample_at(coarse[None], out_shape, [None, None, None])[0]
    return field_


# --------------------------------------------------------------------------------------------------
# Exact partial trilinear upsampling (numpy), identical to F.interpolate(trilinear, align_corners=False):
# the elastic field's control points, in the worker processes (which stay free of torch threads). Net1's
# probabilities are read with the same rule in torch: heartcascade.inference.upsampling.


def upsample_at(coarse: np.ndarray, full_shape: Sequence[int], indices: Sequence[np.ndarray | None]) -> np.ndarray:
    """Trilinear upsampling of ``coarse`` (C, d, h, w) to ``full_shape`` evaluated only at ``indices``.

    ``indices[a]`` lists full-resolution positions along axis ``a`` (``None`` = all). Separable, so
    reading K slices costs K slices, not the whole volume. Returns float32 (C, len(i0), len(i1), len(i2)).
    """
    out = coarse  # converted to float32 after the first take: a float16 input is never copied whole
    for axis in range(3):
        idx = indices[axis]
        f = int(full_shape[axis])
        if idx is None:
            idx = np.arange(f)
        i0, i1, w1 = linear_source_weights(idx, out.shape[axis + 1], f)
        a = np.take(out, i0, axis=axis + 1).astype(np.float32, copy=False)
        b = np.take(out, i1, axis=axis + 1).astype(np.float32, copy=False)
        shape = [1] * out.ndim
        shape[axis + 1] = -1
        out = a + (b - a) * w1.astype(np.float32).reshape(shape)
    return out



def extract(volumes: Sequence[np.ndarray], centre: Sequence[int], out_shape: Sequence[int],
            sample: SpatialSample | None = None, orders: Sequence[int] | None = None,
            cvals: Sequence[float] | None = None, dtypes: Sequence[Any] | None = None) -> list[np.ndarray]:
    """Read a patch of ``out_shape`` around ``centre`` from each (D, H, W) volume.

    Output voxel ``i`` (per axis) sits at offset ``i - out_shape // 2`` from the centre, so with the
    identity transform the patch is ``volume[c - s//2 : c - s//2 + s]`` (zero/cval padded outside).
    ``orders``: interpolation per volume (1 for images, 0 for labels); ``cvals``: value outside.
    """
    n = len(volumes)
    orders = list(orders) if orders is not None else [1] * n
    cvals = list(cvals) if cvals is not None else [0.0] * n
    dtypes = list(dtypes) if dtypes is not None else [v.dtype for v in volumes]
    out_shape = tuple(int(s) for s in out_shape)
    centre = np.asarray(centre, dtype=np.int64)
    if sample is None or sample.is_identity:
        return [_crop_padded(v, centre - np.asarray(out_shape) // 2, out_shape, c).astype(t, copy=False)
                for v, c, t in zip(volumes, cvals, dtypes)]
    if sample.inplane:
        return _extract_inplane(volumes, centre, out_shape, sample, orders, cvals, dtypes)
    coords = sample_coordinates(centre, out_shape, sample)
    outs = []
    lo = np.floor(coords.reshape(3, -1).min(1)).astype(np.int64) - 1
    hi = np.ceil(coords.reshape(3, -1).max(1)).astype(np.int64) + 2
    # Work on the bounding box of the coordinates only (keeps map_coordinates' input small); its low
    # corner and the local coordinates are the same for every volume.
    box_lo = np.maximum(lo, 0)
    local = coords - box_lo.reshape(3, 1, 1, 1)
    for volume, order, cval, dtype in zip(volumes, orders, cvals, dtypes):
        box_hi = np.minimum(hi, volume.shape)
        if np.any(box_hi <= box_lo):
            outs.append(np.full(out_shape, cval, dtype=dtype))
            continue
        sub = volume[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))]
        if order == 0:
            # Nearest neighbour by rounding, so label values are copied, never interpolated.
            idx = np.rint(local).astype(np.int64)
            inside = np.all((idx >= 0) & (idx < np.asarray(sub.shape).reshape(3, 1, 1, 1)), axis=0)
            res = np.full(out_shape, cval, dtype=dtype)
            res[inside] = sub[idx[0][inside], idx[1][inside], idx[2][inside]]
        else:
            res = ndimage.map_coordinates(sub if sub.dtype == np.float32 else sub.astype(np.float32), local,
                                          order=order, mode="constant", cval=cval, prefilter=False)
            res = res.astype(dtype, copy=False)
        outs.append(res)
    return outs


def _extract_inplane(volumes: Sequence[np.ndarray], centre: np.ndarray, out_shape: tuple[int, int, int],
                     sample: SpatialSample, orders: list[int], cvals: list[float], dtypes: list[Any]) -> list[np.ndarray]:
    """:func:`extract` for an in-plane transform: output slice ``k`` reads input slice
    ``centre[0] - d // 2 + k`` at the same 2D coordinates, so the coordinates, rounded label indices and
    bounds are computed once for one plane (2-3x cheaper than 3D for the full-slice stacks of step 4)."""
    d = out_shape[0]
    z = int(centre[0]) - d // 2 + np.arange(d)
    plane = plane_coordinates(centre, out_shape, sample)  # (2, h, w)
    lo = np.floor(plane.reshape(2, -1).min(1)).astype(np.int64) - 1
    hi = np.ceil(plane.reshape(2, -1).max(1)).astype(np.int64) + 2
    box_lo = np.maximum(lo, 0)
    local = plane - box_lo.reshape(2, 1, 1)
    outs = []
    for volume, order, cval, dtype in zip(volumes, orders, cvals, dtypes):
        res = np.full(out_shape, cval, dtype=dtype)
        box_hi = np.minimum(hi, volume.shape[1:])
        valid = np.flatnonzero((z >= 0) & (z < volume.shape[0]))
        if np.any(box_hi <= box_lo) or not len(valid):
            outs.append(res)
            continue
        sub = volume[:, box_lo[0]:box_hi[0], box_lo[1]:box_hi[1]]
        if order == 0:
            idx = np.rint(local).astype(np.int64)
            inside = (idx[0] >= 0) & (idx[0] < sub.shape[1]) & (idx[1] >= 0) & (idx[1] < sub.shape[2])
            rows, cols = idx[0][inside], idx[1][inside]
            for k in valid:
                res[k][inside] = sub[z[k]][rows, cols]
        else:
            for k in valid:
                src = sub[z[k]] if sub.dtype == np.float32 else sub[z[k]].astype(np.float32)
                res[k] = ndimage.map_coordinates(src, local, order=order, mode="constant", cval=cval,
                                                 prefilter=False)
        outs.append(res)
    return outs


def _grid_offsets(shape: Sequence[int]) -> np.ndarray:
    """(len(shape), *shape) float32 offsets of every output voxel from the patch centre ``shape // 2``."""
    return np.stack(np.meshgrid(*[np.arange(int(s), dtype=np.float32) - (int(s) // 2) for s in shape],
                                indexing="ij"))


def _source(offsets: np.ndarray, centre: Sequence[int], sample: SpatialSample, axes: list[int],
            elastic: np.ndarray | None) -> np.ndarray:
    """``centre + M offsets + t + elastic`` on the given axes: the transform of :class:`SpatialSample`."""
    coords = offsets if sample.matrix is None else \
        np.einsum("ij,j...->i...", sample.matrix[np.ix_(axes, axes)].astype(np.float32), offsets)
    if elastic is not None:
        coords = coords + elastic
    shift = (np.asarray(centre)[axes] + sample.translation[axes]).astype(np.float32)
    return coords + shift.reshape((len(axes),) + (1,) * (offsets.ndim - 1))


def sample_coordinates(centre: np.ndarray, out_shape: tuple[int, int, int], sample: SpatialSample) -> np.ndarray:
    """Where each output voxel of an :func:`extract` patch is read: (3, *out_shape) float32 voxel coordinates."""
    return _source(_grid_offsets(out_shape), centre, sample, [0, 1, 2], sample.elastic)


def plane_coordinates(centre: np.ndarray, out_shape: Sequence[int], sample: SpatialSample) -> np.ndarray:
    """Where each output voxel of one slice of an in-plane :func:`extract` patch is read in its input
    slice: (2, h, w) float32 (row, column) -- the same for every slice of the stack."""
    elastic = None if sample.elastic is None else sample.elastic[1:, 0]
    return _source(_grid_offsets(out_shape[1:]), centre, sample, [1, 2], elastic)


def _crop_padded(volume: np.ndarray, start: np.ndarray, shape: Sequence[int], cval: float) -> np.ndarray:
    """``volume[start:start+shape]`` with ``cval`` where the window leaves the volume."""
    stop = start + np.asarray(shape)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(stop, volume.shape[-3:])
    if np.all(src_lo == start) and np.all(src_hi == stop):
        return volume[..., start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]].copy()
    out = np.full(volume.shape[:-3] + tuple(int(s) for s in shape), cval, dtype=volume.dtype)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[..., dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        volume[..., src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return out


def crop_padded(volume: np.ndarray, start: Sequence[int], shape: Sequence[int], cval: float = 0.0) -> np.ndarray:
    """Public form of the padded crop (last three axes), used by the loaders' fast paths."""
    return _crop_padded(volume, np.asarray(start, dtype=np.int64), shape, cval)


def intensity_transforms(params: AugmentationParams) -> list[Any]:
    """batchgenerators' intensity transforms for the plans' probabilities (those with p > 0), in nnU-Net's order.

    Gamma works on the patch's own [min, max] and maps back onto it (``retain_stats=False``): the images
    are range-normalised, not z-scored, so keeping the range is what keeps them comparable. Low
    resolution is simulated in-plane only (``ignore_axes=(0,)``): the slice axis is usually the coarse
    one already and a step-4 stack has only K slices.
    """
    if not params.enabled:
        return []

    candidates = [
        (params.p_class_intensity, lambda p: ClassIntensityTransform(tuple(params.class_intensity_range),
                                                                     p_per_sample=p)),
        (params.p_gaussian_noise, lambda p: GaussianNoiseTransform(tuple(params.noise_std), p_per_sample=p)),
        (params.p_gaussian_blur, lambda p: GaussianBlurTransform(tuple(params.blur_sigma), different_sigma_per_channel=True,
                                                                 p_per_channel=0.5, p_per_sample=p)),
        (params.p_brightness, lambda p: BrightnessMultiplicativeTransform(tuple(params.brightness_range),
                                                                          p_per_sample=p)),
        (params.p_contrast, lambda p: ContrastAugmentationTransform(tuple(params.contrast_range), preserve_range=True,
                                                                    p_per_sample=p)),
        (params.p_low_resolution, lambda p: SimulateLowResolutionTransform(
            tuple(params.low_resolution_zoom), per_channel=True, p_per_channel=0.5, order_downsample=0,
            order_upsample=3, p_per_sample=p, ignore_axes=(0,))),
        (params.p_gamma_inverted, lambda p: GammaTransform(tuple(params.gamma_range), invert_image=True,
                                                           per_channel=True, retain_stats=False, p_per_sample=p)),
        (params.p_gamma, lambda p: GammaTransform(tuple(params.gamma_range), invert_image=False, per_channel=True,
                                                  retain_stats=False, p_per_sample=p)),
        (params.p_bias_field, lambda p: BiasFieldTransform(tuple(params.bias_field_coefficients), p_per_sample=p)),
        (params.p_histogram_shift, lambda p: HistogramShiftTransform(tuple(params.histogram_shift_range),
                                                                     p_per_sample=p)),
    ]
    return [make(float(p)) for p, make in candidates if p > 0]


def gain_above_minimum(x: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """``x`` with its signal above its darkest value multiplied by ``gain``, clipped back to its own range.

    The images are normalised, not raw signal, so a multiplicative change (coil shading, a tissue's
    contrast) acts on the distance from the patch's floor and keeps the patch's range.
    """
    lo, hi = float(x.min()), float(x.max())
    return np.clip((x - lo) * gain + lo, lo, hi)


class BiasFieldTransform:
    """MR intensity shading: multiply the signal by ``exp(P(z, y, x))``, P a random cubic polynomial.

    Coils make one side of a cine MR brighter than the other, differently on every scanner; batchgenerators
    has no such transform. Coordinates run over [-1, 1] across the patch; each coefficient is drawn
    uniformly with a size in ``coefficients`` and a random sign. The images are normalised (not raw
    signal), so the gain acts on the signal above the patch's darkest value and the result is clipped
    back to the patch's own range. Draws from numpy's global generator, which
    the loaders reseed per batch (see the module docstring). The slice axis gets the same treatment, so
    a step-4 stack of K slices sees an almost constant field along z.
    """

    ORDER = 3

    def __init__(self, coefficients: tuple[float, float], p_per_sample: float) -> None:
        self.coefficients = (float(coefficients[0]), float(coefficients[1]))
        self.p_per_sample = float(p_per_sample)

    def field(self, shape: Sequence[int]) -> np.ndarray:
        """A random ``exp(polynomial)`` gain of ``shape`` (float32)."""
        axes = np.meshgrid(*[np.linspace(-1.0, 1.0, int(n), dtype=np.float32) for n in shape], indexing="ij")
        log_gain = np.zeros(tuple(int(n) for n in shape), dtype=np.float32)
        lo, hi = self.coefficients
        for i in range(self.ORDER + 1):
            for j in range(self.ORDER + 1 - i):
                for k in range(self.ORDER + 1 - i - j):
                    if i == j == k == 0:
                        continue
                    c = np.random.uniform(lo, hi) * np.random.choice((-1.0, 1.0))
                    log_gain += np.float32(c) * axes[0] ** i * axes[1] ** j * axes[2] ** k
        return np.exp(log_gain)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            gain = self.field(data.shape[2:])
            for c in range(data.shape[1]):
                data[b, c] = gain_above_minimum(data[b, c], gain)
        return data_dict


class HistogramShiftTransform:
    """Another scanner's intensity curve: a random monotone piecewise-linear remap of each image channel.

    Percentile normalisation fixes a scan's darkest and brightest values, not where the tissues lie between
    them: on another centre's cine MR the blood pool sits at 0.35-0.55 of the window against about 0.62 in
    the training scans, while Net1's instance norm cancels a global scale or offset. A gamma bends the
    whole curve one way; this moves three control points (at 1/4, 1/2 and 3/4 of the patch's range) each by a
    random share of the range (size drawn from ``shift_range``, random sign), sorts them so the curve stays
    monotone, and maps the patch through it, keeping its darkest and brightest values. Draws from numpy's
    global generator, which the loaders reseed per batch.
    """

    POINTS = (0.25, 0.5, 0.75)

    def __init__(self, shift_range: tuple[float, float], p_per_sample: float) -> None:
        self.shift_range = (float(shift_range[0]), float(shift_range[1]))
        self.p_per_sample = float(p_per_sample)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """Control points (x, y) on [0, 1]: the ends fixed, the inner ones moved and kept in order."""
        x = np.array((0.0, *self.POINTS, 1.0))
        lo, hi = self.shift_range
        moved = [p + np.random.uniform(lo, hi) * np.random.choice((-1.0, 1.0)) for p in self.POINTS]
        y = np.array((0.0, *np.sort(np.clip(moved, 0.0, 1.0)), 1.0))
        return x, y

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict["data"]
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            for c in range(data.shape[1]):
                x = data[b, c]
                lo, hi = float(x.min()), float(x.max())
                if hi <= lo:
                    continue
                px, py = self.curve()
                fraction = np.interp((x - lo) / (hi - lo), px, py)
                data[b, c] = (fraction * (hi - lo) + lo).astype(data.dtype, copy=False)
        return data_dict


class ClassIntensityTransform:
    """Another protocol's tissue contrast: each labelled structure in the patch scaled by its own random gain.

    Global transforms (brightness, gamma, a random curve) move every tissue together; on another
    centre's cine MR the *relative* contrast differs -- its blood pools sit darker against the
    myocardium than the training scans', most at end-systole, and brightening them at test time raised
    Dice by 0.04 (documentation/results.md). Here every foreground label present in a sample's ``seg``
    draws a factor from ``factor_range``; the gain is 1 plus the sum of (factor - 1) times the label's
    mask blurred in-plane (sigma 1 voxel), so the change fades over a voxel or two instead of drawing
    the label's outline into the image. As :class:`BiasFieldTransform`, the gain acts above the patch's
    darkest value and the result is clipped to the patch's range (:func:`gain_above_minimum`). Reads
    ``seg``, never writes it; draws from numpy's global generator, which the loaders reseed per batch.
    """

    SIGMA = (0.0, 1.0, 1.0)  # voxels along (D, H, W): in-plane only, the slice axis is often coarse

    def __init__(self, factor_range: tuple[float, float], p_per_sample: float) -> None:
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self.p_per_sample = float(p_per_sample)

    def gain(self, labels: np.ndarray) -> np.ndarray:
        """The multiplicative field for one sample's (D, H, W) label map (float32, 1 off the structures)."""
        gain = np.ones(labels.shape, dtype=np.float32)
        for label in np.unique(labels):
            if label <= 0:
                continue
            factor = np.random.uniform(*self.factor_range)
            soft = ndimage.gaussian_filter((labels == label).astype(np.float32), self.SIGMA)
            gain += np.float32(factor - 1.0) * soft
        return gain

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data, seg = data_dict["data"], data_dict.get("seg")
        if seg is None:
            raise ValueError("ClassIntensityTransform needs the batch's label maps under 'seg'")
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            gain = self.gain(seg[b, 0])
            for c in range(data.shape[1]):
                data[b, c] = gain_above_minimum(data[b, c], gain)
        return data_dict


class ImageChannelsTransform:
    """Apply transforms to the first ``image_channels`` channels of ``data`` only (a float32 copy).

    Step 4's ``data`` holds Net1's probabilities after the image channels; intensity changes must not
    reach them. The labels (``seg``) are handed on for label-aware transforms to read; none writes them.
    """

    def __init__(self, transforms: Sequence[Any], image_channels: int) -> None:
        self.transforms = list(transforms)
        self.image_channels = int(image_channels)

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data = data_dict["data"]
        part = {"data": data[:, :self.image_channels].astype(np.float32, copy=True), "seg": data_dict.get("seg")}
        for transform in self.transforms:
            part = transform(**part)
        data[:, :self.image_channels] = part["data"]
        return data_dict


def batch_transforms(params: AugmentationParams, image_channels: int | None = None):
    """The transforms run in the worker processes on whole batches (a contracted cavity, flipping, then
    intensity), or None.

    ``image_channels``: how many leading channels of ``data`` are image (the rest, Net1's
    probabilities in step 4, are left alone by the intensity transforms); None = no intensity transforms.
    """
    transforms: list[Any] = []
    if params.enabled and params.p_cavity_contraction > 0:
        transforms.append(CavityContractionTransform(tuple(params.cavity_contraction_range),
                                                     params.cavity_contraction_labels,
                                                     p_per_sample=float(params.p_cavity_contraction)))
    if params.enabled and params.p_flip > 0 and params.flip_axes:
        transforms.append(MirrorTransform(axes=tuple(int(a) for a in params.flip_axes), data_key="data",
                                          label_key="seg", p_per_sample=float(params.p_flip)))
    intensity = intensity_transforms(params) if image_channels else []
    if intensity:
        transforms.append(ImageChannelsTransform(intensity, int(image_channels)))
    if not transforms:
        return None
    if len(transforms) == 1:
        return transforms[0]
    return Compose(transforms)
