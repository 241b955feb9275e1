"""The planner: preset + dataset fingerprint + GPU memory target -> plans (see documentation/plans.md).

Rules, in the order they are applied:

1. **Memory budget.** target = ``--gpu-memory-gb``, else the preset's ``memory.target_gb``, else the
   detected CUDA GPU, else ``memory.default_target_gb`` (12 GB, the paper's K40). The networks may use
   ``usable = target * usable_fraction - reserve_gb`` (CUDA context, allocator fragmentation).
2. **Full-resolution grid.** Net2 works at the data's own resolution. Only when in-plane spacings vary
   widely across cases (max/min > ``max_inplane_spacing_ratio`` = 2) a common in-plane spacing -- the
   median in-plane spacing -- is chosen; slices are never resampled.
3. **K** (odd) = the odd number nearest ``k_extent_mm / slice spacing`` (ties up), clamped to
   [``k_min``, ``k_max``] = [3, 9] and to the thinnest case's (cropped) slice count: 9 for CT with 0.5-0.7
   mm slices, 3 for 8 mm MR. The clamp uses the median case: a thinner outlier is left out of the plan
   (``dataset.excluded_cases``) instead of lowering K for everyone.
4. **Net1's coarse spacing.** The smallest isotropic spacing ``s`` (never finer than the data; per axis
   ``max(native, s)``; searched on a geometric grid of step ``coarse_spacing_step``) at which Net1
   trains on the whole 95th-percentile field of view (cropped extent in mm) at batch 1 within the
   budget. If even ``max_coarse_spacing_mm`` does not fit, Net1's widths are halved and the search
   repeats. The patch is that field of view on the coarse grid, rounded up to multiples of 16.
5. **Subvolumes.** The paper's edges {64, 128, 256} voxels of a 512-voxel field of view are scaled
   to the median in-plane field of view (mm), converted to voxels per axis at full resolution, in-plane
   rounded to Net2's divisor, depth at least K+2 and at most the thinnest case's slice count.
6. **Net2's widths**: the largest base width (halving from the preset's) at which step 4 (a stack of
   K full slices of the 95th-percentile in-plane size) and step 3 (the smallest subvolume) fit at batch
   1. If none does, the minimal width is used and Net2 works on in-plane tiles.
7. **Step-3 subvolumes** that do not fit are shrunk, depth first (Net1 still sees the whole in-plane
   context it needs), then in-plane.
8. **Step-4 stacks** are K slices of that in-plane size (or tile), capped at the preset's step-4
   ``max_inplane_mm`` when set (a heart-sized window around the sampled voxel).
9. **Batch sizes** per step: the largest up to the preset's ``max_batch_size`` that fits for the
   step's largest input.
10. **Inference**: the largest z-chunk (up to ``max_z_chunk`` output slices) for which Net2 fits.
11. **Baseline 3D U-Net** on data resampled to 2 mm (native where coarser): the whole 95th-percentile
    field of view if it fits, else shrunk along its longest axis; widths halved if even 32^3 fails.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

from heartcascade.dataset.dataset_json import CT_NAMES, DatasetInfo
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import memory_model
from heartcascade.planning.augmentation_plan import AugmentationParams, augmentation_dict
from heartcascade.planning.plans import PLANS_VERSION, ROI_DEFAULTS, validate_plans
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
        import torch

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
    section = (preset.get("machines") or {}).get(machine)
    return deep_merge(base, section) if section else copy.deepcopy(base)


def memory_target(preset: dict[str, Any], gpu_memory_gb: float | None = None) -> tuple[float, str]:
    """Memory target in GiB and where it came from (rule 1)."""
    if gpu_memory_gb is not None:
        if gpu_memory_gb <= 0:
            raise HCError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}")
        return float(gpu_memory_gb), "--gpu-memory-gb"
    mem = preset["memory"]
    if mem.get("target_gb") is not None:
        return float(mem["target_gb"]), f"preset '{preset.get('name')}'"
    detected = detect_gpu_memory_gb()
    if detected is not None:
        return round(detected, 2), "detected CUDA GPU"
    return float(mem.get("default_target_gb", 12.0)), "default (no CUDA GPU found; the paper's 12 GB K40)"


def usable_bytes(target_gb: float, preset: dict[str, Any]) -> int:
    mem = preset["memory"]
    usable = target_gb * float(mem.get("usable_fraction", 0.85)) - float(mem.get("reserve_gb", 0.5))
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
    cap = max(1, int(cap))
    top = peak(cap)
    if top <= usable:  # the common case with ample memory: one check
        return cap, top
    best, best_peak = 1, peak(1)
    for b in range(2, cap):
        p = peak(b)
        if p > usable:
            break
        best, best_peak = b, p
    return best, best_peak


# ---------------------------------------------------------------------------------------------------
# The planner
# ---------------------------------------------------------------------------------------------------

class _Context:
    """Everything the rules share: fingerprint-derived geometry, budget, preset."""

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
        self.inplane = choose_inplane_spacing(fingerprint, preset["full_resolution"].get("max_inplane_spacing_ratio", 2.0))
        self.spacing = list(self.native) if self.inplane is None else [self.native[0]] + list(self.inplane)
        self.fov95 = [float(v) for v in fingerprint["fov_mm"]["p95"]]
        self.fov_median = [float(v) for v in fingerprint["fov_mm"]["median"]]
        self.min_slices = int(fingerprint["min_slices"])
        small = fingerprint.get("too_small_cases") or {}
        slices = sorted(r["cropped_shape"][0] for r in fingerprint.get("cases", []) if r["case_id"] not in small)
        if slices:  # a case thinner than the K the typical case allows is left out; it does not lower K
            p2 = preset["net2"]
            k = choose_k(self.spacing[0], slices[(len(slices) - 1) // 2], float(p2.get("k_extent_mm", 6.0)),
                         int(p2.get("k_min", 3)), int(p2.get("k_max", 9)))
            self.min_slices = min(n for n in slices if n >= k)
        if self.inplane is None:
            self.shape95 = [int(round(v)) for v in fingerprint["cropped_shape"]["p95"]]
        else:
            self.shape95 = [int(round(f / s)) for f, s in zip(self.fov95, self.spacing)]


def _net1_kwargs(ctx: _Context, base: int) -> dict[str, Any]:
    p = ctx.preset["net1"]
    return {"in_channels": ctx.channels, "num_classes": ctx.num_classes, "base_features": int(base),
            "max_features": int(p["max_features"]), "dilations": list(p["dilations"]),
            "bottleneck_dilation": p["bottleneck_dilation"], "dropout": float(p["dropout"]),
            "kernel_size": int(p["kernel_size"]), "norm": p["norm"]}


def _net2_kwargs(ctx: _Context, base: int, K: int) -> dict[str, Any]:
    p = ctx.preset["net2"]
    mode = p.get("input_mode", "probabilities")
    extra = ctx.num_classes if mode == "probabilities" else 1
    return {"in_channels": ctx.channels + extra, "num_classes": ctx.num_classes, "K": int(K),
            "base_features": int(base), "num_levels": int(p["num_levels"]), "recursions": int(p["recursions"]),
            "max_features": int(p["max_features"]), "convs_per_level": int(p.get("convs_per_level", 2)),
            "dropout": float(p.get("dropout", 0.0)), "expansive_kernel": int(p.get("expansive_kernel", 5))}


def _coarse_axes(native: Sequence[float], s: float) -> list[float]:
    """Per-axis coarse spacing for isotropic target ``s``: never finer than the data; an axis within
    COARSE_SNAP of ``s`` keeps its native spacing (it is not resampled, see preprocess.coarse_scale_factors)."""
    factors = coarse_scale_factors(native, [max(n, s) for n in native])
    return [n / f for n, f in zip(native, factors)]


def coarse_patch(fov_mm: Sequence[float], coarse_spacing: Sequence[float]) -> list[int]:
    return [ceil_to(f / c, NET1_DIVISOR) for f, c in zip(fov_mm, coarse_spacing)]


def choose_coarse_spacing(ctx: _Context) -> tuple[list[float], list[int], dict[str, Any], int]:
    """Rule 4. Returns (coarse spacing, Net1 patch, Net1 kwargs, batch-1 peak bytes)."""
    p = ctx.preset["net1"]
    s0 = max(min(ctx.native[1:]), float(p.get("min_coarse_spacing_mm") or 0.0))
    s_max = max(s0, float(p.get("max_coarse_spacing_mm") or 8.0))
    step = float(p.get("coarse_spacing_step", 1.05))
    grid = [s0 * step ** k for k in range(int(math.log(s_max / s0) / math.log(step)) + 1)] or [s0]
    base = int(p["base_features"])
    while True:
        kw = _net1_kwargs(ctx, base)
        key = _key(kw)

        def peak(s: float) -> int:
            return _net1(key, 1, tuple(coarse_patch(ctx.fov95, _coarse_axes(ctx.native, s))), True).peak

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
            return [round(v, 4) for v in spacing], coarse_patch(ctx.fov95, spacing), kw, peak(s)
        if base // 2 < int(p.get("min_base_features", 4)):
            raise HCError(f"memory target {ctx.target_gb:g} GB is too small: Net1 does not fit even at "
                          f"{s_max:g} mm with {base} base features (usable {ctx.usable / GiB:.2f} GB)")
        base //= 2


def nominal_subvolumes(ctx: _Context, K: int, divisor: int) -> list[list[int]]:
    """Rule 5: the paper's edges scaled to the data, in full-res voxels (D, H, W), ascending."""
    sv = ctx.preset["subvolumes"]
    fov_inplane = (ctx.fov_median[1] + ctx.fov_median[2]) / 2
    min_d = min(K + int(sv.get("min_extra_slices", 2)), ctx.min_slices)
    shapes = []
    for edge in sv["reference_edges"]:
        mm_edge = float(edge) / float(sv["reference_fov_voxels"]) * fov_inplane
        d = int(min(max(round(mm_edge / ctx.spacing[0]), min_d), ctx.min_slices))
        hw = []
        for axis in (1, 2):
            limit = ceil_to(ctx.shape95[axis], divisor)
            hw.append(min(round_to(mm_edge / ctx.spacing[axis], divisor, int(sv.get("min_inplane", 32))), limit))
        shape = [d] + hw
        if shape not in shapes:
            shapes.append(shape)
    return sorted(shapes, key=lambda s: math.prod(s))


def step4_tile(tile: Sequence[int], inplane_spacing: Sequence[float], max_inplane_mm: float | None,
               divisor: int) -> list[int]:
    """Step-4 stacks' in-plane size: the memory tile, capped at ``max_inplane_mm`` when the preset sets it.

    Net2 only ever predicts inside the heart ROI, so whole slices (mostly arms, liver and air on a
    320 mm MR field of view) spend most of a step-4 iteration on context it never sees at test time;
    a tile a little larger than a heart (rounded up to Net2's divisor) trains on what it will meet.
    """
    if max_inplane_mm is None:
        return [int(t) for t in tile]
    return [min(int(t), ceil_to(float(max_inplane_mm) / float(sp), divisor)) for t, sp in zip(tile, inplane_spacing)]


def _shrink(shape: list[int], min_d: int, min_hw: int, divisor: int) -> list[int] | None:
    """One shrinking step: depth first (x0.75), then in-plane (x0.8); None when nothing is left to shrink."""
    d, h, w = shape
    if d > min_d:
        return [max(min_d, int(d * 0.75)), h, w]
    if max(h, w) > min_hw:
        return [d, max(min_hw, round_to(h * 0.8, divisor, min_hw)), max(min_hw, round_to(w * 0.8, divisor, min_hw))]
    return None


def plan_experiment(fingerprint: dict[str, Any], preset: dict[str, Any], info: DatasetInfo,
                    dataset_id: int | None = None, gpu_memory_gb: float | None = None,
                    machine: str | None = None) -> dict[str, Any]:
    """Make the plans for a dataset (see the module docstring for the rules).

    ``machine`` (cpu or cuda) selects the preset's machine section; default: cuda when a GPU memory is
    given or detected, else cpu.
    """
    if machine is None:
        machine, machine_source = ("cuda", "--gpu-memory-gb") if gpu_memory_gb is not None else (detect_machine(), "detected")
    else:
        machine_source = "--machine"
    preset = preset_for_machine(preset, machine)
    ctx = _Context(fingerprint, preset, info, gpu_memory_gb)
    usable = ctx.usable
    p1, p2, tr = preset["net1"], preset["net2"], preset["training"]
    step_presets = {s["step"]: s for s in tr["steps"]}

    # K and Net1's coarse grid
    K = choose_k(ctx.spacing[0], ctx.min_slices, float(p2.get("k_extent_mm", 6.0)), int(p2.get("k_min", 3)),
                 int(p2.get("k_max", 9)))
    coarse_spacing, patch1, n1kw, _ = choose_coarse_spacing(ctx)
    k1 = _key(n1kw)
    factors = tuple(coarse_scale_factors(ctx.spacing, coarse_spacing))
    b1, peak1 = _largest_batch(lambda b: _net1(k1, b, tuple(patch1), True).peak, usable,
                               step_presets[1].get("max_batch_size", 1))
    net1_params = _net1(k1, 1, tuple(patch1), True).parameters
    net1_infer = _net1(k1, 1, tuple(patch1), False)

    # Net2 widths (rule 6) with step-4 stacks of K full slices and the smallest subvolume
    divisor = 2 ** int(p2["num_levels"])
    full_slice = [ceil_to(ctx.shape95[1], divisor), ceil_to(ctx.shape95[2], divisor)]
    shapes = nominal_subvolumes(ctx, K, divisor)
    mode = p2.get("input_mode", "probabilities")
    base2 = int(p2["base_features"])
    min_base2 = int(p2.get("min_base_features", 8))

    def step4_peak(kw2: dict[str, Any], batch: int, tile: Sequence[int]) -> int:
        train = _net2(_key(kw2), batch, (K, int(tile[0]), int(tile[1])), True)
        return max(train.peak + net1_params, net1_infer.peak + train.parameters + train.optimizer_state)

    def step3_peak(kw2: dict[str, Any], batch: int, shape: Sequence[int]) -> int:
        return _cascade(k1, _key(kw2), mode, batch, tuple(int(v) for v in shape), factors).peak

    while True:
        n2kw = _net2_kwargs(ctx, base2, K)
        if (step4_peak(n2kw, 1, full_slice) <= usable and step3_peak(n2kw, 1, shapes[0]) <= usable) \
                or base2 // 2 < min_base2:
            break
        base2 //= 2
    tile = list(full_slice)
    while step4_peak(n2kw, 1, tile) > usable and max(tile) > divisor:
        tile = [max(divisor, round_to(t * 0.8, divisor, divisor)) for t in tile]

    # Step-3 subvolumes (rule 7)
    min_d = min(K + int(preset["subvolumes"].get("min_extra_slices", 2)), ctx.min_slices)
    min_hw = min(int(preset["subvolumes"].get("min_inplane", 32)), min(tile))
    shapes3: list[list[int]] = []
    for shape in shapes:
        cur: list[int] | None = [shape[0], min(shape[1], tile[0]), min(shape[2], tile[1])]
        while cur is not None and step3_peak(n2kw, 1, cur) > usable:
            cur = _shrink(cur, min_d, min_hw, divisor)
        if cur is not None and cur not in shapes3:
            shapes3.append(cur)
    if not shapes3:
        shapes3 = [[min_d, min_hw, min_hw]]
    shapes3.sort(key=lambda s: math.prod(s))

    # Step-2 subvolumes: Net1 alone on the coarse version of the subvolumes
    def coarse_of(shape: Sequence[int]) -> list[int]:
        return [ceil_to(max(1, math.floor(n * f + 0.5)), NET1_DIVISOR) for n, f in zip(shape, factors)]

    shapes2 = [s for s in shapes if _net1(k1, 1, tuple(coarse_of(s)), True).peak <= usable] or [shapes[0]]
    b2, peak2 = _largest_batch(lambda b: _net1(k1, b, tuple(coarse_of(shapes2[-1])), True).peak, usable,
                               step_presets[2].get("max_batch_size", 1))
    b3, peak3 = _largest_batch(lambda b: step3_peak(n2kw, b, shapes3[-1]), usable,
                               step_presets[3].get("max_batch_size", 1))
    stack_tile = step4_tile(tile, ctx.spacing[1:], step_presets[4].get("max_inplane_mm"), divisor)
    b4, peak4 = _largest_batch(lambda b: step4_peak(n2kw, b, stack_tile), usable,
                               step_presets[4].get("max_batch_size", 1))

    # Inference (rule 9)
    inf = preset["inference"]
    k2 = _key(n2kw)

    def infer_peak(z: int) -> int:
        return _net2(k2, 1, (z + K - 1, tile[0], tile[1]), False).peak + net1_params

    z_hi = max(1, int(inf.get("max_z_chunk", 64)))
    z = z_hi
    if infer_peak(z) > usable:
        lo, hi = 1, z_hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if infer_peak(mid) <= usable:
                lo = mid
            else:
                hi = mid - 1
        z = lo
    net2_params = _net2(k2, 1, (K, tile[0], tile[1]), False).parameters
    peak_inf = max(net1_infer.peak + net2_params, infer_peak(z))

    baseline = _plan_baseline(ctx)
    aug = _augmentation(ctx)

    def step_entry(n: int, name: str, train: list[str], losses: list[str], inp: str,
                   batch: int, peak: int, **extra: Any) -> dict[str, Any]:
        sp = step_presets[n]
        return {"step": n, "name": name, "enabled": bool(sp.get("enabled", True)), "train": train,
                "losses": list(sp.get("losses", losses)), "input": inp, **extra, "batch_size": int(batch),
                "epochs": int(sp.get("epochs", 200)), "iterations_per_epoch": int(sp.get("iterations_per_epoch", 16)),
                "lr": float(sp.get("lr", tr.get("lr", 1e-4))), "predicted_peak_gb": round(peak / GiB, 3),
                "time_fraction": None if sp.get("time_fraction") is None else float(sp["time_fraction"])}

    steps = [
        step_entry(1, "net1_whole_volume", ["net1"], ["L1_ROI"], "whole_coarse_volume", b1, peak1,
                   patch_shape=patch1),
        step_entry(2, "net1_subvolumes", ["net1"], ["L1", "L1_ROI"], "subvolumes", b2, peak2,
                   subvolume_shapes=shapes2, coarse_patch_shapes=[coarse_of(s) for s in shapes2]),
        step_entry(3, "cascade_subvolumes", ["net1", "net2"], ["L1", "L2"], "subvolumes", b3, peak3,
                   subvolume_shapes=shapes3),
        step_entry(4, "net2_slice_stacks", ["net2"], ["L2"], "slice_stacks", b4, peak4,
                   stack_shape=[K] + stack_tile),
    ]
    num_workers = min(int(tr.get("num_workers", 4)), max(1, (os.cpu_count() or 2) - 1))
    plans: dict[str, Any] = {
        "plans_version": PLANS_VERSION,
        "planner_version": PLANNER_VERSION,
        "dataset": {"name": info.folder.name, "id": dataset_id, "num_training_cases": int(fingerprint["num_cases"]),
                    "excluded_cases": fpmod.excluded_cases(fingerprint, K)},
        "preset": preset.get("name"),
        "machine": {"kind": machine, "source": machine_source, "cpu_count": os.cpu_count(),
                    "gpu_memory_gb": None if machine == "cpu" else round(ctx.target_gb, 3)},
        "modality": info.modality,
        "num_input_channels": ctx.channels,
        "channel_names": dict(info.channel_names),
        "labels": dict(info.labels),
        "num_classes": ctx.num_classes,
        "label_codes": {str(k): int(v) for k, v in info.label_codes.items()} if info.label_codes else None,
        "amp": str(tr.get("amp", "bf16")),
        "normalization": _normalization(ctx),
        "cropping": {"method": "ct_hu_threshold" if info.modality == "ct" else "relative_threshold",
                     "margin_mm": float(preset["cropping"].get("margin_mm", 10.0))},
        "full_resolution": {
            "inplane_spacing": ctx.inplane,
            "inplane_spacing_ratio": round(float(fingerprint["inplane_spacing_ratio"]), 4),
            "max_inplane_spacing_ratio": float(preset["full_resolution"].get("max_inplane_spacing_ratio", 2.0)),
            "median_spacing": [round(v, 6) for v in ctx.native],
            "spacing": [round(v, 6) for v in ctx.spacing],
            "shape_p95": ctx.shape95,
            "min_slices": ctx.min_slices,
        },
        "net1": {"coarse_spacing": coarse_spacing, "patch_shape": patch1,
                 "coarse_shape_median": [int(round(f / c)) for f, c in zip(ctx.fov_median, coarse_spacing)],
                 **n1kw, "widths": [min(n1kw["base_features"] * 2 ** i, n1kw["max_features"]) for i in range(5)],
                 "required_divisor": NET1_DIVISOR},
        "net2": {"K": K, "input_mode": mode, **{k: v for k, v in n2kw.items() if k != "K"},
                 "widths": [min(n2kw["base_features"] * 2 ** i, n2kw["max_features"]) for i in range(n2kw["num_levels"] + 1)],
                 "required_divisor": divisor, "full_slice_shape": full_slice, "tiling": tile != full_slice},
        "training": {"weight_decay": float(tr.get("weight_decay", 0.0)),
                     "dice_weighting": str(tr.get("dice_weighting", "inverse_count")),
                     "classifier_bias_init": str(tr.get("classifier_bias_init", "zero")), "steps": steps,
                     "lr_schedule": str(tr.get("lr_schedule", "constant")),
                     "warmup_iterations": int(tr.get("warmup_iterations", 0)),
                     "grad_clip": None if tr.get("grad_clip", 12.0) is None else float(tr.get("grad_clip", 12.0)),
                     "ema_momentum": float(tr.get("ema_momentum", 0.9)),
                     "keep_best_per_step": bool(tr.get("keep_best_per_step", False)),
                     "time_budget_s": None if tr.get("time_budget_s") is None else float(tr["time_budget_s"]),
                     "budget_probe_iterations": int(tr.get("budget_probe_iterations", 10)),
                     "validation_interval_epochs": int(tr.get("validation_interval_epochs", 10)),
                     "checkpoint_interval_epochs": int(tr.get("checkpoint_interval_epochs", 10)),
                     "checkpoint_interval_iterations": int(tr.get("checkpoint_interval_iterations", 0)),
                     "val_max_cases": None if tr.get("val_max_cases") is None else int(tr["val_max_cases"]),
                     "num_workers": num_workers, "seed": int(tr.get("seed", 0))},
        "augmentation": aug,
        "sampling": {"max_locations_per_class": int(preset["sampling"].get("max_locations_per_class", 10000)),
                     "background_as_class": bool(preset["sampling"].get("background_as_class", True))},
        "inference": {"roi_margin_mm": float(inf.get("roi_margin_mm", 10.0)),
                      **{k: inf.get(k, v) for k, v in ROI_DEFAULTS.items()}, "z_chunk": int(z),
                      "max_z_chunk": None, "memory_budget_gb": None, "predicted_peak_gb": round(peak_inf / GiB, 3)},
        "baseline_unet": baseline,
        "memory": {"target_gb": round(ctx.target_gb, 3), "target_source": ctx.target_source,
                   "usable_gb": round(usable / GiB, 3),
                   "model": "meta-device allocation trace of the real networks (fp32, Adam), see planning/memory_model.py",
                   "predicted_peak_gb": {"step1": steps[0]["predicted_peak_gb"], "step2": steps[1]["predicted_peak_gb"],
                                         "step3": steps[2]["predicted_peak_gb"], "step4": steps[3]["predicted_peak_gb"],
                                         "inference": round(peak_inf / GiB, 3),
                                         "baseline": baseline["predicted_peak_gb"]}},
        "fingerprint_summary": {
            "num_cases": int(fingerprint["num_cases"]),
            "median_spacing": [round(v, 6) for v in ctx.native],
            "fov_mm_p95": [round(v, 3) for v in ctx.fov95],
            "cropped_shape_p95": [round(float(v), 2) for v in fingerprint["cropped_shape"]["p95"]],
            "min_slices": ctx.min_slices,
            "class_fractions": _class_fractions(fingerprint),
        },
    }
    return validate_plans(plans, "planner output")


def _class_fractions(fingerprint: Mapping[str, Any]) -> list[float] | None:
    """Share of each class among the labelled voxels of the cropped training volumes (bias prior)."""
    counts = fingerprint.get("class_voxels_total")
    if not counts or sum(counts) <= 0:
        return None
    total = float(sum(counts))
    return [round(c / total, 8) for c in counts]


def _normalization(ctx: _Context) -> list[dict[str, Any]]:
    """CT channels: clip to the fingerprint's foreground 0.5/99.5 percentiles; others: per-case percentiles."""
    pn = ctx.preset["normalization"]
    lo_q, hi_q = float(pn.get("percentile_low", 0.5)), float(pn.get("percentile_high", 99.5))
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


def _augmentation(ctx: _Context) -> dict[str, Any]:
    """The preset's ranges; with thick slices (> 3x in-plane) rotations only about the slice axis."""
    aug = copy.deepcopy(ctx.preset["augmentation"])
    if ctx.spacing[0] > 3.0 * min(ctx.spacing[1:]):
        rot = list(aug.get("rotation_deg", [15.0, 15.0, 15.0]))
        aug["rotation_deg"] = [rot[0], 0.0, 0.0]
    return augmentation_dict(AugmentationParams.from_dict(aug, "preset"))  # every field, defaults written out


def _plan_baseline(ctx: _Context) -> dict[str, Any]:
    """Rule 10: the plain 3D U-Net comparator on a ~2 mm grid."""
    pb = ctx.preset["baseline_unet"]
    target = float(pb.get("spacing_mm", 2.0))
    spacing = [max(n, target) for n in ctx.native]
    levels = int(pb.get("num_levels", 4))
    div = 2 ** levels
    base = int(pb["base_features"])
    while True:
        kw = {"in_channels": ctx.channels, "num_classes": ctx.num_classes, "base_features": base,
              "max_features": int(pb["max_features"]), "num_levels": levels, "norm": pb.get("norm", "instance")}
        key = _key(kw)
        patch = [ceil_to(f / s, div) for f, s in zip(ctx.fov95, spacing)]
        while _baseline(key, 1, tuple(patch)).peak > ctx.usable:
            mm_extent = [p * s for p, s in zip(patch, spacing)]
            axis = max((a for a in range(3) if patch[a] > div), key=lambda a: mm_extent[a], default=None)
            if axis is None:
                break
            patch[axis] = max(div, patch[axis] - div)
        if _baseline(key, 1, tuple(patch)).peak <= ctx.usable or base // 2 < 2:
            break
        base //= 2
    batch, peak = _largest_batch(lambda b: _baseline(key, b, tuple(patch)).peak, ctx.usable,
                                 int(pb.get("max_batch_size", 2)))
    return {"spacing": [round(s, 4) for s in spacing], "patch_shape": patch, "batch_size": batch,
            "base_features": base, "max_features": int(pb["max_features"]), "num_levels": levels,
            "norm": pb.get("norm", "instance"),
            "widths": [min(base * 2 ** i, int(pb["max_features"])) for i in range(levels + 1)],
            "lr": float(pb.get("lr", 1e-4)), "epochs": int(pb.get("epochs", 800)),
            "iterations_per_epoch": int(pb.get("iterations_per_epoch", 16)), "losses": list(pb.get("losses", ["multiclass_dice"])),
            "predicted_peak_gb": round(peak / GiB, 3)}
