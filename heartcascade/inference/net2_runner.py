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
from heartcascade.inference.tta import IDENTITY, View, summed_softmax

#: Net2 input for one fold: ``make_input(fold_index, z_indices) -> (1, Cin, len(z_indices), H, W)``.
InputFn = Callable[[int, torch.Tensor], torch.Tensor]

def net2_chunks(nets: Sequence[torch.nn.Module], make_input: InputFn, z_range: tuple[int, int], depth: int,
                K: int, chunk: int, views_: Sequence[View] = IDENTITY,
                amp: str = "bf16") -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(a, b, probs)`` for consecutive chunks ``[a, b)`` of ``z_range``.

    ``probs`` is Net2's softmax averaged over ``nets`` (folds) and the test-time ``views_``
    (:mod:`heartcascade.inference.tta`): a float32 tensor (C, b - a, H, W) on the networks' device.
    ``depth`` is the number of slices of the whole volume (indices beyond it are edge-replicated).
    """
    if K < 1 or K % 2 != 1:
        raise ValueError(f"Net2 K must be odd, got {K}")
    margin = (K - 1) // 2
    chunk = max(1, int(chunk))
    z0, z1 = z_range
    for a in range(z0, z1, chunk):
        b = min(a + chunk, z1)
        z_idx = clamped_range(a - margin, b + margin, depth)
        total = None
        for i, net in enumerate(nets):
            x = make_input(i, z_idx)
            probs = summed_softmax(net, x, views_, amp)
            del x
            total = probs if total is None else total.add_(probs)
        total.mul_(1.0 / (len(nets) * len(views_)))
        yield a, b, total[0]
        del total
