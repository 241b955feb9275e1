"""Net2 over a region of interest, one fully convolutional pass per z-chunk.

Net2 never pads along z: an input of ``L`` slices yields the ``L - K + 1`` centre slices, each equal to
what Net2 predicts from its own ``K``-slice window. To predict output slices ``[a, b)`` we therefore
feed input slices ``[a - m, b + m)`` with ``m = (K - 1) / 2``. Slices that fall outside the volume are
edge-replicated (clamped indices, see :mod:`heartcascade.inference.roi`); inside the volume the real
neighbouring slices are used even when they lie outside the ROI, so a chunked, ROI-restricted pass
gives the same numbers as sliding a ``K``-slice window over every slice of the whole volume.

The chunk length only trades memory for speed: results do not depend on it (tested).
"""
from __future__ import annotations

import math
from typing import Callable, Iterator, Sequence

import torch

from heartcascade.inference.roi import clamped_range
from heartcascade.utils.device import autocast

#: Net2 input for one fold: ``make_input(fold_index, z_indices) -> (1, Cin, len(z_indices), H, W)``.
InputFn = Callable[[int, torch.Tensor], torch.Tensor]

#: In-plane flips used for Net2 test-time augmentation (dims of a (N, C, D, H, W) tensor).
NET2_TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (4,), (3,), (3, 4))


def mirrored_softmax(net: torch.nn.Module, x: torch.Tensor, flips: Sequence[tuple[int, ...]],
                     amp: str = "bf16") -> torch.Tensor:
    """Sum over ``flips`` of ``softmax(net(flip(x)))`` flipped back (float32); ``amp``: the plans' autocast."""
    total = None
    for dims in flips:
        xin = torch.flip(x, dims) if dims else x
        with autocast(x.device, amp):
            logits = net(xin)
        probs = torch.softmax(logits.float(), dim=1)
        del logits
        if dims:
            probs = torch.flip(probs, dims)
        total = probs if total is None else total.add_(probs)
    return total


def net2_chunks(nets: Sequence[torch.nn.Module], make_input: InputFn, z_range: tuple[int, int], depth: int,
                K: int, chunk: int, tta: bool = False, amp: str = "bf16") -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(a, b, probs)`` for consecutive chunks ``[a, b)`` of ``z_range``.

    ``probs`` is Net2's softmax averaged over ``nets`` (folds) and, with ``tta``, over the in-plane
    mirrorings: a float32 tensor (C, b - a, H, W) on the networks' device. ``depth`` is the number of
    slices of the whole volume (indices beyond it are edge-replicated).
    """
    if K < 1 or K % 2 != 1:
        raise ValueError(f"Net2 K must be odd, got {K}")
    margin = (K - 1) // 2
    chunk = max(1, int(chunk))
    flips = NET2_TTA_FLIPS if tta else ((),)
    z0, z1 = z_range
    for a in range(z0, z1, chunk):
        b = min(a + chunk, z1)
        z_idx = clamped_range(a - margin, b + margin, depth)
        total = None
        for i, net in enumerate(nets):
            x = make_input(i, z_idx)
            probs = mirrored_softmax(net, x, flips, amp)
            del x
            total = probs if total is None else total.add_(probs)
        total.mul_(1.0 / (len(nets) * len(flips)))
        yield a, b, total[0]
        del total


#: Safety factor on :func:`estimate_bytes` (the estimate is within ~20% of measured CPU peaks).
SAFETY = 1.25


def estimate_bytes_per_slice(net2: torch.nn.Module, in_plane: Sequence[int], in_channels: int,
                             bytes_per_value: int = 4) -> int:
    """Peak activation memory of Net2 (no autograd) per *output* slice for an (H, W) window.

    Per resolution level about five feature maps of the level's width are alive at once (a conv's
    input and output, the skip kept for the expansive path, the concatenation); level ``l`` has
    ``1/4**l`` of the pixels. Checked against measured CPU peaks and the planner's memory model
    (demo widths 8/16/32: 300 B per pixel and slice, measured 305; paper widths 32..256: 1236,
    measured 1019).
    """
    widths = list(getattr(net2, "widths", [32, 64, 128, 256]))
    area = int(in_plane[0]) * int(in_plane[1])
    values = in_channels + sum(5.0 * w / 4 ** level for level, w in enumerate(widths))
    return int(math.ceil(values * area * bytes_per_value))


def estimate_bytes(net2: torch.nn.Module, chunk: int, in_plane: Sequence[int], in_channels: int,
                   bytes_per_value: int = 4) -> int:
    """Peak memory of one Net2 pass producing ``chunk`` slices: ``(chunk + 1)`` output-slice
    equivalents (the K - 1 extra input slices only live in the first layers and cost less than one
    output slice in all measured configurations), times :data:`SAFETY`."""
    per_slice = estimate_bytes_per_slice(net2, in_plane, in_channels, bytes_per_value)
    return int(SAFETY * per_slice * (int(chunk) + 1))


def auto_z_chunk(net2: torch.nn.Module, in_plane: Sequence[int], in_channels: int, budget_bytes: float,
                 num_slices: int, bytes_per_value: int = 4) -> int:
    """Largest chunk of output slices whose Net2 pass fits ``budget_bytes`` (at least 1)."""
    per_slice = estimate_bytes_per_slice(net2, in_plane, in_channels, bytes_per_value)
    chunk = int(budget_bytes // (SAFETY * per_slice)) - 1
    return max(1, min(int(num_slices), chunk))
