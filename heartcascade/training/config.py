"""The trainer's view of the plans: :class:`TrainingConfig` / :class:`StepConfig`, built from the typed
plans (:func:`heartcascade.planning.plans.parse_plans`) and nothing else.

Every value comes from the plans' sections; there are no defaults here (the planner writes every field,
:func:`~heartcascade.planning.plans.upgrade_plans` fills older plans). What this module adds is what the
planning stage cannot check: loss names against the loss table and the outputs of each step's batches.
See documentation/plans.md for the fields and documentation/training.md for how they are used.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from heartcascade.losses.terms import LOSS_TERMS, loss_term
from heartcascade.planning.augmentation_plan import AugmentationParams
from heartcascade.planning.curriculum import STEP_INPUT_KINDS, STEP_NUMBERS
from heartcascade.planning.plans import Plans, StepPlan, as_plans, check_override_keys
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import parse_json
from heartcascade.utils.merge import deep_merge

__all__ = ["deep_merge"]  # re-exported: overrides are merged with the same rule as presets

#: The curriculum's steps (paper Table 1: planning/curriculum.py; losses and trained networks are in the plans).
CASCADE_STEPS = tuple(str(n) for n in STEP_NUMBERS)
BASELINE_STEP = "baseline"
#: The network outputs each batch kind produces (the losses of a step must read one of them).
KIND_OUTPUTS = {"coarse_volume": ("net1",), "subvolume": ("net1", "net2"), "slices": ("net2",),
                BASELINE_STEP: ("out",)}


@dataclass
class StepConfig:
    """One curriculum step (or the baseline's single stage)."""

    name: str  # "1".."4" or "baseline"
    kind: str  # coarse_volume | subvolume | slices
    epochs: int
    iterations_per_epoch: int
    batch_size: int
    lr: float
    losses: list[str]
    train: list[str]  # subset of net1, net2 (cascade) or [baseline]
    patch_shapes: list[tuple[int, int, int]]
    loss_weights: dict[str, float]
    weight_decay: float
    time_fraction: float | None  # share of training.time_budget_s (None: by planned iterations)
    iterations_override: int | None = None  # set by the time budget once the step's speed is measured

    @property
    def planned_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    @property
    def iterations(self) -> int:
        return self.planned_iterations if self.iterations_override is None else self.iterations_override


@dataclass
class TrainingConfig:
    configuration: str
    num_classes: int
    image_channels: int
    class_names: list[str]
    steps: dict[str, StepConfig]
    augmentation: AugmentationParams
    num_workers: int | None
    num_threads: int | None  # CPU intra-op threads of training (None: decided at the start, session.training_threads)
    checkpoint_every: int  # iterations; 0 = use checkpoint_every_epochs
    checkpoint_every_epochs: int
    validate_every_epochs: int
    val_max_cases: int | None
    ema_momentum: float
    grad_clip: float | None
    amp: str
    K: int
    net2_divisor: int
    net1_divisor: int
    baseline_spacing: tuple[float, float, float]
    baseline_divisor: int
    seed: int
    background_as_class: bool
    warmup_iterations: int
    dice_weighting: str
    classifier_bias_init: str
    class_fractions: list[float] | None
    lr_schedule: str  # per step: constant | poly (warm-up first, then (1 - t)^0.9 to zero)
    keep_best_per_step: bool  # end each step with its best-validated weights
    time_budget_s: float | None  # wall-clock budget of the whole curriculum (None: plans' counts)
    budget_probe_iterations: int

    def time_fractions(self, names: list[str]) -> dict[str, float]:
        """Budget shares of the steps: their ``time_fraction`` or, when one is unset, planned iterations."""
        steps = [self.steps[n] for n in names]
        if all(s.time_fraction is not None for s in steps):
            return {s.name: float(s.time_fraction) for s in steps}  # type: ignore[arg-type]
        return {s.name: float(s.planned_iterations) for s in steps}


# --------------------------------------------------------------------------------------------------
# Plans overrides


def parse_override(text: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A plans override given as a JSON object, a path to a JSON file, or already a dict."""
    if text is None:
        return None
    if isinstance(text, Mapping):
        return normalise_override(dict(text), "plans override")
    candidate = Path(text)
    source = "--plans-override"
    if not text.lstrip().startswith("{") and candidate.is_file():
        source = str(candidate)
        text = candidate.read_text(encoding="utf-8")
    value = parse_json(text, source)
    if not isinstance(value, dict):
        raise HCError(f"{source}: must be a JSON object, e.g. '{{\"training\": {{...}}}}'")
    return normalise_override(value, source)


def normalise_override(value: dict[str, Any], source: str = "--plans-override") -> dict[str, Any]:
    """Accept ``training.steps`` as ``{"2": {...}}`` as well as the plans' list ``[{"step": 2, ...}]``; every key
    must be a plans field (an unknown one is a one-line HCError naming it)."""
    steps = (value.get("training") or {}).get("steps") if isinstance(value.get("training"), Mapping) else None
    if isinstance(steps, Mapping):
        value = copy.deepcopy(value)
        try:
            value["training"]["steps"] = [{**dict(v), "step": int(k)} for k, v in steps.items()]
        except (TypeError, ValueError):
            raise HCError("plans override: training.steps keys must be step numbers 1..4") from None
    check_override_keys(value, source)
    return value


# --------------------------------------------------------------------------------------------------
# Reading (field names: documentation/plans.md; the planner writes them, planning/planner.py)


def _losses(names: Sequence[str], kind: str, where: str) -> list[str]:
    """Loss names resolved through the loss table; each must read an output the step's batches produce."""
    losses = [loss_term(str(x), f"plans: {where}.losses").name for x in names]
    wrong = [n for n in losses if LOSS_TERMS[n].output not in KIND_OUTPUTS[kind]]
    if wrong:
        raise HCError(f"plans: {where}.losses {wrong} read an output this step does not produce "
                      f"(it produces {', '.join(KIND_OUTPUTS[kind])})")
    return losses


def _step(entry: StepPlan, weight_decay: float) -> StepConfig:
    where = f"training.steps[{entry.step}]"
    kind = STEP_INPUT_KINDS[entry.input]
    return StepConfig(name=str(entry.step), kind=kind, epochs=entry.epochs if entry.enabled else 0,
                      iterations_per_epoch=entry.iterations_per_epoch, batch_size=entry.batch_size, lr=entry.lr,
                      losses=_losses(entry.losses, kind, where), train=list(entry.train),
                      patch_shapes=[tuple(s) for s in entry.shapes],  # type: ignore[misc]
                      loss_weights={str(k): float(v) for k, v in (entry.loss_weights or {}).items()},
                      weight_decay=weight_decay, time_fraction=entry.time_fraction)


def training_config(plans: Plans | Mapping[str, Any], configuration: str) -> TrainingConfig:
    """Everything training needs, from the typed plans (a dict is upgraded and parsed first)."""
    p = as_plans(plans)
    tr = p.training
    steps: dict[str, StepConfig] = {}
    if configuration == "cascade":
        for entry in tr.steps:
            steps[str(entry.step)] = _step(entry, tr.weight_decay)
    elif configuration == "baseline":
        b = p.baseline_unet
        steps[BASELINE_STEP] = StepConfig(
            name=BASELINE_STEP, kind="subvolume", epochs=b.epochs, iterations_per_epoch=b.iterations_per_epoch,
            batch_size=b.batch_size, lr=b.lr, losses=_losses(b.losses, BASELINE_STEP, "baseline_unet"),
            train=["baseline"], patch_shapes=[tuple(b.patch_shape)], loss_weights={},  # type: ignore[list-item]
            weight_decay=tr.weight_decay, time_fraction=None)
    else:
        raise HCError(f"unknown configuration {configuration!r}; expected 'cascade' or 'baseline'")

    cfg = TrainingConfig(
        configuration=configuration, num_classes=p.num_classes, image_channels=p.num_input_channels,
        class_names=p.class_names, steps=steps, augmentation=p.augmentation,
        num_workers=tr.num_workers,
        num_threads=tr.num_threads,
        checkpoint_every=tr.checkpoint_interval_iterations,
        checkpoint_every_epochs=tr.checkpoint_interval_epochs,
        validate_every_epochs=tr.validation_interval_epochs,
        val_max_cases=tr.val_max_cases,
        ema_momentum=tr.ema_momentum,
        grad_clip=tr.grad_clip,
        amp=p.amp,
        K=p.net2.K,
        net2_divisor=p.net2.required_divisor,
        net1_divisor=p.net1.required_divisor,
        baseline_spacing=tuple(p.baseline_unet.spacing),  # type: ignore[arg-type]
        baseline_divisor=2 ** p.baseline_unet.num_levels,
        seed=tr.seed,
        background_as_class=p.sampling.background_as_class,
        warmup_iterations=tr.warmup_iterations,
        dice_weighting=tr.dice_weighting,
        classifier_bias_init=tr.classifier_bias_init,
        class_fractions=None if p.fingerprint_summary.class_fractions is None
        else list(p.fingerprint_summary.class_fractions),
        lr_schedule=tr.lr_schedule,
        keep_best_per_step=tr.keep_best_per_step,
        time_budget_s=tr.time_budget_s,
        budget_probe_iterations=tr.budget_probe_iterations,
    )
    if configuration == "cascade":
        for shape in steps["3"].patch_shapes:
            if shape[0] < cfg.K or shape[1] % cfg.net2_divisor or shape[2] % cfg.net2_divisor:
                raise HCError(f"plans: training.steps[3] subvolume {list(shape)} must have D >= K={cfg.K} and H, W "
                              f"divisible by {cfg.net2_divisor} (Net2)")
    return cfg


def checkpoint_interval(cfg: TrainingConfig, step: StepConfig) -> int:
    """Iterations between ``checkpoint_latest`` saves for a step."""
    if cfg.checkpoint_every > 0:
        return cfg.checkpoint_every
    return max(1, cfg.checkpoint_every_epochs * step.iterations_per_epoch)
