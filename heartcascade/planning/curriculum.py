"""The paper's curriculum (Table 1): the four training steps, defined once.

The planner writes one ``training.steps`` entry per row (``planning/planner.py``,
:func:`~heartcascade.planning.planner.curriculum_steps`); training picks each step's runner by the entry's
``input`` (``training/steps.py``). documentation/plans.md (``training``) and documentation/training.md
describe the steps.

Vocabulary: a *step* is one row (1..4). Its ``input`` (``whole_coarse_volume``, ``subvolumes``,
``slice_stacks``) names what its batches hold, in the plans, in training and in the benchmark's records.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CurriculumStep:
    """One row of the curriculum."""

    step: int  #: 1..4 (``training.steps[].step``)
    name: str  #: ``training.steps[].name``
    train: tuple[str, ...]  #: networks updated
    frozen: tuple[str, ...]  #: networks run but kept fixed (what ``train`` leaves out; not written to the plans)
    losses: tuple[str, ...]  #: the paper's losses; a preset step's ``losses`` replaces them
    input: str  #: ``training.steps[].input``: what the step's batches hold (its step runner)


CURRICULUM_STEPS: tuple[CurriculumStep, ...] = (
    CurriculumStep(1, "net1_whole_volume", ("net1",), (), ("L1_ROI",), "whole_coarse_volume"),
    CurriculumStep(2, "net1_subvolumes", ("net1",), (), ("L1", "L1_ROI"), "subvolumes"),
    CurriculumStep(3, "cascade_subvolumes", ("net1", "net2"), (), ("L1", "L2"), "subvolumes"),
    CurriculumStep(4, "net2_slice_stacks", ("net2",), ("net1",), ("L2",), "slice_stacks"),
)

#: The step numbers, in order.
STEP_NUMBERS: tuple[int, ...] = tuple(s.step for s in CURRICULUM_STEPS)


def curriculum_step(step: int | str) -> CurriculumStep:
    """The curriculum row of step ``step`` (1..4, or its string); KeyError for any other."""
    for row in CURRICULUM_STEPS:
        if str(row.step) == str(step):
            return row
    raise KeyError(step)
