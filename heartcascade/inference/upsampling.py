"""Net1's coarse probabilities read at full-resolution positions: the one trilinear rule of the cascade.

Net2 sees Net1's softmax upsampled to the full-resolution grid. It is never built whole: the predictor
reads it on index lists (:func:`upsample_at`, separable, for the windows it runs Net2 on) and training
step 4 reads it at the positions a random in-plane transform maps each output voxel to
(:func:`upsample_at_points`, on the training device after the loader worker handed over those
positions). Both follow PyTorch's ``F.interpolate(..., mode='trilinear', align_corners=False)``
(:func:`heartcascade.preprocessing.resampling.linear_source_weights`), so at unaugmented voxels the
training input equals the inference input up to float rounding.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from heartcascade.preprocessing.resampling import linear_source_weights


def take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` via advanced indexing (index_select along an inner axis is ~50x
    slower on the CPU in torch 2.x)."""
    return x[(slice(None),) * dim + (idx,)]


def _linear_weights(positions: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of ``F.interpolate(..., mode='linear', align_corners=False)``: the
    rule of :func:`heartcascade.preprocessing.resampling.linear_source_weights` (float64), on the device."""
    i0, i1, w1 = linear_source_weights(positions.cpu().numpy(), in_size, out_size)
    dev = positions.device
    return torch.from_numpy(i0).to(dev), torch.from_numpy(i1).to(dev), torch.from_numpy(w1).to(dev)


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
    a = take(coarse, 2, z0)
    out = a + (take(coarse, 2, z1) - a) * wz                                 # (N, C, L, h, w)
    mx = interpolation_matrix(ix, coarse.shape[4], int(full_shape[2]), coarse.dtype)
    out = torch.matmul(out, mx.t())                                          # (N, C, L, h, Wout)
    my = interpolation_matrix(iy, coarse.shape[3], int(full_shape[1]), coarse.dtype)
    return torch.matmul(my, out)                                             # (N, C, L, Hout, Wout)


def upsample_at_points(coarse: torch.Tensor, full_shape: Sequence[int], points: torch.Tensor,
                       outside_class: int = 0) -> torch.Tensor:
    """``coarse`` (C, d, h, w) upsampled trilinearly to ``full_shape`` and read at ``points``.

    ``points`` (3, *S): full-resolution (z, y, x) positions, any real values; NaN marks a position
    outside the image, which gets the one-hot probability of ``outside_class`` (what padding is at
    inference). Returns float32 (C, *S). Positions are mapped to the coarse grid with the half-pixel
    rule and clamped to it, exactly as :func:`upsample_at` does at integer positions; only the coarse
    box the points touch is converted to float32, so a float16 case volume is never copied whole.
    """
    device = coarse.device
    num_classes = coarse.shape[0]
    pts = points.reshape(3, -1).to(device=device, dtype=torch.float32)
    outside = torch.isnan(pts).any(0)
    grid, box = [], []
    for a in range(3):
        n, f = int(coarse.shape[a + 1]), int(full_shape[a])
        src = ((pts[a] + 0.5) * (n / f) - 0.5).clamp(0.0, n - 1)
        src = torch.where(outside, torch.zeros_like(src), src)
        inside_src = torch.where(outside, torch.full_like(src, float(n - 1)), src)
        lo, hi = int(inside_src.min().floor()), int(src.max().ceil())
        box.append((lo, max(lo, hi) + 1))
        grid.append((src - lo).clamp_min(0.0))
    sub = coarse[:, box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]].float()
    # grid_sample with align_corners=True reads pixel p at 2 p / (size - 1) - 1; a size-1 axis at 0.
    norm = [g * (2.0 / (sub.shape[a + 1] - 1)) - 1.0 if sub.shape[a + 1] > 1 else torch.zeros_like(g)
            for a, g in enumerate(grid)]
    grid_t = torch.stack(norm[::-1], dim=-1).view(1, 1, 1, -1, 3)  # grid_sample wants (x, y, z)
    values = F.grid_sample(sub[None], grid_t, mode="bilinear", padding_mode="border",
                           align_corners=True).view(num_classes, -1)
    onehot = torch.zeros((num_classes, 1), dtype=values.dtype, device=device)
    onehot[outside_class] = 1.0
    return torch.where(outside, onehot, values).view(num_classes, *points.shape[1:])
