"""One object per configuration -- the cascade, the baseline U-Net -- holding what differs between them in
training, so the session and the trainer ask the model instead of testing the configuration's name.

A model object owns its networks (built from the plans, under the run's seed; keyed as in checkpoints),
the runner of each of its steps (:mod:`heartcascade.training.steps`), which networks a step trains, what
its validations score, and the grid its training cases are on. Its steps come from the plans
(:meth:`heartcascade.planning.plans.Plans.training_steps`); its prediction is the predictor's, built
from the same networks (:mod:`heartcascade.training.validation`).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from heartcascade.model import from_plans
from heartcascade.planning.curriculum import STEP_NUMBERS
from heartcascade.planning.plans import BASELINE_STEP, Plans, StepPlan
from heartcascade.training.cases import baseline_grid_case
from heartcascade.training.dataloading import TrainCase
from heartcascade.training.steps import RUNNERS, BaselineRunner, StepRunner
from heartcascade.utils.errors import HCError

#: The curriculum's steps (paper Table 1: planning/curriculum.py; losses and trained networks are in the plans).
CASCADE_STEPS = tuple(str(n) for n in STEP_NUMBERS)


class TrainingModel:
    """The networks of one configuration and what its training steps need from them."""

    name: ClassVar[str]
    #: the steps a run trains by default, in order
    default_steps: ClassVar[tuple[str, ...]]
    #: ``hc_train --steps`` picks among :attr:`default_steps`
    selectable_steps: ClassVar[bool]
    #: a ``checkpoint_after_step<n>.pth`` after every step (e.g. Net1 alone, for ablations)
    step_checkpoints: ClassVar[bool]

    module: nn.Module
    networks: dict[str, nn.Module]  # checkpoint keys -> networks

    @staticmethod
    def training_cases(cases: list[TrainCase], plans: Plans) -> list[TrainCase]:
        """The training cases on the grid this model trains on (the preprocessed grid)."""
        return cases

    def runner(self, plans: Plans, step: StepPlan) -> StepRunner:
        raise NotImplementedError

    def select(self, step: StepPlan) -> None:
        """Make the networks ``step`` trains trainable and freeze the others."""

    def train(self) -> None:
        """Training mode for every network (after a validation put them in eval mode)."""
        self.module.train()

    def validation_target(self, step: str) -> str:
        """What validations during ``step`` score: ``net1`` (Net1 alone), ``cascade`` or ``baseline``."""
        raise NotImplementedError


class CascadeModel(TrainingModel):
    """Net1 + Net2 (paper Fig. 1), trained in the four curriculum steps."""

    name = "cascade"
    default_steps = CASCADE_STEPS
    selectable_steps = True
    step_checkpoints = True

    def __init__(self, plans: Plans, device: torch.device) -> None:
        self.module = from_plans.build_cascade(plans).to(device)
        self.networks = {"net1": self.module.net1, "net2": self.module.net2}

    def runner(self, plans: Plans, step: StepPlan) -> StepRunner:
        return RUNNERS[step.input](plans, step, {"cascade": self.module})

    def select(self, step: StepPlan) -> None:
        self.module.set_trainable("net1" in step.train, "net2" in step.train)

    def validation_target(self, step: str) -> str:
        return "cascade" if step in ("3", "4") else "net1"


class BaselineModel(TrainingModel):
    """The plain 3D U-Net of the paper's comparison, one step on its own (coarser) grid."""

    name = "baseline"
    default_steps = (BASELINE_STEP,)
    selectable_steps = False
    step_checkpoints = False

    def __init__(self, plans: Plans, device: torch.device) -> None:
        self.module = from_plans.build_baseline(plans).to(device)
        self.networks = {"baseline": self.module}

    @staticmethod
    def training_cases(cases: list[TrainCase], plans: Plans) -> list[TrainCase]:
        return [baseline_grid_case(c, plans.baseline_unet.spacing, plans.num_classes) for c in cases]

    def runner(self, plans: Plans, step: StepPlan) -> StepRunner:
        return BaselineRunner(plans, step, {"baseline": self.module})

    def validation_target(self, step: str) -> str:
        return "baseline"


MODELS: dict[str, type[TrainingModel]] = {m.name: m for m in (CascadeModel, BaselineModel)}


def model_class(configuration: str) -> type[TrainingModel]:
    """The model class of ``configuration``; a one-line HCError for an unknown one."""
    if configuration not in MODELS:
        raise HCError(f"unknown configuration {configuration!r}; expected {' or '.join(MODELS)}")
    return MODELS[configuration]
