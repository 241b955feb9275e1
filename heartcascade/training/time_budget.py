"""Training within a wall-clock budget: how many iterations each curriculum step gets.

The budget (``hc_train --time-budget 60m``, else the plans' ``training.time_budget_s``; the run's own option,
saved in its checkpoints, never written into the plans) is divided between
the steps by their ``time_fraction``; the share of a step is decided when it starts, from what is left,
so a step that ran short or long moves time to or from the later ones. Inside a step the iteration
speed is measured on the first iterations (``probe``) and re-measured at every epoch end, together with
the cost of the periodic validations, and the step's iteration count is set so that the step ends at
its deadline. The learning-rate schedule reads that count, so a poly decay reaches zero on time.

The clock is injectable so the arithmetic is tested without sleeping.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from heartcascade.planning.plans import StepPlan
from heartcascade.utils.errors import HCError

_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``"60m"``, ``"1.5h"``, ``"900s"`` or a plain number of seconds."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", str(text).lower())
        if not match or match.group(2) not in _UNITS:
            raise HCError(f"--time-budget: cannot read {text!r}; use e.g. 60m, 1.5h or 900s")
        value = float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value) or value <= 0:
        raise HCError(f"--time-budget must be a positive duration, got {text!r}")
    return value


def step_learning_rate(base: float, iteration: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate of a step's ``iteration`` (0-based): linear warm-up, then constant or poly decay."""
    if warmup > 0 and iteration < warmup:
        return base * (iteration + 1) / warmup
    if schedule == "poly":
        progress = (iteration - warmup) / max(1, total - warmup)
        return base * max(0.0, 1.0 - progress) ** 0.9
    return base


def step_allotment(remaining_s: float, step: str, remaining_steps: Sequence[str],
                   fractions: Mapping[str, float]) -> float:
    """Seconds for ``step`` out of ``remaining_s``, in proportion to the fractions of the steps still to run."""
    total = sum(max(0.0, float(fractions.get(s, 0.0))) for s in remaining_steps)
    if total <= 0:
        return remaining_s / max(1, len(remaining_steps))
    return remaining_s * max(0.0, float(fractions.get(step, 0.0))) / total


@dataclass
class StepSchedule:
    """The iteration count of one step under a deadline (or the plans' fixed count without one).

    ``iterations`` is what the loop runs to; :meth:`update` re-estimates it from measured times.
    """

    planned: int                      # the plans' iteration count (used when there is no deadline)
    allotted_s: float | None = None   # this step's share of the budget; None = no budget
    probe: int = 10                   # iterations measured before the first estimate
    min_iterations: int = 1
    clock: Callable[[], float] = time.monotonic
    spent_s: float = 0.0              # seconds of this step already used (kept across a resume)
    iterations: int = field(init=False)
    _start: float = field(init=False)
    _train_s: float = field(init=False, default=0.0)
    _train_its: int = field(init=False, default=0)
    _val_s: float = field(init=False, default=0.0)
    _val_n: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self._start = self.clock() - self.spent_s
        if self.allotted_s is None:
            self.iterations = self.planned
        else:  # until measured: the probe, then at least the minimum
            self.iterations = max(self.probe, self.min_iterations)

    @property
    def budgeted(self) -> bool:
        return self.allotted_s is not None

    def elapsed(self) -> float:
        return self.clock() - self._start

    def remaining(self) -> float:
        return float("inf") if self.allotted_s is None else self.allotted_s - self.elapsed()

    def record_iterations(self, count: int, seconds: float) -> None:
        self._train_its += count
        self._train_s += seconds

    def record_validation(self, seconds: float) -> None:
        self._val_n += 1
        self._val_s += seconds

    def seconds_per_iteration(self) -> float | None:
        return self._train_s / self._train_its if self._train_its else None

    def update(self, done: int, iterations_per_validation: int) -> int:
        """Re-estimate ``iterations`` after ``done`` iterations; returns it.

        The remaining time pays for the remaining iterations and for one validation every
        ``iterations_per_validation`` of them (plus the closing one).
        """
        if self.allotted_s is None or self._train_its < min(self.probe, max(1, done)):
            return self.iterations
        per_it = self.seconds_per_iteration() or 0.0
        per_val = self._val_s / self._val_n if self._val_n else 0.0
        left = self.remaining() - per_val  # the closing validation
        cost = per_it + per_val / max(1, iterations_per_validation)
        more = int(left // cost) if cost > 0 and left > 0 else 0
        self.iterations = max(done + more, self.min_iterations, done)
        return self.iterations

    def out_of_time(self) -> bool:
        """True once the step's deadline has passed (the loop then ends the step at once)."""
        return self.allotted_s is not None and self.remaining() <= 0

    def state(self) -> dict[str, float | int | None]:
        return {"planned": self.planned, "allotted_s": self.allotted_s, "spent_s": self.elapsed(),
                "iterations": self.iterations}


def time_fractions(steps: Mapping[str, StepPlan]) -> dict[str, float]:
    """Budget shares of the steps: their ``time_fraction`` or, when one is unset, planned iterations."""
    if all(s.time_fraction is not None for s in steps.values()):
        return {n: float(s.time_fraction) for n, s in steps.items()}  # type: ignore[arg-type]
    return {n: float(s.planned_iterations) for n, s in steps.items()}


def step_schedule(steps: Mapping[str, StepPlan], probe: int, remaining_steps: Sequence[str], left_s: float | None,
                  budget_state: Mapping[str, Any] | None) -> StepSchedule:
    """The schedule of ``remaining_steps[0]``: its iteration count is the trainer's state, not the plans'.

    ``steps``: the run's steps by name; ``probe``: the plans' ``training.budget_probe_iterations``; ``left_s``:
    budget seconds left for the remaining steps (None: no budget, the plans' count); ``budget_state``: the
    schedule's state when resumed inside the step.
    """
    st = steps[remaining_steps[0]]
    if left_s is None:
        return StepSchedule(planned=st.planned_iterations)
    if budget_state is not None:  # resumed inside this step
        schedule = StepSchedule(planned=st.planned_iterations, allotted_s=budget_state["allotted_s"],
                                probe=probe, spent_s=float(budget_state["spent_s"]))
        schedule.iterations = int(budget_state["iterations"])
    else:
        remaining = list(remaining_steps)
        allotted = step_allotment(left_s, remaining[0], remaining, time_fractions({n: steps[n] for n in remaining}))
        schedule = StepSchedule(planned=st.planned_iterations, allotted_s=max(0.0, allotted), probe=probe)
    return schedule
