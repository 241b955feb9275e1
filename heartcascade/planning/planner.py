"""The planner: preset + dataset fingerprint + GPU memory target -> plans (see documentation/plans.md).

:func:`plan_experiment` assembles the plans from one function per rule (named after each rule below)
and one per plans section (``*_section``). The networks' keyword arguments are only ever taken from
plans fields through the accessors of ``planning/plans.py``, so what the memory model traces is what
training and prediction build. The curriculum (the four steps) is ``planning/curriculum.py``.

Rules, in the order they are applied (the functions that apply each in brackets):

1. **Memory budget** (:func:`memory_target`, :func:`usable_bytes`). target = ``--gpu-memory-gb``, else
   the preset's ``memory.target_gb``, else the detected CUDA GPU, else ``memory.default_target_gb``
   (12 GB, the paper's K40). The networks may use ``usable = target * usable_fraction - reserve_gb``
   (CUDA context, allocator fragmentation).
2. **Full-resolution grid** (:func:`choose_inplane_spacing`). Net2 works at the data's own resolution.
   Only when in-plane spacings vary widely across cases (max/min > ``max_inplane_spacing_ratio`` = 2) a
   common in-plane spacing -- the median in-plane spacing -- is chosen; slices are never resampled.
3. **K** (:func:`choose_k`, :func:`preset_k`, :func:`planned_min_slices`), odd: the odd number nearest
   ``k_extent_mm / slice spacing`` (ties up), clamped to [``k_min``, ``k_max``] = [3, 9] and to the
   thinnest case's (cropped) slice count: 9 for CT with 0.5-0.7 mm slices, 3 for 8 mm MR. The clamp uses
   the median case: a thinner outlier is left out of the plan (``dataset.excluded_cases``) instead of
   lowering K for everyone.
4. **Net1's coarse spacing** (:func:`plan_net1`, :func:`choose_coarse_spacing`). The smallest isotropic
   spacing ``s`` (never finer than the data; per axis ``max(native, s)``; searched on a geometric grid of
   step ``coarse_spacing_step``) at which Net1 trains on the whole 95th-percentile field of view (cropped
   extent in mm) at batch 1 within the budget. If even ``max_coarse_spacing_mm`` does not fit, Net1's
   widths are halved and the search repeats. The patch is that field of view on the coarse grid, rounded
   up to multiples of 16.
5. **Subvolumes** (:func:`nominal_subvolumes`; step 2: :func:`step2_subvolumes`). The paper's edges
   {64, 128, 256} voxels of a 512-voxel field of view are scaled to the median in-plane field of view
   (mm), converted to voxels per axis at full resolution, in-plane rounded to Net2's divisor, depth at
   least K+2 and at most the thinnest case's slice count.
6. **Net2's widths** (:func:`plan_net2`, :func:`choose_net2_width`, :func:`choose_inplane_tile`): the
   largest base width (halving from the preset's) at which step 4 (a stack of K full slices of the
   95th-percentile in-plane size) and step 3 (the smallest subvolume) fit at batch 1. If none does, the
   minimal width is used and Net2 works on in-plane tiles.
7. **Step-3 subvolumes** (:func:`step3_subvolumes`) that do not fit are shrunk, depth first (Net1 still
   sees the whole in-plane context it needs), then in-plane.
8. **Step-4 stacks** (:func:`step4_stack`, :func:`step4_tile`) are K slices of that in-plane size (or
   tile), capped at the preset's step-4 ``max_inplane_mm`` when set (a heart-sized window around the
   sampled voxel).
9. **Batch sizes** (:func:`choose_batch_sizes`) per step: the largest up to the preset's
   ``max_batch_size`` that fits for the step's largest input.
10. **Inference** (:func:`choose_z_chunk`): the largest z-chunk (up to ``max_z_chunk`` output slices)
    for which Net2 fits.
11. **Baseline 3D U-Net** (:func:`plan_baseline`) on data resampled to 2 mm (native where coarser): the
    whole 95th-percentile field of view if it fits, else shrunk along its longest axis; widths halved if
    even 32^3 fails.
12. **Where Net2 runs** (:func:`choose_roi_rule`): the whole volume for MR-sized cases, else the preset's ROI rule.
13. **Test-time brightening** (:func:`brightening_rule`), only where the preset asks for it: the reference class
    and, per channel, the brightness a first pass must find it at (a quantile of the training cases').
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from heartcascade.dataset.dataset_json import CT_NAMES, DatasetInfo
from heartcascade.dataset.segments import structure_key
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import memory_model
from heartcascade.planning.curriculum import CURRICULUM_STEPS, CurriculumStep
from heartcascade.planning.augmentation_plan import AugmentationParams, augmentation_dict
from heartcascade.planning.plans import (
    NET2_INPUT_MODES,
    baseline_network_kwargs,
    net1_network_kwargs,
    net2_network_kwargs,
    parse_plans,
    split_plans,
)
from heartcascade.preprocessing.preprocess import coarse_scale_factors
from heartcascade.utils.errors import HCError
from heartcascade.utils.merge import deep_merge

GiB = memory_model.GiB
PLANNER_VERSION = 1
NET1_DIVISOR = 16


# ---------------------------------------------------------------------------------------------------
# Small rules (pure functions, tested directly)
# ---------------------------------------------------------------------------------------------------

def detect_gpu_memory_gb() -> float | None:
    """Total memory of CUDA device 0 in GiB, or None without a usable CUDA GPU."""
    try:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / GiB
    except Exception:  # noqa: BLE001 - no driver, broken install: plan for the default
        return None
    return None


MACHINE_KINDS = ("cpu", "cuda")


def detect_machine() -> str:
    """``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``: the machine the plans are made for by default."""
    return "cuda" if detect_gpu_memory_gb() is not None else "cpu"


def preset_for_machine(preset: Mapping[str, Any], machine: str) -> dict[str, Any]:
    """The preset with its ``machines[machine]`` section merged in (a preset without one is used as it is).

    A preset can so differ by machine -- narrower networks, a CPU memory target and a time-sized schedule
    on ``cpu``; the GPU's memory and the full schedule on ``cuda`` -- while the rules stay the same.
    """
    if machine not in MACHINE_KINDS:
        raise HCError(f"unknown machine {machine!r}; expected {' or '.join(MACHINE_KINDS)}")
    base = {k: v for k, v in preset.items() if k != "machines"}
    section = preset["machines"].get(machine)
    return deep_merge(base, section) if section else copy.deepcopy(base)


def memory_target(preset: dict[str, Any], gpu_memory_gb: float | None = None) -> tuple[float, str]:
    """Memory target in GiB and where it came from (rule 1)."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise HCError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
        return float(gpu_memory_gb), "--gpu-memory-gb"
    mem = preset["memory"]
    if mem["target_gb"] is not None:
        return float(mem["target_gb"]), f"preset '{preset['name']}'"
    detected = detect_gpu_memory_gb()
    if detected is not None:
        return round(detected, 2), "detected CUDA GPU"
    return float(mem["default_target_gb"]), "default (no CUDA GPU found; the paper's 12 GB K40)"


def usable_bytes(target_gb: float, preset: dict[str, Any]) -> int:
    """Rule 1: bytes the networks may use, ``target * usable_fraction - reserve_gb``."""
    mem = preset["memory"]
    usable = target_gb * float(mem["usable_fraction"]) - float(mem["reserve_gb"])
    if usable <= 0:
        raise HCError(f"memory target {target_gb} GB leaves nothing for the networks after the reserve")
    return int(usable * GiB)


def nearest_odd(x: float) -> int:
    """The odd integer nearest ``x`` (an even ``x`` rounds up)."""
    return int(2 * math.floor(x / 2.0) + 1)


def choose_k(slice_spacing: float, min_slices: int, k_extent_mm: float = 6.0, k_min: int = 3, k_max: int = 9) -> int:
    """Rule 3: odd K from the slice spacing, clamped to [k_min, k_max] and to the thinnest case."""
    k = min(max(nearest_odd(k_extent_mm / float(slice_spacing)), k_min), k_max)
    cap = nearest_odd(min_slices - 1) if min_slices % 2 == 0 else int(min_slices)  # largest odd <= min_slices
    return max(1, min(k, cap))


def choose_inplane_spacing(fingerprint: dict[str, Any], max_ratio: float = 2.0) -> list[float] | None:
    """Rule 2: None (native) unless in-plane spacings vary by more than ``max_ratio``; then the median."""
    if float(fingerprint["inplane_spacing_ratio"]) <= max_ratio:
        return None
    s = fingerprint.get("inplane_spacing_median")
    if s is None:
        med = fingerprint["spacing"]["median"]
        s = (med[1] + med[2]) / 2
    return [round(float(s), 6), round(float(s), 6)]


def ceil_to(x: float, m: int) -> int:
    return int(max(m, math.ceil(x / m) * m))


def round_to(x: float, m: int, minimum: int) -> int:
    return int(max(minimum, int(round(x / m)) * m))


# ---------------------------------------------------------------------------------------------------
# Memory checks (memoised: the same configuration is asked about several times)
# ---------------------------------------------------------------------------------------------------

def _key(d: dict[str, Any]) -> str:
    return json.dumps(d, sort_keys=True)


@functools.lru_cache(maxsize=4096)
def _net1(kw: str, batch: int, shape: tuple, training: bool) -> memory_model.MemoryEstimate:
    return memory_model.net1_memory(json.loads(kw), batch, shape, training)


@functools.lru_cache(maxsize=4096)
def _net2(kw: str, batch: int, shape: tuple, training: bool) -> memory_model.MemoryEstimate:
    return memory_model.net2_memory(json.loads(kw), batch, shape, training)


@functools.lru_cache(maxsize=4096)
def _cascade(kw1: str, kw2: str, mode: str, batch: int, shape: tuple, factors: tuple) -> memory_model.MemoryEstimate:
    return memory_model.cascade_memory(json.loads(kw1), json.loads(kw2), mode, batch, shape, factors, True)


@functools.lru_cache(maxsize=4096)
def _baseline(kw: str, batch: int, shape: tuple) -> memory_model.MemoryEstimate:
    return memory_model.baseline_memory(json.loads(kw), batch, shape, True)


def _largest_batch(peak: Callable[[int], int], usable: int, cap: int) -> tuple[int, int]:
    """Largest batch in 1..cap whose peak fits (1 even when it does not); returns (batch, peak)."""
    batch = memory_model.largest_fitting(peak, usable, cap)
    return batch, peak(batch)


# ---------------------------------------------------------------------------------------------------
# What the rules share
# ---------------------------------------------------------------------------------------------------

def preset_k(slice_spacing: float, min_slices: int, preset: Mapping[str, Any]) -> int:
    """Rule 3 with the preset's ``net2`` bounds (``k_extent_mm``, ``k_min``, ``k_max``)."""
    p2 = preset["net2"]
    return choose_k(slice_spacing, min_slices, float(p2["k_extent_mm"]), int(p2["k_min"]), int(p2["k_max"]))


def planned_min_slices(fingerprint: Mapping[str, Any], slice_spacing: float, preset: Mapping[str, Any]) -> int:
    """Rule 3's clamp: the slice count of the thinnest case left in the plan.

    K is clamped at the median case's slice count; cases thinner than that K (and those too small for any
    network) are left out of the plan (``dataset.excluded_cases``), so one odd case never lowers K.
    """
    small = fingerprint.get("too_small_cases") or {}
    slices = sorted(r["cropped_shape"][0] for r in fingerprint.get("cases", []) if r["case_id"] not in small)
    if not slices:
        return int(fingerprint["min_slices"])
    k = preset_k(slice_spacing, slices[(len(slices) - 1) // 2], preset)
    return min(n for n in slices if n >= k)


class _Context:
    """Everything the rules share: fingerprint-derived geometry, the memory budget (rule 1), the
    full-resolution grid (rule 2), the thinnest planned case (rule 3) and the preset."""

    def __init__(self, fingerprint: dict[str, Any], preset: dict[str, Any], info: DatasetInfo,
                 gpu_memory_gb: float | None) -> None:
        self.fp = fingerprint
        self.preset = preset
        self.info = info
        self.num_classes = info.num_classes
        self.channels = info.num_channels
        self.target_gb, self.target_source = memory_target(preset, gpu_memory_gb)
        self.usable = usable_bytes(self.target_gb, preset)
        self.native = [float(v) for v in fingerprint["spacing"]["median"]]
        self.inplane = choose_inplane_spacing(fingerprint, preset["full_resolution"]["max_inplane_spacing_ratio"])
        self.spacing = list(self.native) if self.inplane is None else [self.native[0]] + list(self.inplane)
        self.fov95 = [float(v) for v in fingerprint["fov_mm"]["p95"]]
        self.fov_median = [float(v) for v in fingerprint["fov_mm"]["median"]]
        self.min_slices = planned_min_slices(fingerprint, self.spacing[0], preset)
        if self.inplane is None:
            self.shape95 = [int(round(v)) for v in fingerprint["cropped_shape"]["p95"]]
        else:
            self.shape95 = [int(round(f / s)) for f, s in zip(self.fov95, self.spacing)]
        #: the preset's ``training.steps`` entries by step number
        self.step_presets: dict[int, dict[str, Any]] = {s["step"]: s for s in preset["training"]["steps"]}


def widths(base: int, maximum: int, levels: int) -> list[int]:
    """Feature widths ``min(base * 2^l, maximum)`` for l = 0..levels (the plans' ``widths``, for humans)."""
    return [min(base * 2 ** i, maximum) for i in range(levels + 1)]


# ---------------------------------------------------------------------------------------------------
# Networks: the plans' network fields, and their memory through the plans accessors
# ---------------------------------------------------------------------------------------------------

def net1_network(ctx: _Context, base: int) -> dict[str, Any]:
    """The network fields of the plans' ``net1`` at base width ``base`` (rule 4 halves it when short)."""
    p = ctx.preset["net1"]
    return {"in_channels": ctx.channels, "num_classes": ctx.num_classes, "base_features": int(base),
            "max_features": int(p["max_features"]), "dilations": list(p["dilations"]),
            "bottleneck_dilation": p["bottleneck_dilation"], "dropout": float(p["dropout"]),
            "kernel_size": int(p["kernel_size"]), "norm": p["norm"]}


def net2_network(ctx: _Context, base: int, K: int) -> dict[str, Any]:
    """The network fields of the plans' ``net2`` at base width ``base`` (rule 6 halves it when short)."""
    p = ctx.preset["net2"]
    mode = p["input_mode"]
    if mode not in NET2_INPUT_MODES:
        raise HCError(f"planner output: net2.input_mode must be one of {', '.join(NET2_INPUT_MODES)}, got {mode!r}")
    extra = ctx.num_classes if mode == "probabilities" else 1
    return {"K": int(K), "input_mode": mode, "in_channels": ctx.channels + extra, "num_classes": ctx.num_classes,
            "base_features": int(base), "num_levels": int(p["num_levels"]), "recursions": int(p["recursions"]),
            "max_features": int(p["max_features"]), "convs_per_level": int(p["convs_per_level"]),
            "dropout": float(p["dropout"]), "expansive_kernel": int(p["expansive_kernel"])}


def baseline_network(ctx: _Context, base: int) -> dict[str, Any]:
    """The network fields of the plans' ``baseline_unet`` at base width ``base`` (rule 11 halves it)."""
    pb = ctx.preset["baseline_unet"]
    return {"base_features": int(base), "max_features": int(pb["max_features"]),
            "num_levels": int(pb["num_levels"]), "norm": pb["norm"]}


def _net1_estimate(network: dict[str, Any], batch: int, shape: Sequence[int],
                   training: bool = True) -> memory_model.MemoryEstimate:
    return _net1(_key(net1_network_kwargs(network)), int(batch), tuple(int(v) for v in shape), training)


def _net2_estimate(network: dict[str, Any], batch: int, shape: Sequence[int],
                   training: bool = True) -> memory_model.MemoryEstimate:
    return _net2(_key(net2_network_kwargs(network)), int(batch), tuple(int(v) for v in shape), training)


@dataclass(frozen=True)
class Net1Choice:
    """Rule 4's outcome: Net1's coarse grid, whole-volume patch and network fields."""

    coarse_spacing: list[float]
    patch_shape: list[int]
    network: dict[str, Any]  #: the network fields of the plans' ``net1`` (read through ``net1_kwargs``)
    scale_factors: tuple[float, ...]  #: full resolution -> coarse grid at the representative spacing

    def estimate(self, batch: int, shape: Sequence[int], training: bool = True) -> memory_model.MemoryEstimate:
        """Net1's memory for ``batch`` inputs of the coarse ``shape``."""
        return _net1_estimate(self.network, batch, shape, training)

    @property
    def parameters(self) -> int:
        """Bytes of Net1's parameters (held while Net2 trains in step 4 and at inference)."""
        return self.estimate(1, self.patch_shape).parameters

    @property
    def inference_peak(self) -> int:
        """Peak bytes of Net1's no-grad pass over its whole-volume patch."""
        return self.estimate(1, self.patch_shape, False).peak


@dataclass(frozen=True)
class Net2Choice:
    """Rules 5 and 6's outcome: Net2's network fields, the in-plane sizes it works on, the subvolumes."""

    network: dict[str, Any]  #: the network fields of the plans' ``net2`` (read through ``net2_kwargs``)
    divisor: int  #: H and W must be multiples of it
    full_slice: list[int]  #: the 95th-percentile slice, rounded up to ``divisor``
    tile: list[int]  #: the in-plane size Net2 trains on (``full_slice`` unless memory forces tiles)
    subvolumes: list[list[int]]  #: rule 5's nominal subvolumes, ascending

    @property
    def K(self) -> int:  # noqa: N802 - the paper's name
        return int(self.network["K"])


def step3_peak(ctx: _Context, net1: Net1Choice, network2: dict[str, Any], batch: int, shape: Sequence[int]) -> int:
    """Peak bytes of a step-3 iteration: the cascade trained end to end on full-resolution ``shape``."""
    kw2 = net2_network_kwargs(network2)
    return _cascade(_key(net1_network_kwargs(net1.network)), _key(kw2), network2["input_mode"], int(batch),
                    tuple(int(v) for v in shape), net1.scale_factors).peak


def step4_peak(net1: Net1Choice, network2: dict[str, Any], batch: int, tile: Sequence[int]) -> int:
    """Peak bytes of a step-4 iteration on K-slice stacks of ``tile``: Net2 trains beside the frozen Net1
    (its parameters, then its whole-volume inference pass)."""
    train = _net2_estimate(network2, batch, (network2["K"], int(tile[0]), int(tile[1])), True)
    return max(train.peak + net1.parameters, net1.inference_peak + train.parameters + train.optimizer_state)


def coarse_subvolume(shape: Sequence[int], factors: Sequence[float]) -> list[int]:
    """The coarse version of a full-resolution subvolume, padded to Net1's divisor (what Net1 runs on)."""
    return [ceil_to(max(1, math.floor(n * f + 0.5)), NET1_DIVISOR) for n, f in zip(shape, factors)]


# ---------------------------------------------------------------------------------------------------
# The rules (numbered as in the module docstring and documentation/plans.md)
# ---------------------------------------------------------------------------------------------------

def _coarse_axes(native: Sequence[float], s: float) -> list[float]:
    """Per-axis coarse spacing for isotropic target ``s``: never finer than the data; an axis within
    COARSE_SNAP of ``s`` keeps its native spacing (it is not resampled, see preprocess.coarse_scale_factors)."""
    factors = coarse_scale_factors(native, [max(n, s) for n in native])
    return [n / f for n, f in zip(native, factors)]


def coarse_patch(fov_mm: Sequence[float], coarse_spacing: Sequence[float]) -> list[int]:
    """Net1's whole-volume patch: the field of view on the coarse grid, rounded up to multiples of 16."""
    return [ceil_to(f / c, NET1_DIVISOR) for f, c in zip(fov_mm, coarse_spacing)]


def choose_coarse_spacing(ctx: _Context) -> tuple[list[float], list[int], dict[str, Any], int]:
    """Rule 4. Returns (coarse spacing, Net1 patch, Net1's network fields, batch-1 peak bytes)."""
    p = ctx.preset["net1"]
    lowest = p["min_coarse_spacing_mm"]  # null: no bound below the native in-plane spacing
    s0 = min(ctx.native[1:]) if lowest is None else max(min(ctx.native[1:]), float(lowest))
    s_max = max(s0, float(p["max_coarse_spacing_mm"]))
    step = float(p["coarse_spacing_step"])
    grid = [s0 * step ** k for k in range(int(math.log(s_max / s0) / math.log(step)) + 1)] or [s0]
    base = int(p["base_features"])
    while True:
        network = net1_network(ctx, base)

        def peak(s: float) -> int:
            return _net1_estimate(network, 1, coarse_patch(ctx.fov95, _coarse_axes(ctx.native, s))).peak

        if peak(grid[0]) <= ctx.usable or peak(grid[-1]) <= ctx.usable:
            lo, hi = 0, len(grid) - 1  # smallest index that fits (memory falls as s grows)
            if peak(grid[0]) <= ctx.usable:
                hi = 0
            while lo < hi:
                mid = (lo + hi) // 2
                if peak(grid[mid]) <= ctx.usable:
                    hi = mid
                else:
                    lo = mid + 1
            s = grid[lo]
            spacing = _coarse_axes(ctx.native, s)
            return [round(v, 4) for v in spacing], coarse_patch(ctx.fov95, spacing), network, peak(s)
        if base // 2 < int(p["min_base_features"]):
            raise HCError(f"memory target {ctx.target_gb:g} GB is too small: Net1 does not fit even at "
                          f"{s_max:g} mm with {base} base features (usable {ctx.usable / GiB:.2f} GB)")
        base //= 2


def plan_net1(ctx: _Context) -> Net1Choice:
    """Rule 4: Net1's coarse spacing, whole-volume patch and widths (:func:`choose_coarse_spacing`)."""
    coarse_spacing, patch, network, _ = choose_coarse_spacing(ctx)
    return Net1Choice(coarse_spacing, patch, network, tuple(coarse_scale_factors(ctx.spacing, coarse_spacing)))


def nominal_subvolumes(ctx: _Context, K: int, divisor: int) -> list[list[int]]:
    """Rule 5: the paper's edges scaled to the data, in full-res voxels (D, H, W), ascending."""
    sv = ctx.preset["subvolumes"]
    fov_inplane = (ctx.fov_median[1] + ctx.fov_median[2]) / 2
    min_d = min(K + int(sv["min_extra_slices"]), ctx.min_slices)
    shapes = []
    for edge in sv["reference_edges"]:
        mm_edge = float(edge) / float(sv["reference_fov_voxels"]) * fov_inplane
        d = int(min(max(round(mm_edge / ctx.spacing[0]), min_d), ctx.min_slices))
        hw = []
        for axis in (1, 2):
            limit = ceil_to(ctx.shape95[axis], divisor)
            hw.append(min(round_to(mm_edge / ctx.spacing[axis], divisor, int(sv["min_inplane"])), limit))
        shape = [d] + hw
        if shape not in shapes:
            shapes.append(shape)
    return sorted(shapes, key=lambda s: math.prod(s))


def choose_net2_width(ctx: _Context, net1: Net1Choice, K: int, full_slice: Sequence[int],
                      smallest_subvolume: Sequence[int]) -> dict[str, Any]:
    """Rule 6: Net2's network fields at the largest base width (halving from the preset's) at which step 4
    (K full slices) and step 3 (the smallest subvolume) fit at batch 1; else the minimal width."""
    p2 = ctx.preset["net2"]
    base, min_base = int(p2["base_features"]), int(p2["min_base_features"])
    while True:
        network = net2_network(ctx, base, K)
        fits = (step4_peak(net1, network, 1, full_slice) <= ctx.usable
                and step3_peak(ctx, net1, network, 1, smallest_subvolume) <= ctx.usable)
        if fits or base // 2 < min_base:
            return network
        base //= 2


def choose_inplane_tile(ctx: _Context, net1: Net1Choice, network2: dict[str, Any], full_slice: Sequence[int],
                        divisor: int) -> list[int]:
    """Rule 6 (tiles): the full slice, shrunk (x0.8, to Net2's divisor) until a step-4 stack fits at batch 1."""
    tile = list(full_slice)
    while step4_peak(net1, network2, 1, tile) > ctx.usable and max(tile) > divisor:
        tile = [max(divisor, round_to(t * 0.8, divisor, divisor)) for t in tile]
    return tile


def plan_net2(ctx: _Context, net1: Net1Choice, K: int) -> Net2Choice:
    """Rules 5 and 6: the nominal subvolumes, Net2's widths and the in-plane tile it trains on."""
    divisor = 2 ** int(ctx.preset["net2"]["num_levels"])
    full_slice = [ceil_to(ctx.shape95[1], divisor), ceil_to(ctx.shape95[2], divisor)]
    subvolumes = nominal_subvolumes(ctx, K, divisor)
    network = choose_net2_width(ctx, net1, K, full_slice, subvolumes[0])
    tile = choose_inplane_tile(ctx, net1, network, full_slice, divisor)
    return Net2Choice(network, divisor, full_slice, tile, subvolumes)


def step2_subvolumes(ctx: _Context, net1: Net1Choice, subvolumes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Rule 5 (step 2): the nominal subvolumes whose coarse version Net1 alone trains on within the budget
    (the smallest one when none does)."""
    fitting = [list(s) for s in subvolumes
               if net1.estimate(1, coarse_subvolume(s, net1.scale_factors)).peak <= ctx.usable]
    return fitting or [list(subvolumes[0])]


def _shrink(shape: list[int], min_d: int, min_hw: int, divisor: int) -> list[int] | None:
    """One shrinking step: depth first (x0.75), then in-plane (x0.8); None when nothing is left to shrink."""
    d, h, w = shape
    if d > min_d:
        return [max(min_d, int(d * 0.75)), h, w]
    if max(h, w) > min_hw:
        return [d, max(min_hw, round_to(h * 0.8, divisor, min_hw)), max(min_hw, round_to(w * 0.8, divisor, min_hw))]
    return None


def step3_subvolumes(ctx: _Context, net1: Net1Choice, net2: Net2Choice) -> list[list[int]]:
    """Rule 7: the nominal subvolumes cut to Net2's tile and, where the cascade does not fit at batch 1,
    shrunk depth first (x0.75 down to K + 2), then in-plane (x0.8); deduplicated, ascending."""
    sv = ctx.preset["subvolumes"]
    min_d = min(net2.K + int(sv["min_extra_slices"]), ctx.min_slices)
    min_hw = min(int(sv["min_inplane"]), min(net2.tile))
    shapes: list[list[int]] = []
    for shape in net2.subvolumes:
        cur: list[int] | None = [shape[0], min(shape[1], net2.tile[0]), min(shape[2], net2.tile[1])]
        while cur is not None and step3_peak(ctx, net1, net2.network, 1, cur) > ctx.usable:
            cur = _shrink(cur, min_d, min_hw, net2.divisor)
        if cur is not None and cur not in shapes:
            shapes.append(cur)
    if not shapes:
        shapes = [[min_d, min_hw, min_hw]]
    shapes.sort(key=lambda s: math.prod(s))
    return shapes


def step4_tile(tile: Sequence[int], inplane_spacing: Sequence[float], max_inplane_mm: float | None,
               divisor: int) -> list[int]:
    """Rule 8: step-4 stacks' in-plane size: the memory tile, capped at ``max_inplane_mm`` when the preset sets it.

    Net2 only ever predicts inside the heart ROI, so whole slices (mostly arms, liver and air on a
    320 mm MR field of view) spend most of a step-4 iteration on context it never sees at test time;
    a tile a little larger than a heart (rounded up to Net2's divisor) trains on what it will meet.
    """
    if max_inplane_mm is None:
        return [int(t) for t in tile]
    return [min(int(t), ceil_to(float(max_inplane_mm) / float(sp), divisor)) for t, sp in zip(tile, inplane_spacing)]


def step4_stack(ctx: _Context, net2: Net2Choice) -> list[int]:
    """Rule 8: the step-4 stack ``[K, H, W]`` (:func:`step4_tile` with the preset's step-4 ``max_inplane_mm``)."""
    return [net2.K] + step4_tile(net2.tile, ctx.spacing[1:], ctx.step_presets[4]["max_inplane_mm"], net2.divisor)


def choose_batch_sizes(ctx: _Context, net1: Net1Choice, net2: Net2Choice, shapes2: Sequence[Sequence[int]],
                       shapes3: Sequence[Sequence[int]], stack: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Rule 9: per step, the largest batch up to the preset's ``max_batch_size`` for which the step's largest
    input fits, with its peak bytes: ``{step: (batch_size, peak)}``."""
    peaks: dict[int, Callable[[int], int]] = {
        1: lambda b: net1.estimate(b, net1.patch_shape).peak,
        2: lambda b: net1.estimate(b, coarse_subvolume(shapes2[-1], net1.scale_factors)).peak,
        3: lambda b: step3_peak(ctx, net1, net2.network, b, shapes3[-1]),
        4: lambda b: step4_peak(net1, net2.network, b, stack[1:]),
    }
    return {step: _largest_batch(peak, ctx.usable, ctx.step_presets[step]["max_batch_size"])
            for step, peak in peaks.items()}


def choose_z_chunk(ctx: _Context, net1: Net1Choice, net2: Net2Choice) -> tuple[int, int]:
    """Rule 10: the largest z-chunk (Net2 output slices per pass, up to ``max_z_chunk``) for which Net2's
    no-grad pass on the tile, plus Net1's parameters, fits; returns (z_chunk, inference peak bytes)."""
    tile = net2.tile

    def infer_peak(z: int) -> int:
        return _net2_estimate(net2.network, 1, (z + net2.K - 1, tile[0], tile[1]), False).peak + net1.parameters

    z = memory_model.largest_fitting(infer_peak, ctx.usable, int(ctx.preset["inference"]["max_z_chunk"]))
    net2_params = _net2_estimate(net2.network, 1, (net2.K, tile[0], tile[1]), False).parameters
    return z, max(net1.inference_peak + net2_params, infer_peak(z))


def plan_baseline(ctx: _Context) -> tuple[dict[str, Any], int]:
    """Rule 11: the plain 3D U-Net comparator on a ~2 mm grid (native where coarser): the whole
    95th-percentile field of view if it fits, else shrunk along its longest axis; widths halved if even the
    smallest patch fails; batch up to ``max_batch_size``. Returns the plans' ``baseline_unet`` and its peak."""
    pb = ctx.preset["baseline_unet"]
    target = float(pb["spacing_mm"])
    spacing = [max(n, target) for n in ctx.native]
    levels = int(pb["num_levels"])
    div = 2 ** levels
    base = int(pb["base_features"])

    def estimate(network: dict[str, Any], batch: int, shape: Sequence[int]) -> memory_model.MemoryEstimate:
        kw = baseline_network_kwargs(network, ctx.channels, ctx.num_classes)
        return _baseline(_key(kw), batch, tuple(shape))

    while True:
        network = baseline_network(ctx, base)
        patch = [ceil_to(f / s, div) for f, s in zip(ctx.fov95, spacing)]
        while estimate(network, 1, patch).peak > ctx.usable:
            mm_extent = [p * s for p, s in zip(patch, spacing)]
            axis = max((a for a in range(3) if patch[a] > div), key=lambda a: mm_extent[a], default=None)
            if axis is None:
                break
            patch[axis] = max(div, patch[axis] - div)
        if estimate(network, 1, patch).peak <= ctx.usable or base // 2 < 2:
            break
        base //= 2
    batch, peak = _largest_batch(lambda b: estimate(network, b, patch).peak, ctx.usable,
                                 int(pb["max_batch_size"]))
    return {"spacing": [round(s, 4) for s in spacing], "patch_shape": patch, "batch_size": batch, **network,
            "widths": widths(base, network["max_features"], levels),
            "lr": float(pb["lr"]), "epochs": int(pb["epochs"]), "iterations_per_epoch": int(pb["iterations_per_epoch"]),
            "losses": list(pb["losses"])}, peak


# ---------------------------------------------------------------------------------------------------
# Plans sections (documentation/plans.md, "Fields")
# ---------------------------------------------------------------------------------------------------

def choose_machine(machine: str | None, gpu_memory_gb: float | None) -> tuple[str, str]:
    """The machine the plans are made for and where that came from: ``--machine``, else cuda when a GPU
    memory is given, else the detected machine (:func:`detect_machine`)."""
    if machine is not None:
        return machine, "--machine"
    if gpu_memory_gb is not None:
        return "cuda", "--gpu-memory-gb"
    return detect_machine(), "detected"


def dataset_section(ctx: _Context, dataset_id: int | None, K: int) -> dict[str, Any]:
    """``dataset``: name, id, case count and the cases rule 3 leaves out."""
    return {"name": ctx.info.folder.name, "id": dataset_id, "num_training_cases": int(ctx.fp["num_cases"]),
            "excluded_cases": fpmod.excluded_cases(ctx.fp, K)}


def machine_section(ctx: _Context, machine: str, source: str) -> dict[str, Any]:
    """``machine``: the machine kind the plans were made for (selects the preset's ``machines`` section)."""
    return {"kind": machine, "source": source, "cpu_count": os.cpu_count(),
            "gpu_memory_gb": None if machine == "cpu" else round(ctx.target_gb, 3)}


def labels_section(ctx: _Context) -> dict[str, Any]:
    """``modality``, ``num_input_channels``, ``channel_names``, ``labels``, ``num_classes``, ``label_codes``."""
    info = ctx.info
    return {"modality": info.modality, "num_input_channels": ctx.channels, "channel_names": dict(info.channel_names),
            "labels": dict(info.labels), "num_classes": ctx.num_classes,
            "label_codes": {str(k): int(v) for k, v in info.label_codes.items()} if info.label_codes else None}


def normalization_section(ctx: _Context) -> list[dict[str, Any]]:
    """``normalization``: CT channels clip to the fingerprint's foreground 0.5/99.5 percentiles; others use
    per-case percentiles."""
    pn = ctx.preset["normalization"]
    lo_q, hi_q = float(pn["percentile_low"]), float(pn["percentile_high"])
    out = []
    for c in range(ctx.channels):
        name = ctx.info.channel_names[str(c)]
        stats = (ctx.fp.get("intensity") or [None] * ctx.channels)[c]
        if name.strip().lower() in CT_NAMES and stats is not None:
            out.append({"channel": c, "name": name, "scheme": "ct_clip",
                        "clip_low": round(float(stats["percentile_00_5"]), 3),
                        "clip_high": round(float(stats["percentile_99_5"]), 3), "target_range": [-1.0, 1.0]})
        else:
            out.append({"channel": c, "name": name, "scheme": "percentile_clip", "percentile_low": lo_q,
                        "percentile_high": hi_q, "target_range": [-1.0, 1.0]})
    return out


def cropping_section(ctx: _Context) -> dict[str, Any]:
    """``cropping``: CT by Hounsfield threshold, other modalities by a relative threshold."""
    return {"method": "ct_hu_threshold" if ctx.info.modality == "ct" else "relative_threshold",
            "margin_mm": float(ctx.preset["cropping"]["margin_mm"])}


def full_resolution_section(ctx: _Context) -> dict[str, Any]:
    """``full_resolution``: Net2's grid (rule 2)."""
    return {"inplane_spacing": ctx.inplane,
            "inplane_spacing_ratio": round(float(ctx.fp["inplane_spacing_ratio"]), 4),
            "max_inplane_spacing_ratio": float(ctx.preset["full_resolution"]["max_inplane_spacing_ratio"]),
            "median_spacing": [round(v, 6) for v in ctx.native], "spacing": [round(v, 6) for v in ctx.spacing],
            "shape_p95": ctx.shape95, "min_slices": ctx.min_slices}


def net1_section(ctx: _Context, net1: Net1Choice) -> dict[str, Any]:
    """``net1``: rule 4's grid and patch, and the network fields."""
    return {"coarse_spacing": net1.coarse_spacing, "patch_shape": net1.patch_shape,
            "coarse_shape_median": [int(round(f / c)) for f, c in zip(ctx.fov_median, net1.coarse_spacing)],
            **net1.network, "widths": widths(net1.network["base_features"], net1.network["max_features"], 4),
            "required_divisor": NET1_DIVISOR}


def net2_section(net2: Net2Choice) -> dict[str, Any]:
    """``net2``: rule 6's network fields, the full slice and the tile."""
    n = net2.network
    return {**n, "widths": widths(n["base_features"], n["max_features"], n["num_levels"]),
            "required_divisor": net2.divisor, "full_slice_shape": net2.full_slice,
            "tiling": net2.tile != net2.full_slice}


def step_entry(ctx: _Context, row: CurriculumStep, shapes: dict[str, Any], batch: int) -> dict[str, Any]:
    """One ``training.steps`` entry: the curriculum row, the preset step's schedule, the step's input
    ``shapes`` (rules 4-8) and its batch size (rule 9)."""
    sp = ctx.step_presets[row.step]
    lr = sp["lr"] if sp["lr"] is not None else ctx.preset["training"]["lr"]  # null: the training lr
    return {"step": row.step, "name": row.name, "enabled": bool(sp["enabled"]), "train": list(row.train),
            "losses": list(sp["losses"]), "input": row.input, **shapes,
            "batch_size": int(batch), "epochs": int(sp["epochs"]), "iterations_per_epoch": int(sp["iterations_per_epoch"]),
            "lr": float(lr),
            "time_fraction": None if sp["time_fraction"] is None else float(sp["time_fraction"])}


def curriculum_steps(ctx: _Context, net1: Net1Choice, shapes2: list[list[int]], shapes3: list[list[int]],
                     stack: list[int], batches: Mapping[int, tuple[int, int]]) -> list[dict[str, Any]]:
    """``training.steps``: one :func:`step_entry` per row of the curriculum (planning/curriculum.py)."""
    shapes = {1: {"patch_shape": net1.patch_shape},
              2: {"subvolume_shapes": shapes2,
                  "coarse_patch_shapes": [coarse_subvolume(s, net1.scale_factors) for s in shapes2]},
              3: {"subvolume_shapes": shapes3},
              4: {"stack_shape": stack}}
    return [step_entry(ctx, row, shapes[row.step], batches[row.step][0]) for row in CURRICULUM_STEPS]


def training_section(ctx: _Context, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """``training``: the preset's optimiser and schedule, the steps, data-loader workers (at most the
    planning machine's CPUs - 1)."""
    tr = ctx.preset["training"]
    optional = lambda key, kind: None if tr[key] is None else kind(tr[key])  # noqa: E731 - null stays null
    return {"weight_decay": float(tr["weight_decay"]), "dice_weighting": str(tr["dice_weighting"]),
            "classifier_bias_init": str(tr["classifier_bias_init"]), "steps": steps,
            "lr_schedule": str(tr["lr_schedule"]), "warmup_iterations": int(tr["warmup_iterations"]),
            "grad_clip": optional("grad_clip", float), "ema_momentum": float(tr["ema_momentum"]),
            "keep_best_per_step": bool(tr["keep_best_per_step"]), "time_budget_s": optional("time_budget_s", float),
            "budget_probe_iterations": int(tr["budget_probe_iterations"]),
            "validation_interval_epochs": int(tr["validation_interval_epochs"]),
            "checkpoint_interval_epochs": int(tr["checkpoint_interval_epochs"]),
            "checkpoint_interval_iterations": int(tr["checkpoint_interval_iterations"]),
            "val_max_cases": optional("val_max_cases", int),
            "num_workers": min(int(tr["num_workers"]), max(1, (os.cpu_count() or 2) - 1)),
            "num_threads": optional("num_threads", int), "seed": int(tr["seed"])}


def augmentation_section(ctx: _Context) -> dict[str, Any]:
    """``augmentation``: the preset's ranges; with thick slices (> 3x in-plane) rotations only about the
    slice axis."""
    aug = copy.deepcopy(ctx.preset["augmentation"])
    if ctx.spacing[0] > 3.0 * min(ctx.spacing[1:]):
        rot = list(aug["rotation_deg"])
        aug["rotation_deg"] = [rot[0], 0.0, 0.0]
    if not aug["cavity_contraction_labels"]:
        aug["cavity_contraction_labels"] = cavity_and_wall(ctx.info.labels)
    return augmentation_dict(AugmentationParams.from_dict(aug, "preset"))  # every field, defaults written out


def cavity_and_wall(labels: dict[str, int]) -> list[int]:
    """The label values of the LV cavity and its myocardium, found by name, or [] when either is missing."""
    found = {structure_key(name): int(value) for name, value in labels.items() if int(value) > 0}
    return [found["lv"], found["myo"]] if "lv" in found and "myo" in found else []


def sampling_section(ctx: _Context) -> dict[str, Any]:
    """``sampling``: class-balanced sampling (paper section 2.3) from the preset."""
    ps = ctx.preset["sampling"]
    return {"max_locations_per_class": int(ps["max_locations_per_class"]),
            "background_as_class": bool(ps["background_as_class"])}


def choose_roi_rule(ctx: _Context) -> str:
    """Rule 12: Net2 on the whole volume (``whole_volume``) when the 95th-percentile cropped case has at most
    the preset's ``inference.whole_volume_max_voxels`` (cine MR: ~1 M voxels, a few Net2 slices' worth),
    so the ROI can never lose the heart on scans unlike the training data; else the preset's rule (a
    CT's whole slices would cost 4-8x its heart box)."""
    inf = ctx.preset["inference"]
    limit = inf["whole_volume_max_voxels"]
    if limit is not None and math.prod(ctx.shape95) <= float(limit):
        return "whole_volume"
    return str(inf["roi_rule"])


def brightening_rule(ctx: _Context) -> dict[str, Any] | None:
    """Rule 13: test-time brightening (off unless the preset's ``inference.brightening`` asks for it). The
    reference is the class brightest in the median training case (the blood pool in bSSFP MR and contrast
    CT); each channel's target is the preset's ``target_quantile`` (percent) of that class's brightness over
    the training cases (the fingerprint's ``class_brightness``), so a case is brightened only where it is
    darker than that share of the data the model learnt from. Only for percentile-normalised (MR) channels:
    it was measured on cine MR, and CT keeps one pass."""
    rule = ctx.preset["inference"]["brightening"]
    if rule is None or any(n["scheme"] != "percentile_clip" for n in normalization_section(ctx)):
        return None  # a CT channel's fixed HU window measures contrast timing, not a scanner's rendering
    medians = ctx.fp["class_brightness_median"][0]
    label = max((c for c in range(1, len(medians)) if medians[c] is not None), key=lambda c: medians[c], default=None)
    if label is None:
        raise HCError("inference.brightening: no foreground class has a brightness in the fingerprint")
    targets = []
    for channel in range(ctx.info.num_channels):
        values = [r["class_brightness"][channel][label] for r in ctx.fp["cases"]
                  if r["class_brightness"][channel][label] is not None]
        targets.append(round(float(np.percentile(values, float(rule["target_quantile"]))), 4))
    return {"label": int(label), "targets": targets, "max_factor": float(rule["max_factor"]),
            "min_voxels": int(rule["min_voxels"])}


def inference_section(ctx: _Context, z_chunk: int) -> dict[str, Any]:
    """``inference``: the ROI rule (rule 12), rule 10's z-chunk and rule 13's brightening."""
    inf = ctx.preset["inference"]
    return {"brightening": brightening_rule(ctx),
            "roi_margin_mm": float(inf["roi_margin_mm"]), "roi_rule": choose_roi_rule(ctx),
            "roi_min_component_fraction": inf["roi_min_component_fraction"],
            "roi_join_distance_mm": inf["roi_join_distance_mm"], "roi_centre_sigma": inf["roi_centre_sigma"],
            "tta": bool(inf["tta"]), "tta_quarter_turns": bool(inf["tta_quarter_turns"]),
            "z_chunk": int(z_chunk),
            "max_z_chunk": None, "memory_budget_gb": None}


def memory_section(ctx: _Context, peaks: Mapping[str, int]) -> dict[str, Any]:
    """``memory``: rule 1's target and usable memory, and every predicted peak (``step1``..``step4``,
    ``inference``, ``baseline``; bytes in, GB out)."""
    return {"target_gb": round(ctx.target_gb, 3), "target_source": ctx.target_source,
            "usable_gb": round(ctx.usable / GiB, 3),
            "model": "meta-device allocation trace of the real networks (fp32, Adam), see planning/memory_model.py",
            "predicted_peak_gb": {name: round(peak / GiB, 3) for name, peak in peaks.items()}}


def class_fractions(fingerprint: Mapping[str, Any]) -> list[float] | None:
    """Share of each class among the labelled voxels of the cropped training volumes (bias prior)."""
    counts = fingerprint.get("class_voxels_total")
    if not counts or sum(counts) <= 0:
        return None
    total = float(sum(counts))
    return [round(c / total, 8) for c in counts]


def fingerprint_summary(ctx: _Context) -> dict[str, Any]:
    """``fingerprint_summary``: for humans, and ``class_fractions`` for ``classifier_bias_init``."""
    return {"num_cases": int(ctx.fp["num_cases"]), "median_spacing": [round(v, 6) for v in ctx.native],
            "fov_mm_p95": [round(v, 3) for v in ctx.fov95],
            "cropped_shape_p95": [round(float(v), 2) for v in ctx.fp["cropped_shape"]["p95"]],
            "min_slices": ctx.min_slices, "class_fractions": class_fractions(ctx.fp)}


# ---------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------

def plan_experiment(fingerprint: dict[str, Any], preset: dict[str, Any], info: DatasetInfo,
                    dataset_id: int | None = None, gpu_memory_gb: float | None = None,
                    machine: str | None = None) -> dict[str, Any]:
    """Make the plans for a dataset: the rules of the module docstring, one function each, assembled.

    ``machine`` (cpu or cuda) selects the preset's machine section; default: cuda when a GPU memory is
    given or detected, else cpu.
    """
    machine, machine_source = choose_machine(machine, gpu_memory_gb)
    preset = preset_for_machine(preset, machine)
    ctx = _Context(fingerprint, preset, info, gpu_memory_gb)  # rules 1-3: budget, full-res grid, planned cases
    K = preset_k(ctx.spacing[0], ctx.min_slices, preset)  # rule 3
    net1 = plan_net1(ctx)  # rule 4
    net2 = plan_net2(ctx, net1, K)  # rules 5, 6
    shapes2 = step2_subvolumes(ctx, net1, net2.subvolumes)  # rule 5
    shapes3 = step3_subvolumes(ctx, net1, net2)  # rule 7
    stack = step4_stack(ctx, net2)  # rule 8
    batches = choose_batch_sizes(ctx, net1, net2, shapes2, shapes3, stack)  # rule 9
    z_chunk, inference_peak = choose_z_chunk(ctx, net1, net2)  # rule 10
    baseline, baseline_peak = plan_baseline(ctx)  # rule 11
    steps = curriculum_steps(ctx, net1, shapes2, shapes3, stack, batches)
    peaks = {**{f"step{step}": peak for step, (_, peak) in batches.items()}, "inference": inference_peak,
             "baseline": baseline_peak}
    planned: dict[str, Any] = {
        "planner_version": PLANNER_VERSION,
        "dataset": dataset_section(ctx, dataset_id, K),
        "preset": preset["name"],
        "machine": machine_section(ctx, machine, machine_source),
        **labels_section(ctx),
        "amp": str(ctx.preset["training"]["amp"]),
        "normalization": normalization_section(ctx),
        "cropping": cropping_section(ctx),
        "full_resolution": full_resolution_section(ctx),
        "net1": net1_section(ctx, net1),
        "net2": net2_section(net2),
        "training": training_section(ctx, steps),
        "augmentation": augmentation_section(ctx),
        "sampling": sampling_section(ctx),
        "inference": inference_section(ctx, z_chunk),
        "baseline_unet": baseline,
        "memory": memory_section(ctx, peaks),
        "fingerprint_summary": fingerprint_summary(ctx),
    }
    plans = split_plans(planned)  # settings apart from the report
    parse_plans(plans, "planner output")  # the planner writes only valid plans
    return plans
