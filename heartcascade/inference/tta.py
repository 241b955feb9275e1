"""Test-time augmentation: the views a network is run on, and its softmax brought back to the input's frame.

A view mirrors some tensor dims and may swap the two in-plane dims. Mirrorings of both in-plane dims
together with the swap give the eight quarter turns and reflections of the axial plane, which a model
trained with full-circle in-plane rotation and in-plane mirroring has seen; mirrorings alone give four.
Every network pass of the predictor (Net1, Net2, the baseline whole or tile by tile) goes through
:func:`summed_softmax`, so one rule decides what test-time augmentation means.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from heartcascade.networks.blocks import crop_to_shape, pad_to_multiple
from heartcascade.utils.device import autocast


@dataclass(frozen=True)
class View:
    """One test-time view: ``flips`` (tensor dims of ``(N, C, D, H, W)``), then the in-plane swap."""
    flips: tuple[int, ...] = ()
    swap_in_plane: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.flips:
            x = torch.flip(x, self.flips)
        if self.swap_in_plane:
            channels_last = x.is_contiguous(memory_format=torch.channels_last_3d)
            x = x.transpose(-2, -1)
            # keep the layout the predictor chose for the networks (channels-last is faster on the CPU)
            x = x.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        return x

    def undo(self, probs: torch.Tensor) -> torch.Tensor:
        if self.swap_in_plane:
            probs = probs.transpose(-2, -1)
        if self.flips:
            probs = torch.flip(probs, self.flips)
        return probs


#: No test-time augmentation: the input as it is.
IDENTITY: tuple[View, ...] = (View(),)


def views(flip_dims: Sequence[int], quarter_turns: bool = False) -> tuple[View, ...]:
    """Every combination of mirroring ``flip_dims`` (none first), each also with the in-plane swap when
    ``quarter_turns``; with both in-plane dims among ``flip_dims`` that is all eight quarter turns and
    reflections of the axial plane."""
    dims = sorted(int(d) for d in flip_dims)
    combos = [c for r in range(len(dims) + 1) for c in itertools.combinations(dims, r)]
    swaps = (False, True) if quarter_turns else (False,)
    return tuple(View(tuple(c), s) for s in swaps for c in combos)


def summed_softmax(net: torch.nn.Module, x: torch.Tensor, views_: Sequence[View], amp: str = "bf16",
                   divisor: int | Sequence[int] = 1) -> torch.Tensor:
    """Sum over ``views_`` of ``softmax(net(view(x)))`` brought back to ``x``'s frame (float32).

    Returns the sum, not the mean, so callers divide once after adding folds too (the same arithmetic
    whatever the number of folds). With ``divisor`` > 1 each view is padded at its end to that multiple
    and the output cropped back to the view's shape (whole-volume networks); networks that change the
    shape (Net2 consumes slices) are called with ``divisor=1`` on inputs that already fit.
    """
    pad = divisor != 1 and (not isinstance(divisor, Sequence) or any(int(d) != 1 for d in divisor))
    total = None
    for view in views_:
        xin = view.apply(x)
        shape = xin.shape[2:]
        if pad:
            xin = pad_to_multiple(xin, divisor)
        with autocast(x.device, amp):
            logits = net(xin)
        if pad:
            logits = crop_to_shape(logits, shape)
        probs = torch.softmax(logits.float(), dim=1)
        del logits
        probs = view.undo(probs)
        total = probs if total is None else total.add_(probs)
    return total
