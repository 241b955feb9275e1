"""Soft Dice losses of the paper (eqs. 1-4) and hard Dice for validation; see ``losses/dice.py``."""
from heartcascade.losses.dice import (
    DEFAULT_EPS,
    DiceLoss,
    dice_scores_hard,
    foreground_dice_loss,
    foreground_dice_loss_from_logits,
    inverse_count_weights,
    multiclass_dice_loss,
    multiclass_dice_loss_from_logits,
    soft_dice_per_class,
    to_onehot,
)

__all__ = [
    "DEFAULT_EPS",
    "DiceLoss",
    "dice_scores_hard",
    "foreground_dice_loss",
    "foreground_dice_loss_from_logits",
    "inverse_count_weights",
    "multiclass_dice_loss",
    "multiclass_dice_loss_from_logits",
    "soft_dice_per_class",
    "to_onehot",
]
