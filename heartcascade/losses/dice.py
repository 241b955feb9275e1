"""Soft Dice losses of the paper (eqs. 1-4) and a hard Dice for validation.

Conventions: probabilities/logits are (N, C, D, H, W); a target is either labels (N, D, H, W) or
(N, 1, D, H, W) (integer, or float holding whole numbers), or a float one-hot / soft target shaped
like the probabilities. Half-precision inputs are upcast to float32 so a bf16 autocast forward still gets
an accurate loss. Training reaches these through the loss table (:mod:`heartcascade.losses.terms`), which
computes the float32 softmax of the logits once for all terms.

eq. 1  S_c   = (2 * sum(p_c * g_c) + eps) / (sum(p_c) + sum(g_c) + eps)
eq. 2  L     = 1 - sum_c w_c S_c, with w_c proportional to 1 / N_c (N_c = voxels of class c in the
               target) and normalised so that sum_c w_c = 1. The printed eq. 2 (sum_c S_c / N_c) is not
               bounded to [0, 1]; the normalised inverse-count weighting is what it intends. Classes with
               N_c = 0 get w_c = 0 (their Dice is undefined: only eps / (sum p + eps)); their false
               positives are still penalised because they take probability mass from the true class.
               If no class has voxels the loss is 0.
eq. 3-4 L_ROI = 1 - S(1 - p_background, 1 - g_background): Dice of the foreground (whole heart),
               obtained by reversing the background channel.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from heartcascade.utils.errors import HCError

Weighting = Union[str, torch.Tensor, None]

DEFAULT_EPS = 1e-5


def to_onehot(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels (N, D, H, W) or (N, 1, D, H, W) -> float one-hot (N, C, D, H, W)."""
    if target.dim() == 5 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 4:
        raise HCError(f"label target must be (N, D, H, W) or (N, 1, D, H, W), got {tuple(target.shape)}")
    onehot = F.one_hot(target.long(), num_classes)  # (N, D, H, W, C)
    return onehot.permute(0, 4, 1, 2, 3).float()


def _as_onehot(target: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Accept labels or one-hot; return a float one-hot with the shape of ``probs``."""
    if target.is_floating_point() and target.shape == probs.shape:
        return target.to(probs.dtype)
    label_shape = (probs.shape[0], *probs.shape[2:])
    if target.dtype == torch.bool or tuple(target.shape) not in (label_shape, (probs.shape[0], 1, *probs.shape[2:])):
        raise HCError(
            f"target must be labels {label_shape} or a one-hot shaped like the prediction "
            f"{tuple(probs.shape)}, got {target.dtype} {tuple(target.shape)}"
        )
    # integer labels, or float labels as data loaders often store them
    return to_onehot(target.round().long() if target.is_floating_point() else target, probs.shape[1]).to(probs.dtype)


def soft_dice_per_class(
    probs: torch.Tensor, target: torch.Tensor, eps: float = DEFAULT_EPS, batch_dice: bool = True
) -> torch.Tensor:
    """Soft Dice S_c of eq. 1 for each class: shape (C,) if ``batch_dice`` else (N, C).

    ``batch_dice`` sums over the whole batch (one Dice per class), which is steadier for small patches
    where a class may be missing from one sample.
    """
    g = _as_onehot(target, probs)
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    inter = (probs * g).sum(dims)
    denom = probs.sum(dims) + g.sum(dims)
    return (2.0 * inter + eps) / (denom + eps)


def inverse_count_weights(target_onehot: torch.Tensor, batch_dice: bool = True) -> torch.Tensor:
    """Eq. 2 weights: w_c = (1/N_c) / sum_{N_k>0} (1/N_k), and 0 for classes absent from the target.

    Shape (C,) if ``batch_dice`` else (N, C); rows with no voxels at all are all zero.
    """
    dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
    counts = target_onehot.detach().float().sum(dims)
    inv = torch.where(counts > 0, 1.0 / counts.clamp_min(1e-12), torch.zeros_like(counts))
    total = inv.sum(-1, keepdim=True)
    return torch.where(total > 0, inv / total.clamp_min(1e-30), torch.zeros_like(inv))


def _upcast(probs: torch.Tensor) -> torch.Tensor:
    """Half-precision sums over a whole patch lose too many digits; compute those in float32."""
    return probs.float() if probs.dtype in (torch.float16, torch.bfloat16) else probs


def _weights(weighting: Weighting, g: torch.Tensor, batch_dice: bool) -> torch.Tensor:
    if weighting is None or (isinstance(weighting, str) and weighting == "uniform"):
        # Uniform over the classes present in the target (same empty-class rule as eq. 2).
        dims = (0, 2, 3, 4) if batch_dice else (2, 3, 4)
        present = (g.detach().sum(dims) > 0).float()
        return present / present.sum(-1, keepdim=True).clamp_min(1.0)
    if isinstance(weighting, str):
        if weighting != "inverse_count":
            raise HCError(f"unknown Dice weighting {weighting!r}; expected 'inverse_count', 'uniform' or a tensor")
        return inverse_count_weights(g, batch_dice)
    w = weighting.to(device=g.device, dtype=torch.float32)
    if w.shape != (g.shape[1],):
        raise HCError(f"explicit Dice weights must have shape ({g.shape[1]},), got {tuple(w.shape)}")
    return w / w.sum().clamp_min(1e-12)


def multiclass_dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    weighting: Weighting = "inverse_count",
    eps: float = DEFAULT_EPS,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Eq. 2: ``1 - sum_c w_c S_c`` on probabilities; a scalar in [0, 1].

    ``weighting``: 'inverse_count' (eq. 2, weights from the target batch), 'uniform' (mean over the
    classes present) or an explicit (C,) tensor (normalised to sum 1, used as given).
    """
    probs = _upcast(probs)
    g = _as_onehot(target, probs)
    dice = soft_dice_per_class(probs, g, eps, batch_dice)
    w = _weights(weighting, g, batch_dice).expand_as(dice)
    # A target with no labelled voxel (all weights 0) scores 0 and is left out of the mean.
    valid = w.sum(-1) > 0
    loss = torch.where(valid, 1.0 - (w * dice).sum(-1), torch.zeros_like(dice[..., 0]))
    if batch_dice:
        return loss
    return loss.sum() / valid.sum().clamp_min(1)


def foreground_dice_loss(
    probs: torch.Tensor,
    target: torch.Tensor,
    background_index: int = 0,
    eps: float = DEFAULT_EPS,
    batch_dice: bool = True,
) -> torch.Tensor:
    """Eqs. 3-4 (L_ROI): 1 - soft Dice of foreground = reversed background, on probabilities."""
    probs = _upcast(probs)
    g = _as_onehot(target, probs)
    fg_p = 1.0 - probs[:, background_index:background_index + 1]
    fg_g = 1.0 - g[:, background_index:background_index + 1]
    loss = 1.0 - soft_dice_per_class(fg_p, fg_g, eps, batch_dice)[..., 0]
    return loss if batch_dice else loss.mean()


@torch.no_grad()
def dice_scores_hard(
    pred_labels: torch.Tensor, target_labels: torch.Tensor, num_classes: int,
    empty_value: float = float("nan"),
) -> torch.Tensor:
    """Hard Dice per class (C,) between two integer label maps of the same shape.

    A class absent from both prediction and target gets ``empty_value`` (NaN by default, so
    ``nanmean`` skips it instead of counting a meaningless perfect score).
    """
    if pred_labels.shape != target_labels.shape:
        raise HCError(f"label maps differ in shape: {tuple(pred_labels.shape)} vs {tuple(target_labels.shape)}")
    p = pred_labels.reshape(-1).long()
    t = target_labels.reshape(-1).long()
    inter = torch.bincount(t[p == t], minlength=num_classes)[:num_classes].double()
    n_p = torch.bincount(p, minlength=num_classes)[:num_classes].double()
    n_t = torch.bincount(t, minlength=num_classes)[:num_classes].double()
    denom = n_p + n_t
    return torch.where(
        denom > 0, 2.0 * inter / denom.clamp_min(1.0), torch.full_like(denom, empty_value)
    ).float()
