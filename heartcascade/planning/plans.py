"""The plans file (``plans.json``): the one, complete, validated configuration of a dataset's model.

On disk (and inside checkpoints) the plans are a plain JSON dict: humans read and occasionally edit them,
and a dict round-trips through JSON and checkpoints without custom classes. It has two parts: ``settings``,
what the planner chose and a user may override (``--plans-override`` merges into it), and ``report``, what the
planner recorded beside them (fingerprint summary, memory target and estimates, the planning machine, widths
for humans), which no override touches. :func:`split_plans` makes the two from the planner's sections, by
:data:`REPORT`. In memory there is one form:
:class:`Plans`, made once where the plans enter -- :func:`load_plans` (a file), :func:`parse_plans` (a
checkpoint's or the planner's dict) -- and passed everywhere. Parsing checks every section once -- types,
ranges, and *no unknown key anywhere* -- into frozen, typed sections (:class:`Net1Plan`, :class:`Net2Plan`,
:class:`TrainingPlan` / :class:`StepPlan`, :class:`SamplingPlan`, :class:`InferencePlan`,
:class:`BaselinePlan`, ...) whose fields carry the JSON's own names; consumers read those, never the dict
(``Plans.to_dict()`` gives it back for files and checkpoints); the settings are the fields of
:class:`Plans`, the records its :attr:`Plans.report`. The planner writes every field that takes
effect (no hidden defaults later), and nothing that has none. Every field is documented in
``documentation/plans.md``.

Plans of another schema version are refused with a one-line error (re-plan with ``--overwrite``).

Accessors (in the spirit of nnU-Net's PlansManager): a configuration's training steps
(:meth:`Plans.training_steps`), the networks' keyword arguments (:func:`net1_kwargs`, :func:`net2_kwargs`,
:func:`baseline_kwargs`, :func:`cascade_kwargs`), what preprocessing follows (:func:`preprocess_settings`)
and the hash of the preprocessing-relevant fields (:func:`preprocessing_hash`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from heartcascade.networks.net2 import NET2_INPUT_MODES  # one vocabulary: plans, networks, inference
from heartcascade.planning.augmentation_plan import AugmentationParams
from heartcascade.preprocessing.preprocess import PREPROCESSING_VERSION, PreprocessSettings
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json
from heartcascade.utils.merge import deep_merge

PLANS_VERSION = 3
PLANS_FILE = "plans.json"

#: ``inference.roi_rule`` values: the ROI from the heart's connected component(s) of Net1's whole-heart
#: probability, every Net1 foreground voxel, or the whole volume (Net2 everywhere: rule 12 for MR-sized cases).
ROI_RULES = ("heart_components", "all_foreground", "whole_volume")
#: ``amp``: mixed precision of training and inference on CUDA (the CPU always computes in float32).
AMP_MODES = ("bf16", "fp16", "none")
#: The name of the baseline U-Net's configuration and of its single training step.
BASELINE_STEP = "baseline"
STEP_INPUTS = {1: "whole_coarse_volume", 2: "subvolumes", 3: "subvolumes", 4: "slice_stacks"}
NORMALIZATION_SCHEMES = ("ct_clip", "percentile_clip")


class _Bad(Exception):
    """A field's value is wrong (message completed with the file and field by :func:`_section`)."""


# --------------------------------------------------------------------------------------------------
# Field checks: value -> the typed value (tuples for lists), or _Bad


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise _Bad(f"must be an integer, got {v!r}")
        if lo is not None and v < lo:
            raise _Bad(f"must be >= {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise _Bad(f"must be <= {hi}, got {v!r}")
        return int(v)
    return check


def _num(lo: float | None = None, hi: float | None = None, open_lo: bool = False) -> Callable[[Any], float]:
    def check(v: Any) -> float:
        if not _is_num(v):
            raise _Bad(f"must be a number, got {v!r}")
        if lo is not None and (v < lo or (open_lo and v == lo)):
            raise _Bad(f"must be {'>' if open_lo else '>='} {lo}, got {v!r}")
        if hi is not None and v > hi:
            raise _Bad(f"must be <= {hi}, got {v!r}")
        return float(v)
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, got {v!r}")
    return v


def _str(choices: tuple[str, ...] | None = None) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise _Bad(f"must be a string, got {v!r}")
        if choices is not None and v not in choices:
            raise _Bad(f"must be one of {', '.join(choices)}, got {v!r}")
        return v
    return check


def _opt(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda v: None if v is None else inner(v)


def _list(inner: Callable[[Any], Any], length: int | None = None, nonempty: bool = False) -> Callable[[Any], tuple]:
    def check(v: Any) -> tuple:
        if not isinstance(v, (list, tuple)):
            raise _Bad(f"must be a list, got {v!r}")
        if length is not None and len(v) != length:
            raise _Bad(f"must have {length} entries, got {list(v)!r}")
        if nonempty and not v:
            raise _Bad("must not be empty")
        return tuple(inner(x) for x in v)
    return check


def _object(v: Any) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise _Bad(f"must be an object, got {v!r}")
    return copy.deepcopy(dict(v))


def _any(v: Any) -> Any:
    return copy.deepcopy(v)


def _dilation(v: Any) -> int | tuple[int, int, int]:
    if isinstance(v, (list, tuple)):
        return _list(_int(1), 3)(v)  # type: ignore[return-value]
    return _int(1)(v)


#: Upper bounds of sizes and counts (far above any real plan; hostile values fail validation naming the field).
_MAX_SIDE = 2**16
_MAX_WIDTH = 2**14
_MAX_COUNT = 10**9
_SHAPE = _list(_int(1, _MAX_SIDE), 3)
_SPACING = _list(_num(0, open_lo=True), 3)


def _f(check: Callable[[Any], Any], default: Any = dataclasses.MISSING, section: type | None = None) -> Any:
    """A typed field: ``check`` converts and validates the JSON value; a default makes the field optional;
    ``section``: the value (when not null) is itself a typed section, parsed by :func:`_section`."""
    metadata = {"check": check} if section is None else {"check": check, "section": section}
    return dataclasses.field(default=default, metadata=metadata)


def _section(cls: type, data: Any, where: str, source: str, **extra: Any) -> Any:
    """``cls`` built from the JSON object ``data``: unknown keys, missing required fields and wrong values
    are one-line HCErrors naming ``source`` and the field (``where.key``)."""
    if not isinstance(data, Mapping):
        raise HCError(f"{source}: {where} must be an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}
    for key in data:
        if key not in known:
            raise HCError(f"{source}: {where} has unknown key {key!r}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise HCError(f"{source}: {where} lacks field {name!r}")
            values[name] = f.default
            continue
        try:
            values[name] = f.metadata["check"](data[name])
        except _Bad as exc:
            raise HCError(f"{source}: {where}.{name} {exc}") from None
        if f.metadata.get("section") is not None and values[name] is not None:
            values[name] = _section(f.metadata["section"], values[name], f"{where}.{name}", source)
    return cls(**values, **extra)


# --------------------------------------------------------------------------------------------------
# The typed sections (field meaning: documentation/plans.md)


@dataclass(frozen=True)
class DatasetPlan:
    name: str = _f(_str())
    id: int = _f(_int(0))
    num_training_cases: int = _f(_int(0))
    excluded_cases: dict[str, str] = _f(_object)


@dataclass(frozen=True)
class MachinePlan:
    kind: str = _f(_str(("cpu", "cuda")))
    source: str = _f(_str())
    cpu_count: int | None = _f(_opt(_int(1)))
    gpu_memory_gb: float | None = _f(_opt(_num(0)))


@dataclass(frozen=True)
class NormalizationPlan:
    channel: int = _f(_int(0))
    name: str = _f(_str())
    scheme: str = _f(_str(NORMALIZATION_SCHEMES))
    target_range: tuple[float, float] = _f(_list(_num(), 2))
    clip_low: float | None = _f(_num(), None)         # ct_clip
    clip_high: float | None = _f(_num(), None)        # ct_clip
    percentile_low: float | None = _f(_num(0, 100), None)   # percentile_clip
    percentile_high: float | None = _f(_num(0, 100), None)  # percentile_clip


@dataclass(frozen=True)
class CroppingPlan:
    method: str = _f(_str(("ct_hu_threshold", "relative_threshold")))
    margin_mm: float = _f(_num(0))


@dataclass(frozen=True)
class FullResolutionPlan:
    inplane_spacing: tuple[float, float] | None = _f(_opt(_list(_num(0, open_lo=True), 2)))
    spacing: tuple[float, float, float] = _f(_SPACING)


@dataclass(frozen=True)
class Net1Plan:
    coarse_spacing: tuple[float, float, float] = _f(_SPACING)
    patch_shape: tuple[int, int, int] = _f(_SHAPE)
    in_channels: int = _f(_int(1))
    num_classes: int = _f(_int(2))
    base_features: int = _f(_int(1, _MAX_WIDTH))
    max_features: int = _f(_int(1, _MAX_WIDTH))
    dilations: tuple[Any, ...] = _f(_list(_dilation, nonempty=True))
    bottleneck_dilation: int = _f(_int(1))
    dropout: float = _f(_num(0, 1))
    kernel_size: int = _f(_int(1))
    norm: str | None = _f(_opt(_str(("instance", "none"))))
    required_divisor: int = _f(_int(1))


@dataclass(frozen=True)
class Net2Plan:
    K: int = _f(_int(1))
    input_mode: str = _f(_str(NET2_INPUT_MODES))
    in_channels: int = _f(_int(1))
    num_classes: int = _f(_int(2))
    base_features: int = _f(_int(1, _MAX_WIDTH))
    max_features: int = _f(_int(1, _MAX_WIDTH))
    num_levels: int = _f(_int(0))
    recursions: int = _f(_int(0))
    convs_per_level: int = _f(_int(1))
    dropout: float = _f(_num(0, 1))
    expansive_kernel: int = _f(_int(1))
    required_divisor: int = _f(_int(1))
    full_slice_shape: tuple[int, int] = _f(_list(_int(1), 2))
    tiling: bool = _f(_bool)


@dataclass(frozen=True)
class StepPlan:
    step: int = _f(_int(1))
    name: str = _f(_str())
    enabled: bool = _f(_bool)
    train: tuple[str, ...] = _f(_list(_str(("net1", "net2")), nonempty=True))
    losses: tuple[str, ...] = _f(_list(_str(), nonempty=True))
    input: str = _f(_str(tuple(sorted(set(STEP_INPUTS.values())))))
    batch_size: int = _f(_int(1, _MAX_COUNT))
    epochs: int = _f(_int(0, _MAX_COUNT))
    iterations_per_epoch: int = _f(_int(1, _MAX_COUNT))
    lr: float = _f(_num(0, open_lo=True))
    time_fraction: float | None = _f(_opt(_num(0, 1)))
    patch_shape: tuple[int, int, int] | None = _f(_opt(_SHAPE), None)                   # step 1
    subvolume_shapes: tuple[tuple[int, int, int], ...] | None = _f(_opt(_list(_SHAPE, nonempty=True)), None)  # 2, 3
    coarse_patch_shapes: tuple[tuple[int, int, int], ...] | None = _f(_opt(_list(_SHAPE)), None)  # step 2
    stack_shape: tuple[int, int, int] | None = _f(_opt(_SHAPE), None)                   # step 4
    loss_weights: dict[str, float] | None = _f(_opt(_object), None)  # optional; null: every loss weighs 1

    @property
    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """The step's input shapes: its patch, subvolume shapes or stack."""
        if self.input == "whole_coarse_volume":
            return (self.patch_shape,) if self.patch_shape else ()
        if self.input == "slice_stacks":
            return (self.stack_shape,) if self.stack_shape else ()
        return self.subvolume_shapes or ()

    @property
    def planned_iterations(self) -> int:
        """The plans' count (0 when disabled); under a time budget the trainer's schedule decides the step's."""
        return self.epochs * self.iterations_per_epoch if self.enabled else 0


@dataclass(frozen=True)
class TrainingPlan:
    weight_decay: float = _f(_num(0))
    dice_weighting: str = _f(_str(("inverse_count", "uniform")))
    classifier_bias_init: str = _f(_str(("zero", "class_prior")))
    lr_schedule: str = _f(_str(("constant", "poly")))
    warmup_iterations: int = _f(_int(0))
    grad_clip: float | None = _f(_opt(_num(0, open_lo=True)))
    ema_momentum: float = _f(_num(0, 1))
    keep_best_per_step: bool = _f(_bool)
    time_budget_s: float | None = _f(_opt(_num(0, open_lo=True)))
    budget_probe_iterations: int = _f(_int(1))
    validation_interval_epochs: int = _f(_int(1))
    checkpoint_interval_epochs: int = _f(_int(1))
    checkpoint_interval_iterations: int = _f(_int(0))
    val_max_cases: int | None = _f(_opt(_int(1)))
    num_workers: int | None = _f(_opt(_int(0, 1024)))
    num_threads: int | None = _f(_opt(_int(1, 4096)))
    seed: int = _f(_int(0, 2**63 - 1))
    steps: tuple[StepPlan, ...] = dataclasses.field(default=())

    def step(self, number: int) -> StepPlan:
        for entry in self.steps:
            if entry.step == number:
                return entry
        raise HCError(f"plans have no training step {number}")

    def checkpoint_interval(self, step: StepPlan) -> int:
        """Iterations between ``checkpoint_latest`` saves in ``step`` (0 iterations: every N epochs)."""
        if self.checkpoint_interval_iterations > 0:
            return self.checkpoint_interval_iterations
        return max(1, self.checkpoint_interval_epochs * step.iterations_per_epoch)


@dataclass(frozen=True)
class SamplingPlan:
    max_locations_per_class: int = _f(_int(1))
    background_as_class: bool = _f(_bool)


@dataclass(frozen=True)
class BrighteningPlan:
    """Test-time brightening (:mod:`heartcascade.inference.brightening`): a case whose ``label`` comes out
    darker on the first pass than ``targets[channel]`` (mean on the case's normalisation window, [0, 1]) is
    scaled up on that window by a factor no higher than ``max_factor`` and predicted again; ``min_voxels`` of
    the label are needed."""
    label: int = _f(_int(1))
    targets: tuple[float, ...] = _f(_list(_num(0, 1, open_lo=True), nonempty=True))
    max_factor: float = _f(_num(1, open_lo=True))
    min_voxels: int = _f(_int(1))


@dataclass(frozen=True)
class InferencePlan:
    roi_margin_mm: float = _f(_num(0))
    roi_rule: str = _f(_str(ROI_RULES))
    roi_min_component_fraction: float = _f(_num(0, 1))
    roi_join_distance_mm: float = _f(_num(0))
    z_chunk: int | None = _f(_opt(_int(1, _MAX_SIDE)))
    max_z_chunk: int | None = _f(_opt(_int(1, _MAX_SIDE)))
    memory_budget_gb: float | None = _f(_opt(_num(0, open_lo=True)))
    roi_centre_sigma: float = _f(_num(0))  # 0 = components ranked by mass alone
    tta: bool = _f(_bool)  # mirroring test-time augmentation by default (hc_predict --tta/--disable_tta override)
    # with tta, also the in-plane quarter turns (8 in-plane views, not 4); needs training rotated in-plane >= 90
    # degrees and mirrored in-plane. The planner writes it; None = plans written before it existed (off).
    tta_quarter_turns: bool | None = _f(_opt(_bool), None)
    # two passes for cases darker than the training data (BrighteningPlan); None = off (and plans before it)
    brightening: BrighteningPlan | None = _f(_opt(_object), None, section=BrighteningPlan)


@dataclass(frozen=True)
class BaselinePlan:
    spacing: tuple[float, float, float] = _f(_SPACING)
    patch_shape: tuple[int, int, int] = _f(_SHAPE)
    batch_size: int = _f(_int(1, _MAX_COUNT))
    base_features: int = _f(_int(1, _MAX_WIDTH))
    max_features: int = _f(_int(1, _MAX_WIDTH))
    num_levels: int = _f(_int(1))
    norm: str | None = _f(_opt(_str(("instance", "none"))))
    lr: float = _f(_num(0, open_lo=True))
    epochs: int = _f(_int(0, _MAX_COUNT))
    iterations_per_epoch: int = _f(_int(1, _MAX_COUNT))
    losses: tuple[str, ...] = _f(_list(_str(), nonempty=True))

    def as_step(self) -> StepPlan:
        """The baseline's single training step, in the form of a curriculum step (input: subvolumes)."""
        return StepPlan(step=0, name=BASELINE_STEP, enabled=True, train=(BASELINE_STEP,), losses=self.losses,
                        input="subvolumes", batch_size=self.batch_size, epochs=self.epochs,
                        iterations_per_epoch=self.iterations_per_epoch, lr=self.lr, time_fraction=None,
                        subvolume_shapes=(self.patch_shape,))


@dataclass(frozen=True)
class MemoryPlan:
    target_gb: float = _f(_num(0))
    target_source: str = _f(_str())
    usable_gb: float = _f(_num())
    model: str = _f(_str())
    predicted_peak_gb: dict[str, float] = _f(_object)


@dataclass(frozen=True)
class FingerprintSummary:
    num_cases: int = _f(_int(0))
    median_spacing: tuple[float, ...] = _f(_list(_num()))
    fov_mm_p95: tuple[float, ...] = _f(_list(_num()))
    cropped_shape_p95: tuple[float, ...] = _f(_list(_num()))
    min_slices: int = _f(_int(0))
    class_fractions: tuple[float, ...] | None = _f(_opt(_list(_num(0, 1))))


@dataclass(frozen=True)
class FullResolutionReport:
    inplane_spacing_ratio: float = _f(_num(0))
    max_inplane_spacing_ratio: float = _f(_num(0))
    median_spacing: tuple[float, float, float] = _f(_SPACING)
    shape_p95: tuple[int, int, int] = _f(_list(_int(0), 3))
    min_slices: int = _f(_int(0))


@dataclass(frozen=True)
class Net1Report:
    coarse_shape_median: tuple[int, int, int] = _f(_list(_int(0), 3))
    widths: tuple[int, ...] = _f(_list(_int(1, _MAX_WIDTH)))


@dataclass(frozen=True)
class WidthsReport:
    widths: tuple[int, ...] = _f(_list(_int(1, _MAX_WIDTH)))


@dataclass(frozen=True)
class PlansReport:
    """What the planner recorded beside the settings: read-only facts (overrides cannot touch them)."""

    planner_version: int = _f(_int())
    preset: str | None = _f(_opt(_str()))
    dataset: DatasetPlan
    machine: MachinePlan
    memory: MemoryPlan
    fingerprint_summary: FingerprintSummary
    full_resolution: FullResolutionReport
    net1: Net1Report
    net2: WidthsReport
    baseline_unet: WidthsReport

    def predicted_peak_gb(self, what: str) -> float | None:
        """The memory model's peak for ``step1``..``step4``, ``inference`` or ``baseline`` (GB), if planned."""
        return self.memory.predicted_peak_gb.get(what)

    def step_peak_gb(self, step: "StepPlan") -> float | None:
        """The predicted peak of a training step (the baseline's single step included)."""
        return self.predicted_peak_gb(f"step{step.step}" if step.name != BASELINE_STEP else "baseline")


@dataclass(frozen=True)
class Plans:
    """The parsed plans: the settings, every section typed and frozen, and the planner's :attr:`report`
    (``raw`` is the validated JSON dict)."""

    modality: str = _f(_str())
    num_input_channels: int = _f(_int(1))
    channel_names: dict[str, str] = _f(_object)
    labels: dict[str, int] = _f(_object)
    num_classes: int = _f(_int(2))
    label_codes: dict[str, int] | None = _f(_opt(_object))
    amp: str = _f(_str(AMP_MODES))
    normalization: tuple[NormalizationPlan, ...] = dataclasses.field(default=())
    cropping: CroppingPlan | None = None
    full_resolution: FullResolutionPlan | None = None
    net1: Net1Plan | None = None
    net2: Net2Plan | None = None
    training: TrainingPlan | None = None
    augmentation: AugmentationParams | None = None
    sampling: SamplingPlan | None = None
    inference: InferencePlan | None = None
    baseline_unet: BaselinePlan | None = None
    report: PlansReport | None = None
    plans_version: int = PLANS_VERSION
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def class_names(self) -> list[str]:
        by_value = {int(v): str(k) for k, v in self.labels.items()}
        return [by_value.get(i, str(i)) for i in range(self.num_classes)]

    def to_dict(self) -> dict[str, Any]:
        """The plans as the JSON dict they were parsed from (a copy): for files and checkpoints."""
        return copy.deepcopy(dict(self.raw))

    def settings_dict(self) -> dict[str, Any]:
        """The settings part of the JSON dict (a copy): what ``--plans-override`` merges into."""
        return copy.deepcopy(dict(self.raw["settings"]))

    def training_steps(self, configuration: str) -> dict[str, StepPlan]:
        """The training steps of ``configuration`` by name: ``"1"``..``"4"`` (cascade) or ``"baseline"``."""
        if configuration == "cascade":
            return {str(entry.step): entry for entry in self.training.steps}
        if configuration == BASELINE_STEP:
            return {BASELINE_STEP: self.baseline_unet.as_step()}
        raise HCError(f"unknown configuration {configuration!r}; expected cascade or baseline")


#: Settings sections parsed into their own types (besides ``training``, ``normalization``, ``augmentation``).
_SECTIONS: dict[str, type] = {
    "cropping": CroppingPlan, "full_resolution": FullResolutionPlan, "net1": Net1Plan, "net2": Net2Plan,
    "sampling": SamplingPlan, "inference": InferencePlan, "baseline_unet": BaselinePlan,
}
#: Report sections and their types.
_REPORT_SECTIONS: dict[str, type] = {
    "dataset": DatasetPlan, "machine": MachinePlan, "memory": MemoryPlan, "fingerprint_summary": FingerprintSummary,
    "full_resolution": FullResolutionReport, "net1": Net1Report, "net2": WidthsReport, "baseline_unet": WidthsReport,
}
_SETTINGS = {f.name for f in dataclasses.fields(Plans) if f.name not in ("raw", "report", "plans_version")}
_FILE_PARTS = ("plans_version", "settings", "report")


def parse_plans(plans: Any, source: str = "plans") -> Plans:
    """Validate a plans dict of the current version and return its typed, frozen sections.

    The dict has three keys: ``plans_version``, ``settings`` and ``report``. Every section refuses unknown
    keys and missing fields with a one-line :class:`HCError` naming ``source`` and the field, e.g.
    ``plans.json: settings.training.steps[2] has unknown key 'foo'``.
    """
    if not isinstance(plans, Mapping):
        raise HCError(f"{source}: plans must be a JSON object")
    check_plans_version(plans, source)
    for key in plans:
        if key not in _FILE_PARTS:
            raise HCError(f"{source}: plans have unknown key {key!r} (a plans file has only "
                          f"{', '.join(_FILE_PARTS)})")
    for part in ("settings", "report"):
        if not isinstance(plans.get(part), Mapping):
            raise HCError(f"{source}: plans lack the '{part}' object")
    sections, top = _parse_settings(plans["settings"], source)
    out = _section(Plans, top, "settings", source, **sections, report=_parse_report(plans["report"], source),
                   raw=copy.deepcopy(dict(plans)))
    _check_consistency(out, source)
    return out


def _parse_settings(settings: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The typed settings sections, and the top-level scalar fields (checked by the caller's ``_section``)."""
    for key in settings:
        if key not in _SETTINGS:
            raise HCError(f"{source}: settings has unknown key {key!r}")
    missing = [k for k in _SETTINGS if k not in settings]
    if missing:
        raise HCError(f"{source}: settings lack field(s) {', '.join(sorted(missing))}")
    sections: dict[str, Any] = {name: _section(cls, settings[name], f"settings.{name}", source)
                                for name, cls in _SECTIONS.items()}
    training = settings["training"]
    if not isinstance(training, Mapping):
        raise HCError(f"{source}: settings.training must be an object")
    steps = training.get("steps")
    if not isinstance(steps, list) or [s.get("step") if isinstance(s, Mapping) else None for s in steps] != [1, 2, 3, 4]:
        raise HCError(f"{source}: settings.training.steps must list steps 1, 2, 3, 4 in order")
    parsed_steps = tuple(_section(StepPlan, s, f"settings.training.steps[{s['step']}]", source) for s in steps)
    for st in parsed_steps:
        where = f"{source}: settings.training.steps[{st.step}]"
        if st.input != STEP_INPUTS[st.step]:
            raise HCError(f"{where}.input must be {STEP_INPUTS[st.step]!r}, got {st.input!r}")
        if not st.shapes:
            need = {1: "patch_shape", 2: "subvolume_shapes", 3: "subvolume_shapes", 4: "stack_shape"}[st.step]
            raise HCError(f"{where} needs '{need}'")
        if st.loss_weights is not None and any(not _is_num(v) for v in st.loss_weights.values()):
            raise HCError(f"{where}.loss_weights must map loss names to numbers")
    sections["training"] = _section(TrainingPlan, {k: v for k, v in training.items() if k != "steps"},
                                    "settings.training", source, steps=parsed_steps)
    norm = settings["normalization"]
    if not isinstance(norm, list):
        raise HCError(f"{source}: settings.normalization must be a list, one entry per input channel")
    sections["normalization"] = tuple(_section(NormalizationPlan, n, f"settings.normalization[{i}]", source)
                                      for i, n in enumerate(norm))
    sections["augmentation"] = AugmentationParams.from_dict(settings["augmentation"], source, "settings.augmentation")
    return sections, {k: v for k, v in settings.items() if k not in sections}


def _parse_report(report: Mapping[str, Any], source: str) -> PlansReport:
    missing = sorted(set(_REPORT_SECTIONS) - set(report))
    if missing:
        raise HCError(f"{source}: report lacks field(s) {', '.join(missing)}")
    sections = {name: _section(cls, report[name], f"report.{name}", source) for name, cls in _REPORT_SECTIONS.items()}
    top = {k: v for k, v in report.items() if k not in _REPORT_SECTIONS}
    return _section(PlansReport, top, "report", source, **sections)


def _check_consistency(p: Plans, source: str) -> None:
    if p.net2.K % 2 != 1:
        raise HCError(f"{source}: net2.K must be a positive odd integer, got {p.net2.K!r}")
    if len(p.normalization) != p.num_input_channels:
        raise HCError(f"{source}: 'normalization' needs one entry per input channel ({p.num_input_channels})")
    for i, n in enumerate(p.normalization):
        need = ("clip_low", "clip_high") if n.scheme == "ct_clip" else ("percentile_low", "percentile_high")
        if any(getattr(n, k) is None for k in need):
            raise HCError(f"{source}: normalization[{i}] ({n.scheme}) needs {' and '.join(need)}")
    for name, net in (("net1", p.net1), ("net2", p.net2)):
        if net.num_classes != p.num_classes:
            raise HCError(f"{source}: {name}.num_classes is {net.num_classes}, the plans have {p.num_classes} classes")
    if p.net2.required_divisor != 2 ** p.net2.num_levels:
        raise HCError(f"{source}: net2.required_divisor must be 2**num_levels = {2 ** p.net2.num_levels}")
    if p.inference.tta_quarter_turns and not trained_quarter_turns(p):
        raise HCError(f"{source}: inference.tta_quarter_turns needs training rotated in-plane by at least 90 degrees "
                      "and mirrored along an in-plane axis (augmentation.p_rotation, rotation_deg[0], flip_axes)")
    bright = p.inference.brightening
    if bright is not None:
        if bright.label >= p.num_classes:
            raise HCError(f"{source}: inference.brightening.label {bright.label} is not a foreground class "
                          f"(1..{p.num_classes - 1})")
        if len(bright.targets) != p.num_input_channels:
            raise HCError(f"{source}: inference.brightening.targets needs one entry per input channel "
                          f"({p.num_input_channels})")
    K, divisor = p.net2.K, p.net2.required_divisor
    for shape in p.training.step(3).shapes:
        if shape[0] < K or shape[1] % divisor or shape[2] % divisor:
            raise HCError(f"{source}: training.steps[3] subvolume {list(shape)} must have D >= K={K} and H, W "
                          f"divisible by {divisor} (Net2)")


def trained_quarter_turns(p: Plans) -> bool:
    """Whether training showed the networks every in-plane quarter turn and reflection of a slice: rotation
    about the slice axis of at least 90 degrees either way, and mirroring along an in-plane axis."""
    a = p.augmentation
    return bool(a is not None and a.enabled and a.p_rotation > 0 and a.rotation_deg[0] >= 90
                and a.p_flip > 0 and {1, 2} & set(a.flip_axes))


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


#: The report's fields by the planner's section they are planned in: a whole section (None) or some of its
#: fields. Derived from the report's types, so the split and the types cannot disagree.
REPORT: dict[str, tuple[str, ...] | None] = {
    **{f.name: None for f in dataclasses.fields(PlansReport) if "check" in f.metadata},
    **{name: (tuple(f.name for f in dataclasses.fields(cls)) if name in _SECTIONS else None)
       for name, cls in _REPORT_SECTIONS.items()},
}


def _is_report(path: str) -> bool:
    """Whether a dotted settings path (``net1.widths``, ``memory.target_gb``) names a report field."""
    top, _, rest = path.partition(".")
    if top not in REPORT:
        return False
    return REPORT[top] is None or rest.split(".")[0] in REPORT[top]


def split_plans(planned: Mapping[str, Any]) -> dict[str, Any]:
    """The plans file from the planner's sections (one flat dict): the :data:`REPORT` fields go to
    ``report``, everything else to ``settings``."""
    settings: dict[str, Any] = {}
    report: dict[str, Any] = {}
    for key, value in planned.items():
        fields = REPORT.get(key, ())
        if key in REPORT and fields is None:
            report[key] = copy.deepcopy(value)
            continue
        if fields:
            report[key] = {k: copy.deepcopy(value[k]) for k in fields if k in value}
            value = {k: v for k, v in value.items() if k not in fields}
        settings[key] = copy.deepcopy(value)
    return {"plans_version": PLANS_VERSION, "settings": settings, "report": report}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    return {prefix: list(value) if isinstance(value, tuple) else value}


def settings_differences(a: Plans, b: Plans) -> list[str]:
    """The settings whose values differ between two plans, as dotted paths: what a re-plan would change in a
    kept plans file (the report is left out)."""
    fa, fb = _flatten(a.settings_dict()), _flatten(b.settings_dict())
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def with_settings(plans: Plans, override: Mapping[str, Any], source: str = "plans with --plans-override") -> Plans:
    """``plans`` with a partial settings dict merged into its settings (dicts merge, training steps by number;
    the report stays as the planner recorded it), checked again."""
    data = plans.to_dict()
    data["settings"] = deep_merge(data["settings"], override)
    return parse_plans(data, source)


def check_override_keys(override: Mapping[str, Any], source: str = "--plans-override") -> None:
    """Every key of a partial settings dict (``--plans-override``) must be a setting; the first unknown key
    or report field is a one-line HCError naming it (values are checked once the override is merged into
    the settings, by :func:`parse_plans`)."""
    def walk(data: Any, fields: set[str], where: str) -> None:
        if not isinstance(data, Mapping):
            return
        for key in data:
            name = f"{where}.{key}" if where else str(key)
            if key in fields:
                continue
            if _is_report(name):
                raise HCError(f"{source}: {name} is part of the plans' report (what the planner recorded), not a "
                              "setting; re-plan with hc_plan_and_preprocess to change it")
            raise HCError(f"{source}: {where + ' has' if where else 'settings have'} unknown key {key!r}")
    walk(override, _SETTINGS, "")
    for name, cls in {**_SECTIONS, "augmentation": AugmentationParams, "training": TrainingPlan}.items():
        walk(override.get(name), _field_names(cls), name)
    training = override.get("training")
    if isinstance(training, Mapping):
        for entry in training.get("steps") or []:
            if isinstance(entry, Mapping):
                walk(entry, _field_names(StepPlan), f"training.steps[{entry.get('step')}]")
    for i, entry in enumerate(override.get("normalization") or []):
        walk(entry, _field_names(NormalizationPlan), f"normalization[{i}]")


# --------------------------------------------------------------------------------------------------
# Versions


def check_plans_version(plans: Any, source: str | Path) -> None:
    """Refuse plans of another schema version (older plans: re-plan; a newer model: its own release)."""
    version = plans.get("plans_version") if isinstance(plans, Mapping) else None
    if version != PLANS_VERSION:
        raise HCError(f"{source}: plans_version {version!r} is not {PLANS_VERSION}; re-plan with "
                      "hc_plan_and_preprocess --overwrite (and retrain), or use the heartcascade release that wrote it")


# --------------------------------------------------------------------------------------------------
# Files


def plans_path(preprocessed_dataset_dir: str | os.PathLike) -> Path:
    return Path(preprocessed_dataset_dir) / PLANS_FILE


def load_plans(path: str | os.PathLike) -> Plans:
    """Read a plans file (a folder is accepted: its ``plans.json``): the typed plans, parsed once."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    return parse_plans(load_json(path), str(path))


def save_plans(path: str | os.PathLike, plans: Plans | Mapping[str, Any]) -> Plans:
    """Write plans (typed, or the planner's dict: checked first) atomically; returns them typed."""
    typed = plans if isinstance(plans, Plans) else parse_plans(plans, str(path))
    atomic_write_json(path, typed.to_dict())
    return typed


# --------------------------------------------------------------------------------------------------
# Derived values


def _fields(section: Any, keys: Sequence[str]) -> dict[str, Any]:
    """``keys`` of a typed section or of a section dict (the planner's, before the plans exist); tuples as lists."""
    get = section.get if isinstance(section, Mapping) else (lambda key: getattr(section, key))
    out = {key: get(key) for key in keys}
    return {key: list(value) if isinstance(value, tuple) else value for key, value in out.items()}


#: The plans fields that are the networks' keyword arguments (the rest of each section is planning data).
NET1_KWARGS = ("in_channels", "num_classes", "base_features", "max_features", "dilations", "bottleneck_dilation",
               "dropout", "kernel_size", "norm")
NET2_KWARGS = ("in_channels", "num_classes", "K", "base_features", "num_levels", "recursions", "max_features",
               "convs_per_level", "dropout", "expansive_kernel")
BASELINE_KWARGS = ("base_features", "max_features", "num_levels", "norm")


def net1_network_kwargs(net1: "Net1Plan | Mapping[str, Any]") -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net1`` from the ``net1`` section (typed or a dict)."""
    return _fields(net1, NET1_KWARGS)


def net2_network_kwargs(net2: "Net2Plan | Mapping[str, Any]") -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net2`` from the ``net2`` section (typed or a dict)."""
    return _fields(net2, NET2_KWARGS)


def baseline_network_kwargs(baseline: "BaselinePlan | Mapping[str, Any]", in_channels: int,
                            num_classes: int) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.BaselineUNet3D`` from the ``baseline_unet`` section."""
    return {"in_channels": int(in_channels), "num_classes": int(num_classes), **_fields(baseline, BASELINE_KWARGS)}


def net1_kwargs(plans: Plans) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net1``."""
    return net1_network_kwargs(plans.net1)


def net2_kwargs(plans: Plans) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net2``."""
    return net2_network_kwargs(plans.net2)


def cascade_kwargs(plans: Plans) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Cascade`` besides the two networks.

    Scale factors are per case (``properties['coarse_scale_factors']``); pass them to ``forward``.
    """
    return {"input_mode": plans.net2.input_mode, "image_channels": plans.num_input_channels}


def baseline_kwargs(plans: Plans) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.BaselineUNet3D``."""
    return baseline_network_kwargs(plans.baseline_unet, plans.num_input_channels, plans.num_classes)


def plans_summary(p: Plans) -> str:
    """One line on what the planner chose: preset, machine, memory target, K, Net1's coarse spacing."""
    r = p.report
    return (f"preset {r.preset} for {r.machine.kind}, memory target "
            f"{r.memory.target_gb:g} GB from {r.memory.target_source}; K={p.net2.K}, Net1 coarse spacing "
            f"{', '.join(f'{v:g}' for v in p.net1.coarse_spacing)} mm")


def preprocess_settings(p: Plans) -> PreprocessSettings:
    """What preprocessing follows, from the typed plans."""
    return PreprocessSettings(
        modality=p.modality, num_input_channels=p.num_input_channels, num_classes=p.num_classes,
        normalization=tuple(copy.deepcopy(dict(n)) for n in p.raw["settings"]["normalization"]), margin_mm=p.cropping.margin_mm,
        inplane_spacing=p.full_resolution.inplane_spacing, coarse_spacing=p.net1.coarse_spacing,
        max_locations_per_class=p.sampling.max_locations_per_class)


def preprocessing_fields(p: Plans) -> dict[str, Any]:
    """The plans fields the preprocessed arrays depend on (changing anything else keeps them valid)."""
    plans = p.raw["settings"]
    return {
        "preprocessing_version": PREPROCESSING_VERSION,
        "modality": plans["modality"],
        "num_input_channels": plans["num_input_channels"],
        "num_classes": plans["num_classes"],
        "normalization": plans["normalization"],
        "cropping": plans["cropping"],
        "inplane_spacing": plans["full_resolution"]["inplane_spacing"],
        "coarse_spacing": plans["net1"]["coarse_spacing"],
        "max_locations_per_class": plans["sampling"]["max_locations_per_class"],
    }


def preprocessing_hash(plans: Plans) -> str:
    """Short hash of :func:`preprocessing_fields`; stored with every preprocessed case."""
    text = json.dumps(preprocessing_fields(plans), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
