"""Voxel-wise cross-entropy, an optional companion to the paper's soft Dice terms.

Not part of the paper's Table 1. Soft Dice with inverse-count class weights gives a weak, noisy
gradient while every class Dice is still near zero (a class with a handful of voxels in a patch
dominates the weights), so a short schedule spends most of its iterations getting started; a
cross-entropy term gives every voxel a gradient from the first iteration. Presets opt in through a
step's ``losses`` ("CE1", "CE2", "CE"); the paper preset does not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from heartcascade.utils.errors import HCError


def cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, C, *spatial) against labels (N, *spatial) / (N, 1, *spatial)
    or a float one-hot (soft) target shaped like the logits; computed in float32."""
    logits = logits.float()
    if target.is_floating_point() and target.shape == logits.shape:
        return -(target.float() * F.log_softmax(logits, dim=1)).sum(1).mean()
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise HCError(f"cross-entropy target must be labels {(logits.shape[0], *logits.shape[2:])}, "
                      f"got {tuple(target.shape)}")
    return F.cross_entropy(logits, target.round().long() if target.is_floating_point() else target.long())
