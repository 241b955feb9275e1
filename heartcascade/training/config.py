"""The trainer's view of the plans: one place that reads the training-related plans fields.

Everything the trainer needs is turned into :class:`TrainingConfig` / :class:`StepConfig` here, so the
rest of the training package never indexes the plans dict directly. Field names and defaults are those
documented in documentation/plans.md; see documentation/training.md for how they are used.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from heartcascade.losses.terms import LOSS_TERMS, loss_term
from heartcascade.model import from_plans
from heartcascade.planning.curriculum import CURRICULUM_STEPS, STEP_INPUT_KINDS
from heartcascade.training.augmentation import AugmentationParams
from heartcascade.utils.errors import HCError
from heartcascade.utils.merge import deep_merge

__all__ = ["deep_merge"]  # re-exported: overrides are merged with the same rule as presets

#: The paper's curriculum (Table 1, defined in planning/curriculum.py) by step name "1".."4".
CURRICULUM = {str(row.step): row for row in CURRICULUM_STEPS}
CASCADE_STEPS = tuple(CURRICULUM)
BASELINE_STAGE = "baseline"
#: The network outputs each batch kind produces (the losses of a step must read one of them).
KIND_OUTPUTS = {"coarse_volume": ("net1",), "subvolume": ("net1", "net2"), "slices": ("net2",),
                BASELINE_STAGE: ("out",)}
DEFAULT_LR = 1e-4


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
    patch_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    loss_weights: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    time_fraction: float | None = None  # share of training.time_budget_s (None: by planned iterations)
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
    num_workers: int | None = None
    num_threads: int | None = None  # CPU intra-op threads of training (None: CPUs left by the loader workers)
    checkpoint_every: int = 0  # iterations; 0 = use checkpoint_every_epochs
    checkpoint_every_epochs: int = 1
    validate_every_epochs: int = 1
    val_max_cases: int | None = None
    ema_momentum: float = 0.9
    grad_clip: float | None = 12.0
    amp: str = "bf16"
    K: int = 1
    net2_divisor: int = 1
    net1_divisor: int = 16
    baseline_spacing: tuple[float, float, float] | None = None
    baseline_divisor: int = 16
    net2_chunk: int = 16
    seed: int = 0
    background_as_class: bool = True
    warmup_iterations: int = 0
    dice_weighting: str = "inverse_count"
    classifier_bias_init: str = "zero"
    class_fractions: list[float] | None = None
    lr_schedule: str = "constant"  # per step: constant | poly (warm-up first, then (1 - t)^0.9 to zero)
    keep_best_per_step: bool = False  # end each step with its best-validated weights
    time_budget_s: float | None = None  # wall-clock budget of the whole curriculum (None: plans' counts)
    budget_probe_iterations: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

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
        return normalise_override(dict(text))
    candidate = Path(text)
    source = "--plans-override"
    if not text.lstrip().startswith("{") and candidate.is_file():
        source = str(candidate)
        text = candidate.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise HCError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise HCError(f"{source}: must be a JSON object, e.g. '{{\"training\": {{...}}}}'")
    return normalise_override(value)


def normalise_override(value: dict[str, Any]) -> dict[str, Any]:
    """Accept ``training.steps`` as ``{"2": {...}}`` as well as the plans' list ``[{"step": 2, ...}]``."""
    steps = (value.get("training") or {}).get("steps") if isinstance(value.get("training"), Mapping) else None
    if isinstance(steps, Mapping):
        value = copy.deepcopy(value)
        try:
            value["training"]["steps"] = [{**dict(v), "step": int(k)} for k, v in steps.items()]
        except (TypeError, ValueError):
            raise HCError("plans override: training.steps keys must be step numbers 1..4") from None
    return value


# --------------------------------------------------------------------------------------------------
# Reading (field names: documentation/plans.md; the planner writes them, planning/planner.py)

def _losses(names: Sequence[Any], kind: str, where: str) -> list[str]:
    """Loss names resolved through the loss table; each must read an output the step's batches produce."""
    losses = [loss_term(str(x), f"plans: {where}.losses").name for x in names]
    wrong = [n for n in losses if LOSS_TERMS[n].output not in KIND_OUTPUTS[kind]]
    if wrong:
        raise HCError(f"plans: {where}.losses {wrong} read an output this step does not produce "
                      f"(it produces {', '.join(KIND_OUTPUTS[kind])})")
    return losses


def _shape(value: Any, where: str) -> tuple[int, int, int]:
    if isinstance(value, (int, float)):
        return (int(value),) * 3
    if isinstance(value, Sequence) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value):
        shape = tuple(int(v) for v in value)
        if min(shape) < 1:
            raise HCError(f"plans: {where} has a non-positive size: {list(shape)}")
        return shape  # type: ignore[return-value]
    raise HCError(f"plans: {where} must be [d, h, w], got {value!r}")


def _number(entry: Mapping[str, Any], key: str, default: Any, where: str, kind: type = int) -> Any:
    value = entry.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise HCError(f"plans: {where}.{key} must be a number, got {value!r}") from None


def _step_from_plans(entry: Mapping[str, Any], default_lr: float, default_wd: float, where: str) -> StepConfig:
    name = str(entry.get("step"))
    curriculum = CURRICULUM[name]
    kind = STEP_INPUT_KINDS.get(str(entry.get("input")), curriculum.kind)
    epochs = _number(entry, "epochs", 1, where)
    ipe = _number(entry, "iterations_per_epoch", 250, where)
    batch = _number(entry, "batch_size", curriculum.batch_size, where)
    lr = _number(entry, "lr", default_lr, where, float)
    if epochs < 0 or ipe < 1 or batch < 1 or lr <= 0:
        raise HCError(f"plans: {where}: need epochs >= 0, iterations_per_epoch >= 1, batch_size >= 1, lr > 0 "
                      f"(got {epochs}, {ipe}, {batch}, {lr})")
    if not entry.get("enabled", True):
        epochs = 0
    losses = _losses(entry.get("losses", curriculum.losses), kind, where)
    train = [str(x) for x in entry.get("train", curriculum.train)]
    unknown = sorted(set(train) - {"net1", "net2"})
    if unknown:
        raise HCError(f"plans: {where}.train names unknown network(s) {unknown}")
    if kind == "coarse_volume":
        shapes = [_shape(entry["patch_shape"], f"{where}.patch_shape")] if entry.get("patch_shape") else []
    elif kind == "slices":
        shapes = [_shape(entry["stack_shape"], f"{where}.stack_shape")] if entry.get("stack_shape") else []
    else:
        raw = entry.get("subvolume_shapes")
        if not raw:
            raise HCError(f"plans: {where} needs 'subvolume_shapes' (the subvolume edge sizes)")
        shapes = [_shape(s, f"{where}.subvolume_shapes") for s in raw]
    fraction = entry.get("time_fraction")
    if fraction is not None:
        fraction = _number(entry, "time_fraction", None, where, float)
        if not (0 <= fraction <= 1):
            raise HCError(f"plans: {where}.time_fraction must be between 0 and 1, got {fraction}")
    return StepConfig(name=name, kind=kind, epochs=epochs, iterations_per_epoch=ipe, batch_size=batch, lr=lr,
                      losses=losses, train=train, patch_shapes=shapes,
                      loss_weights={str(k): float(v) for k, v in (entry.get("loss_weights") or {}).items()},
                      weight_decay=_number(entry, "weight_decay", default_wd, where, float), time_fraction=fraction)


def training_config(plans: Mapping[str, Any], configuration: str) -> TrainingConfig:
    """Read everything training needs from ``plans`` (HCError naming the field when it is wrong)."""
    section = plans.get("training")
    if not isinstance(section, Mapping):
        raise HCError("plans: 'training' section missing")
    ncls = from_plans.num_classes(plans)
    nimg = from_plans.image_channels(plans)
    labels = plans.get("labels") or {}
    by_value = {int(v): str(k) for k, v in labels.items()} if isinstance(labels, Mapping) else {}
    names = [by_value.get(i, str(i)) for i in range(ncls)]
    default_lr = _number(section, "lr", DEFAULT_LR, "training", float)
    default_wd = _number(section, "weight_decay", 0.0, "training", float)
    steps: dict[str, StepConfig] = {}
    if configuration == "cascade":
        entries = section.get("steps")
        if not isinstance(entries, list):
            raise HCError("plans: training.steps must be a list of the four step entries")
        for entry in entries:
            if not isinstance(entry, Mapping) or str(entry.get("step")) not in CASCADE_STEPS:
                raise HCError(f"plans: training.steps entries need 'step' 1..4, got {entry!r}"[:200])
            name = str(entry["step"])
            steps[name] = _step_from_plans(entry, default_lr, default_wd, f"training.steps[{name}]")
        missing = [s for s in CASCADE_STEPS if s not in steps]
        if missing:
            raise HCError(f"plans: training.steps lacks step(s) {', '.join(missing)}")
    elif configuration == "baseline":
        base = plans.get("baseline_unet")
        if not isinstance(base, Mapping):
            raise HCError("plans: 'baseline_unet' section missing (re-run hc_plan_and_preprocess)")
        entry = {"step": BASELINE_STAGE, "epochs": base.get("epochs", 1),
                 "iterations_per_epoch": base.get("iterations_per_epoch", 250),
                 "batch_size": base.get("batch_size", 2), "lr": base.get("lr", default_lr),
                 "weight_decay": base.get("weight_decay", default_wd), "losses": base.get("losses", ["L"])}
        where = "baseline_unet"
        epochs = _number(entry, "epochs", 1, where)
        ipe = _number(entry, "iterations_per_epoch", 250, where)
        batch = _number(entry, "batch_size", 2, where)
        lr = _number(entry, "lr", default_lr, where, float)
        if epochs < 0 or ipe < 1 or batch < 1 or lr <= 0:
            raise HCError(f"plans: {where}: need epochs >= 0, iterations_per_epoch >= 1, batch_size >= 1, lr > 0")
        if not base.get("patch_shape"):
            raise HCError("plans: baseline_unet.patch_shape missing")
        losses = _losses(entry["losses"], BASELINE_STAGE, where)
        steps[BASELINE_STAGE] = StepConfig(
            name=BASELINE_STAGE, kind="subvolume", epochs=epochs, iterations_per_epoch=ipe, batch_size=batch, lr=lr,
            losses=losses, train=["baseline"], patch_shapes=[_shape(base["patch_shape"], f"{where}.patch_shape")],
            weight_decay=_number(entry, "weight_decay", default_wd, where, float))
    else:
        raise HCError(f"unknown configuration {configuration!r}; expected 'cascade' or 'baseline'")

    aug = AugmentationParams.from_dict(plans.get("augmentation"))
    net2 = plans.get("net2") or {}
    base = plans.get("baseline_unet") or {}
    inference = plans.get("inference") or {}
    cfg = TrainingConfig(
        configuration=configuration, num_classes=ncls, image_channels=nimg, class_names=names, steps=steps,
        augmentation=aug,
        num_workers=section.get("num_workers"),
        num_threads=_threads(section.get("num_threads")),
        checkpoint_every=int(section.get("checkpoint_interval_iterations", 0) or 0),
        checkpoint_every_epochs=int(section.get("checkpoint_interval_epochs", 1) or 1),
        validate_every_epochs=int(section.get("validation_interval_epochs", 1) or 1),
        val_max_cases=section.get("val_max_cases"),
        ema_momentum=float(section.get("ema_momentum", 0.9)),
        grad_clip=section.get("grad_clip", 12.0),
        amp=str(section.get("amp", "bf16")),
        K=int(net2.get("K", 1)),
        net2_divisor=int(net2.get("required_divisor", 2 ** int(net2.get("num_levels", 0)))),
        net1_divisor=int((plans.get("net1") or {}).get("required_divisor", 16)),
        baseline_spacing=tuple(float(s) for s in base["spacing"]) if base.get("spacing") else None,
        baseline_divisor=2 ** int(base.get("num_levels", 4)),
        net2_chunk=int(inference.get("z_chunk") or 16),
        seed=int(section.get("seed", 0)),
        background_as_class=bool((plans.get("sampling") or {}).get("background_as_class", True)),
        warmup_iterations=int(section.get("warmup_iterations", 0) or 0),
        dice_weighting=str(section.get("dice_weighting", "inverse_count")),
        classifier_bias_init=str(section.get("classifier_bias_init", "zero")),
        class_fractions=(plans.get("fingerprint_summary") or {}).get("class_fractions"),
        lr_schedule=str(section.get("lr_schedule", "constant")),
        keep_best_per_step=bool(section.get("keep_best_per_step", False)),
        time_budget_s=_budget(section.get("time_budget_s")),
        budget_probe_iterations=max(1, int(section.get("budget_probe_iterations", 10) or 10)),
    )
    for name, allowed in (("lr_schedule", ("constant", "poly")), ("classifier_bias_init", ("zero", "class_prior")),
                          ("dice_weighting", ("inverse_count", "uniform")), ("amp", ("bf16", "fp16", "none"))):
        value = getattr(cfg, name)
        if value not in allowed:
            raise HCError(f"plans: training.{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}")
    if configuration == "cascade":
        for shape in steps["3"].patch_shapes:
            if shape[0] < cfg.K or shape[1] % cfg.net2_divisor or shape[2] % cfg.net2_divisor:
                raise HCError(f"plans: training.steps[3] subvolume {list(shape)} must have D >= K={cfg.K} and H, W "
                              f"divisible by {cfg.net2_divisor} (Net2)")
    if configuration == "baseline" and cfg.baseline_spacing is None:
        raise HCError("plans: baseline_unet.spacing (the baseline's resampling spacing) is missing")
    return cfg


def _threads(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HCError(f"plans: training.num_threads must be a positive integer or null, got {value!r}")
    return value


def _budget(value: Any) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise HCError(f"plans: training.time_budget_s must be a number of seconds or null, got {value!r}") from None
    if not seconds > 0:
        raise HCError(f"plans: training.time_budget_s must be positive, got {value!r}")
    return seconds


def checkpoint_interval(cfg: TrainingConfig, step: StepConfig) -> int:
    """Iterations between ``checkpoint_latest`` saves for a step."""
    if cfg.checkpoint_every > 0:
        return cfg.checkpoint_every
    return max(1, cfg.checkpoint_every_epochs * step.iterations_per_epoch)
