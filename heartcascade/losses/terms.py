"""The loss table: the one place where the names of the training loss terms live.

A plans step lists its loss terms by name (``training.steps[].losses``, ``baseline_unet.losses``). Each
name maps to a :class:`LossTerm`: the network output it is computed on and the function computing it.
Training validates names against :data:`LOSS_TERMS` (and that the step produces the output: training/steps.py),
the trainer sums ``weight * term`` in the order the plans list them. Adding a loss means one entry here.

Outputs: ``"net1"`` (Net1's coarse logits against the labels downsampled to Net1's grid), ``"net2"``
(Net2's centre-slice logits), ``"out"`` (the baseline U-Net's logits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from heartcascade.losses.cross_entropy import cross_entropy_loss
from heartcascade.losses.dice import Weighting, foreground_dice_loss, multiclass_dice_loss
from heartcascade.utils.errors import HCError


class LossInput:
    """One output's logits and target; the float32 softmax is computed once for all terms using it."""

    def __init__(self, logits: torch.Tensor, target: torch.Tensor, dice_weighting: Weighting) -> None:
        self.logits = logits
        self.target = target
        self.dice_weighting = dice_weighting
        self._probs: torch.Tensor | None = None

    @property
    def probs(self) -> torch.Tensor:
        if self._probs is None:
            self._probs = torch.softmax(self.logits.float(), dim=1)
        return self._probs


@dataclass(frozen=True)
class LossTerm:
    """A named loss term of the plans: which output it reads and how it is computed."""

    name: str
    output: str  # "net1" | "net2" | "out"
    fn: Callable[[LossInput], torch.Tensor]


def _dice(x: LossInput) -> torch.Tensor:
    """Eq. 2: weighted multi-class soft Dice."""
    return multiclass_dice_loss(x.probs, x.target, weighting=x.dice_weighting)


def _roi(x: LossInput) -> torch.Tensor:
    """Eqs. 3-4: soft Dice of the whole foreground (the heart ROI)."""
    return foreground_dice_loss(x.probs, x.target)


def _ce(x: LossInput) -> torch.Tensor:
    """Voxel-wise cross-entropy (not in the paper; short CPU schedules converge faster with it)."""
    return cross_entropy_loss(x.logits, x.target)


#: Name -> term. L1*/CE1 on Net1, L2*/CE2 on Net2, L/CE on the baseline.
LOSS_TERMS: dict[str, LossTerm] = {t.name: t for t in (
    LossTerm("L1", "net1", _dice), LossTerm("L1_ROI", "net1", _roi), LossTerm("CE1", "net1", _ce),
    LossTerm("L2", "net2", _dice), LossTerm("L2_ROI", "net2", _roi), LossTerm("CE2", "net2", _ce),
    LossTerm("L", "out", _dice), LossTerm("CE", "out", _ce),
)}


def loss_term(name: str, where: str = "plans") -> LossTerm:
    """The term named ``name``; HCError listing the known names otherwise."""
    if name not in LOSS_TERMS:
        raise HCError(f"{where} has unknown loss {name!r}; known: {', '.join(LOSS_TERMS)}")
    return LOSS_TERMS[name]


def total_loss(names: list[str], weights: dict[str, float],
               outputs: dict[str, tuple[torch.Tensor, torch.Tensor]],
               dice_weighting: Weighting) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``sum(weight * term)`` over ``names`` in order, and each term; ``outputs``: name -> (logits, target)."""
    inputs = {key: LossInput(logits, target, dice_weighting) for key, (logits, target) in outputs.items()}
    terms = {}
    for name in names:
        term = LOSS_TERMS[name]
        if term.output not in inputs:
            raise HCError(f"loss {name} needs the {term.output} output, which this step does not produce")
        terms[name] = term.fn(inputs[term.output])
    loss = sum(weights.get(n, 1.0) * t for n, t in terms.items())
    return loss, terms  # type: ignore[return-value]
