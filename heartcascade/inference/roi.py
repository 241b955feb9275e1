"""The dynamic tile: the region of interest Net2 runs on, and exact partial trilinear upsampling.

Net1 sees the whole coarse volume; its foreground bounding box, mapped to the full-resolution grid
and grown by a safety margin, is the only region Net2 has to look at. Everything outside is
background. All boxes here are in the canonical full-resolution grid ``(D, H, W)`` (slice axis
first) and are half-open: ``((z0, z1), (y0, y1), (x0, x1))``.

Padding is expressed with *clamped index lists*: to read a window that extends past the volume we
gather with indices clamped to ``[0, size - 1]``, which is edge replication. One ``index_select`` per
axis therefore crops and pads at once, and the same index lists drive :func:`upsample_at`, so Net1's
upsampled output never has to exist at full resolution outside the window being processed.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(s)) for s in shape)  # type: ignore[return-value]


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(int(b - a) for a, b in box)  # type: ignore[return-value]


def box_slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in box)  # type: ignore[return-value]


def foreground_box(mask: torch.Tensor | np.ndarray) -> Box | None:
    """Bounding box of the non-zero voxels of a 3D mask, or None when it is empty."""
    m = torch.as_tensor(mask) != 0
    if not bool(m.any()):
        return None
    box = []
    for axis in range(3):
        hi, lo = sorted((a for a in range(3) if a != axis), reverse=True)
        hits = torch.nonzero(m.any(dim=hi).any(dim=lo)).flatten()
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def coarse_box_to_full(box: Box, coarse_shape: Sequence[int], full_shape: Sequence[int]) -> Box:
    """Full-resolution voxels covered by a box of coarse voxels (grids aligned at their outer edges).

    With the pixel-centre convention of trilinear ``align_corners=False`` resampling, coarse voxel
    ``i`` covers full-resolution positions ``[i * s, (i + 1) * s)`` with ``s = full / coarse``.
    """
    out = []
    for (a, b), c, f in zip(box, coarse_shape, full_shape):
        s = f / c
        out.append((max(0, int(math.floor(a * s))), min(int(f), int(math.ceil(b * s)))))
    return tuple(out)  # type: ignore[return-value]


def grow_box(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels per axis on both sides, clipped to the volume."""
    return tuple((max(0, a - int(m)), min(int(s), b + int(m)))
                 for (a, b), m, s in zip(box, margin, shape))  # type: ignore[return-value]


def round_up_inside(box: Box, multiple: Sequence[int], shape: Sequence[int]) -> Box:
    """Grow each axis of ``box`` to a multiple of ``multiple`` where the volume allows, kept centred.

    Net2 needs in-plane sizes divisible by its divisor. Growing the ROI with real image voxels is
    better than padding; only when the whole axis is shorter than the rounded size does the window
    stay at the full axis (the caller pads by replication).
    """
    out = []
    for (a, b), m, s in zip(box, multiple, shape):
        m = max(1, int(m))
        want = int(math.ceil((b - a) / m) * m)
        if want >= s:
            out.append((0, int(s)))
            continue
        extra = want - (b - a)
        a2 = a - extra // 2
        a2 = min(max(0, a2), int(s) - want)
        out.append((a2, a2 + want))
    return tuple(out)  # type: ignore[return-value]


def clamped_range(start: int, stop: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices ``start..stop-1`` clamped to ``[0, size - 1]`` (edge replication beyond the volume)."""
    return torch.arange(start, stop, device=device).clamp_(0, size - 1)


def padded_range(start: int, length: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``length`` indices from ``start``, clamped: pads a window shorter than ``length`` by replication."""
    return clamped_range(start, start + length, size, device)


def gather(volume: torch.Tensor, indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``volume[..., iz, :, :][..., iy, :][..., ix]`` for a tensor (..., D, H, W) and three index lists."""
    out = volume
    for axis, idx in enumerate(indices):
        dim = out.dim() - 3 + axis
        if idx.numel() == out.shape[dim] and bool((idx == torch.arange(out.shape[dim], device=idx.device)).all()):
            continue
        out = _take(out, dim, idx.to(out.device))
    return out


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` via advanced indexing (index_select along an inner axis is ~50x
    slower on the CPU in torch 2.x)."""
    return x[(slice(None),) * dim + (idx,)]


def _linear_weights(positions: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of ``F.interpolate(..., mode='linear', align_corners=False)``."""
    scale = in_size / out_size
    src = ((positions.double() + 0.5) * scale - 0.5).clamp_(min=0.0)
    i0 = src.floor().long().clamp_(max=in_size - 1)
    i1 = (i0 + 1).clamp_(max=in_size - 1)
    w1 = (src - i0.double()).clamp_(0.0, 1.0)
    return i0, i1, w1


def interpolation_matrix(positions: torch.Tensor, in_size: int, out_size: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(len(positions), in_size) matrix of 1D linear interpolation weights (``align_corners=False``)."""
    i0, i1, w1 = _linear_weights(positions, in_size, out_size)
    m = torch.zeros((positions.numel(), in_size), dtype=torch.float64, device=positions.device)
    rows = torch.arange(positions.numel(), device=positions.device)
    m.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.to(dtype)


def upsample_at(coarse: torch.Tensor, full_shape: Sequence[int], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Trilinear upsampling of ``coarse`` (N, C, d, h, w) to ``full_shape``, evaluated only at ``indices``.

    Equals ``F.interpolate(coarse, size=full_shape, mode='trilinear', align_corners=False)`` gathered
    at the three index lists (up to float rounding), without ever building the full-size tensor.
    Trilinear interpolation is separable: z is interpolated first on the small coarse tensor (gather
    and lerp), then each in-plane axis is one matrix product with its interpolation matrix, which is
    fast on CPU and GPU alike.
    """
    device = coarse.device
    iz, iy, ix = (idx.to(device) for idx in indices)
    z0, z1, wz = _linear_weights(iz, coarse.shape[2], int(full_shape[0]))
    wz = wz.to(coarse.dtype).view(1, 1, -1, 1, 1)
    a = _take(coarse, 2, z0)
    out = a + (_take(coarse, 2, z1) - a) * wz                               # (N, C, L, h, w)
    mx = interpolation_matrix(ix, coarse.shape[4], int(full_shape[2]), coarse.dtype)
    out = torch.matmul(out, mx.t())                                          # (N, C, L, h, Wout)
    my = interpolation_matrix(iy, coarse.shape[3], int(full_shape[1]), coarse.dtype)
    return torch.matmul(my, out)                                             # (N, C, L, Hout, Wout)
