"""Resampling between grids, on CPU or GPU with torch.

Preprocessing uses it to build Net1's coarse grid (and, where the planner asks for it, a common in-plane
spacing); prediction uses :func:`resample_torch` on the GPU to bring Net1's output to full resolution.
All grids are *cell-centred* (``align_corners=False`` geometry): voxel ``i`` covers ``[i, i+1)`` in units
of its spacing, so a resampled volume spans the same physical box as the input.

Downsampling uses area averaging (``'area'``) rather than point sampling so that a 4x coarser grid does
not alias thin structures away; upsampling uses trilinear interpolation. ``'auto'`` does both per axis.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage
import torch
import torch.nn.functional as F

from heartcascade.utils.errors import HCError

MODES = ("nearest", "linear", "area", "auto")


def shape_for_spacing(shape: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """Grid size that covers the same physical extent at ``new_spacing`` (at least one voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def resample_torch(tensor: torch.Tensor, size: Sequence[int], mode: str = "linear") -> torch.Tensor:
    """Resample the last three (spatial) axes of a (D,H,W), (C,D,H,W) or (N,C,D,H,W) tensor to ``size``.

    Modes: ``'nearest'`` (nearest-exact, for label maps), ``'linear'`` (trilinear), ``'area'`` (box
    average; meant for shrinking axes) and ``'auto'`` (area on axes that shrink, then trilinear on axes
    that grow). Works on any device; integer tensors are only allowed with ``'nearest'``. The result has
    the input's number of dimensions; floating results keep the input dtype.
    """
    if mode not in MODES:
        raise HCError(f"unknown resampling mode {mode!r}; expected one of {', '.join(MODES)}")
    size = tuple(int(s) for s in size)
    if len(size) != 3 or min(size) < 1:
        raise HCError(f"resampling size must be three positive ints, got {size}")
    ndim = tensor.dim()
    if ndim not in (3, 4, 5):
        raise HCError(f"resample_torch expects a 3D, 4D or 5D tensor, got shape {tuple(tensor.shape)}")
    x = tensor.reshape((1,) * (5 - ndim) + tuple(tensor.shape))
    if tuple(x.shape[2:]) == size:
        return tensor.clone()
    if mode == "nearest":
        out = F.interpolate(x if x.is_floating_point() else x.float(), size=size, mode="nearest-exact")
        out = out.to(tensor.dtype)
    else:
        if not x.is_floating_point():
            raise HCError(f"mode {mode!r} needs a floating tensor, got {tensor.dtype}")
        if mode == "linear":
            out = F.interpolate(x, size=size, mode="trilinear", align_corners=False)
        elif mode == "area":
            out = F.adaptive_avg_pool3d(x, size)
        else:  # auto
            shrunk = tuple(min(a, b) for a, b in zip(x.shape[2:], size))
            out = x if shrunk == tuple(x.shape[2:]) else F.adaptive_avg_pool3d(x, shrunk)
            if shrunk != size:
                out = F.interpolate(out, size=size, mode="trilinear", align_corners=False)
    return out.reshape(tuple(tensor.shape[: ndim - 3]) + size)


def resample_image(image: np.ndarray, size: Sequence[int], mode: str = "auto") -> np.ndarray:
    """Resample a float (C,D,H,W) or (D,H,W) numpy image channel by channel (bounds peak memory)."""
    size = tuple(int(s) for s in size)
    if tuple(image.shape[-3:]) == size:
        return np.array(image, dtype=np.float32, copy=True)
    if image.ndim == 3:
        return resample_image(image[None], size, mode)[0]
    out = np.empty((image.shape[0],) + size, dtype=np.float32)
    for c in range(image.shape[0]):
        t = torch.from_numpy(np.ascontiguousarray(image[c], dtype=np.float32))
        out[c] = resample_torch(t, size, mode).numpy()
    return out


def label_fractions(seg: np.ndarray, size: Sequence[int], num_classes: int) -> np.ndarray:
    """Per-class volume fraction of each target voxel, (num_classes, *size) float32.

    One class at a time, so memory stays at one float copy of ``seg`` plus the small result.
    """
    size = tuple(int(s) for s in size)
    seg_t = torch.from_numpy(np.ascontiguousarray(seg))
    out = np.zeros((num_classes,) + size, dtype=np.float32)
    present = np.bincount(np.asarray(seg).ravel(), minlength=num_classes) if seg.size < 2**31 else None
    for c in range(num_classes):
        if present is not None and present[c] == 0:
            continue
        mask = (seg_t == c).to(torch.float32)
        out[c] = resample_torch(mask, size, "auto").numpy()
    return out


def _bin_index(n: int, m: int) -> np.ndarray:
    """Target bin of each of ``n`` source voxels when shrinking to ``m`` (by voxel centre)."""
    return np.minimum(m - 1, ((np.arange(n) + 0.5) * (m / n)).astype(np.int64))


def binned_label_counts(seg: np.ndarray, size: Sequence[int], num_classes: int, chunk: int = 16) -> np.ndarray:
    """Per target voxel, how many source voxels of each class fall into it: (*size, num_classes) int32.

    For shrinking grids only (every ``size[i] <= seg.shape[i]``): each source voxel goes to the target
    voxel containing its centre, so this is a box filter computed with one ``bincount`` per slab of
    ``chunk`` slices -- one pass over the labels for all classes, memory bounded by the slab.
    """
    D, H, W = seg.shape
    d, h, w = (int(v) for v in size)
    if d > D or h > H or w > W:
        raise HCError(f"binned_label_counts only shrinks: {seg.shape} -> {tuple(size)}")
    C = int(num_classes)
    kz, ky, kx = _bin_index(D, d), _bin_index(H, h), _bin_index(W, w)
    plane = h * w * C
    inplane = ((ky[:, None] * w + kx[None, :]) * C).astype(np.int64)
    counts = np.zeros((d, plane), dtype=np.int32)
    for z0 in range(0, D, chunk):
        z1 = min(D, z0 + chunk)
        zs = kz[z0:z1]
        lo, hi = int(zs[0]), int(zs[-1])
        key = (zs - lo)[:, None, None] * plane + inplane[None] + seg[z0:z1]
        counts[lo:hi + 1] += np.bincount(key.ravel(), minlength=(hi - lo + 1) * plane).reshape(hi - lo + 1, plane) \
            .astype(np.int32)
    return counts.reshape(d, h, w, C)


def resample_labels(seg: np.ndarray, size: Sequence[int], num_classes: int,
                    keep_classes: bool = True, min_volume: float = 0.5) -> np.ndarray:
    """Resample an integer label map (D,H,W) to ``size`` without losing small structures.

    Each class is resampled as a volume fraction and the class with the largest fraction wins: when
    every axis shrinks (Net1's coarse grid) by box-filter counting (:func:`binned_label_counts`, one pass
    for all classes), otherwise per class with area/linear resampling (:func:`label_fractions`). A
    structure thinner than a target voxel can lose every such vote even though it fills a sizeable part
    of some voxels, so with ``keep_classes`` every class that is present in ``seg`` with at least
    ``min_volume`` target voxels of volume, but has vanished, gets back the target voxels where its
    fraction is highest (as many as its volume).
    """
    size = tuple(int(s) for s in size)
    if tuple(seg.shape) == size:
        return np.asarray(seg, dtype=np.uint8).copy()
    if num_classes > 255:
        raise HCError(f"at most 255 classes are supported, got {num_classes}")
    seg = np.asarray(seg)
    if seg.dtype != np.uint8:
        seg = seg.astype(np.uint8)
    if all(a <= b for a, b in zip(size, seg.shape)):
        counts = binned_label_counts(seg, size, num_classes)
        out = counts.argmax(-1).astype(np.uint8)
        source_counts = counts.reshape(-1, num_classes).sum(0, dtype=np.int64) if keep_classes else None

        def fraction(c: int) -> np.ndarray:
            return (counts[..., c] / np.maximum(counts.sum(-1), 1)).ravel()
    else:
        fractions = label_fractions(seg, size, num_classes)
        out = fractions.argmax(0).astype(np.uint8)
        source_counts = torch.bincount(torch.from_numpy(np.ascontiguousarray(seg)).ravel(),
                                       minlength=num_classes).numpy() if keep_classes else None

        def fraction(c: int) -> np.ndarray:
            return fractions[c].ravel()
    if keep_classes:
        scale = float(np.prod(size)) / float(np.prod(seg.shape))  # target voxels per source voxel
        present_out = np.bincount(out.ravel(), minlength=num_classes)
        for c in range(1, num_classes):
            volume = source_counts[c] * scale
            if source_counts[c] == 0 or present_out[c] > 0 or volume < min_volume:
                continue
            frac = fraction(c)
            n = min(max(1, int(round(volume))), int(np.count_nonzero(frac)))
            if n == 0:
                continue
            best = np.argpartition(-frac, n - 1)[:n]
            out.ravel()[best] = c
    return out


# Index rules shared by the numpy (loader) and torch (predictor) partial upsampling


def linear_source_weights(positions: np.ndarray, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0, i1`` and the weight of ``i1`` for output positions of a linear resize
    (PyTorch's half-pixel rule, ``align_corners=False``), in float64: the one definition behind the
    step-4 loader's and the predictor's partial trilinear upsampling."""
    scale = in_size / out_size
    src = np.maximum((np.asarray(positions, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = np.clip(src - i0, 0.0, 1.0)
    return i0, i1, w1


def clamped_indices(start: int, stop: int, size: int) -> np.ndarray:
    """Indices ``start..stop-1`` clamped to ``[0, size - 1]``: reading them replicates the edge slices."""
    return np.clip(np.arange(start, stop), 0, size - 1)


# B-spline (order 2) resampling: the baseline's probabilities back to the full grid


def _bspline2_weight(t: torch.Tensor) -> torch.Tensor:
    """The quadratic B-spline kernel beta2(t)."""
    a = t.abs()
    return torch.where(a < 0.5, 0.75 - a * a, torch.where(a < 1.5, 0.5 * (1.5 - a) ** 2, torch.zeros_like(a)))


def bspline2_matrix(positions: torch.Tensor, in_size: int, out_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(positions), in_size) matrix evaluating an order-2 B-spline (coefficients on a grid of
    ``in_size`` cells) at the centres of ``positions`` on a grid of ``out_size`` cells covering the same
    extent. Mirror boundary (as ITK and ``scipy.ndimage`` with ``mode='mirror'``); positions beyond the
    first/last coarse centre (at most half a coarse voxel) are clamped to it (nearest extrapolation)."""
    x = ((positions.double() + 0.5) * (in_size / out_size) - 0.5).clamp(0.0, in_size - 1.0)
    m = torch.zeros((positions.numel(), in_size), dtype=torch.float64, device=positions.device)
    rows = torch.arange(positions.numel(), device=positions.device)
    centre = torch.floor(x + 0.5).long()
    for offset in (-1, 0, 1):
        k = centre + offset
        w = _bspline2_weight(x - k.double())
        if in_size == 1:
            k = torch.zeros_like(k)
        else:
            period = 2 * (in_size - 1)
            k = torch.remainder(k, period)
            k = torch.where(k > in_size - 1, period - k, k)
        m.index_put_((rows, k), w, accumulate=True)
    return m.to(dtype)


def bspline2_coefficients(array: np.ndarray) -> np.ndarray:
    """Order-2 B-spline coefficients (mirror boundary) of a (..., d, h, w) float array, float32."""
    lead = array.shape[:-3]
    flat = np.asarray(array, dtype=np.float64).reshape((-1,) + array.shape[-3:])
    out = np.empty(flat.shape, dtype=np.float32)
    for i, vol in enumerate(flat):
        out[i] = ndimage.spline_filter(vol, order=2, mode="mirror", output=np.float64)
    return out.reshape(lead + array.shape[-3:])


def bspline2_resample(array: np.ndarray, full_spacing: Sequence[float], full_shape: Sequence[int]) -> np.ndarray:
    """B-spline (order 2) resampling of a (d, h, w) float array to ``full_shape`` over the same extent.

    Both grids are cell-centred and cover the same box. Separable: after the (small) prefilter, each
    axis is one product with :func:`bspline2_matrix`. ``full_spacing`` is accepted for symmetry with
    other resamplers; only the shapes matter because both grids span the same extent.
    """
    coeffs = torch.from_numpy(bspline2_coefficients(array)[None])
    return bspline2_apply(coeffs, tuple(int(n) for n in full_shape), (0, int(full_shape[0])),
                           ((0, int(full_shape[1])), (0, int(full_shape[2]))))[0].numpy()


def bspline2_apply(coeffs: torch.Tensor, full_shape: tuple[int, int, int], z_range: tuple[int, int],
                    inplane_box: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Evaluate coefficients (C, d, h, w) on output slices ``z_range`` and the in-plane box: (C, L, Hb, Wb)."""
    dev = coeffs.device
    _, d, h, w = coeffs.shape
    mz = bspline2_matrix(torch.arange(*z_range, device=dev), d, full_shape[0])
    my = bspline2_matrix(torch.arange(*inplane_box[0], device=dev), h, full_shape[1])
    mx = bspline2_matrix(torch.arange(*inplane_box[1], device=dev), w, full_shape[2])
    out = torch.einsum("zd,cdhw->czhw", mz, coeffs)  # (C, L, h, w)
    out = torch.matmul(out, mx.t())                   # (C, L, h, Wb)
    return torch.matmul(my, out)                      # (C, L, Hb, Wb)
