"""Soft Dice losses of the paper (eqs. 1-4), hard Dice for validation (``losses/dice.py``) and an
optional cross-entropy term (``losses/cross_entropy.py``)."""
from heartcascade.losses.cross_entropy import cross_entropy_loss
from heartcascade.losses.dice import (
    DEFAULT_EPS,
    dice_scores_hard,
    foreground_dice_loss,
    inverse_count_weights,
    multiclass_dice_loss,
    soft_dice_per_class,
    to_onehot,
)

__all__ = [
    "cross_entropy_loss",
    "DEFAULT_EPS",
    "dice_scores_hard",
    "foreground_dice_loss",
    "inverse_count_weights",
    "multiclass_dice_loss",
    "soft_dice_per_class",
    "to_onehot",
]
