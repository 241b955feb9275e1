"""Sliding-window inference for whole-volume networks (the baseline U-Net on volumes too big for one pass).

Tiles of ``patch`` overlap by ``overlap`` (a fraction of the patch edge); each tile's softmax (averaged
over the test-time ``views_``, :mod:`heartcascade.inference.tta`) is blended with a Gaussian weight of
``sigma_scale`` times the patch edge, so tile borders, where the network sees least context, count least.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from heartcascade.inference.tta import View, summed_softmax
from heartcascade.networks.blocks import pad_to_multiple


def gaussian_weights(patch: Sequence[int], device: torch.device, sigma_scale: float = 1.0 / 8) -> torch.Tensor:
    """Blending weights of a tile: a Gaussian of ``sigma_scale`` times each edge, 1 at the centre."""
    grids = torch.meshgrid(*[torch.arange(p, dtype=torch.float32, device=device) for p in patch], indexing="ij")
    w = torch.ones(tuple(patch), device=device)
    for g, p in zip(grids, patch):
        sigma = p * sigma_scale
        w = w * torch.exp(-0.5 * ((g - (p - 1) / 2) / sigma) ** 2)
    w = w / w.max()
    return w.clamp_(min=1e-3)


def sliding_window_softmax(net: torch.nn.Module, x: torch.Tensor, patch: Sequence[int], divisor: int,
                           views_: Sequence[View], overlap: float = 0.5,
                           sigma_scale: float = 1.0 / 8, amp: str = "bf16") -> torch.Tensor:
    """Gaussian-weighted average of the softmax over tiles of ``patch`` overlapping by ``overlap``."""
    patch = [int(math.ceil(p / divisor) * divisor) for p in patch]
    shape = list(x.shape[2:])
    if any(s < p for s, p in zip(shape, patch)):
        x = F.pad(x, [0, max(0, patch[2] - shape[2]), 0, max(0, patch[1] - shape[1]), 0, max(0, patch[0] - shape[0])],
                  mode="replicate")
    x = pad_to_multiple(x, divisor)
    full = list(x.shape[2:])
    starts = []
    for s, p in zip(full, patch):
        n = max(1, int(math.ceil((s - p) / (p * (1 - overlap)))) + 1)
        starts.append(sorted({int(round(i * (s - p) / max(n - 1, 1))) for i in range(n)}))
    weight = gaussian_weights(patch, x.device, sigma_scale)
    total = torch.zeros((1, net.num_classes) + tuple(full), device=x.device)
    norm = torch.zeros(tuple(full), device=x.device)
    for z in starts[0]:
        for y in starts[1]:
            for w in starts[2]:
                sl = (slice(z, z + patch[0]), slice(y, y + patch[1]), slice(w, w + patch[2]))
                tile = x[(slice(None), slice(None)) + sl]
                acc = summed_softmax(net, tile, views_, amp)
                total[(slice(None), slice(None)) + sl] += acc / len(views_) * weight
                norm[sl] += weight
    total /= norm
    return total[:, :, :shape[0], :shape[1], :shape[2]]
