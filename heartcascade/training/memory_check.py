"""Refuse batch sizes and shapes that cannot fit the training device before training starts.

Why: the plans are a hand-editable file, and a ``batch_size`` of 10**6 (or patch shapes of millions of
voxels) used to pass validation and end the run in a MemoryError traceback after the data were loaded.
Each step's memory is estimated with the planner's memory model (planning/memory_model.py) where the
step's network is certain, else by the bytes of its input batch alone; both are lower bounds of what
the step needs, so a plan that fits is never refused. The bound is the device's whole memory (the GPU's,
or the machine's RAM on the CPU).
"""
from __future__ import annotations

import math
import os
import torch

from heartcascade.planning import memory_model
from heartcascade.planning.plans import BASELINE_STEP, Plans, StepPlan, baseline_kwargs, net1_kwargs, net2_kwargs
from heartcascade.utils.errors import HCError

GiB = 2**30


def device_memory_bytes(device: torch.device) -> int | None:
    """The device's total memory (GPU memory, else physical RAM); None when unknown."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def input_bytes(step: StepPlan, channels: int) -> int:
    """Bytes of one batch of the step's largest input (float32 image + uint8 target), exact integers."""
    largest = max((math.prod(int(v) for v in shape) for shape in step.shapes), default=0)
    return int(step.batch_size) * largest * (4 * int(channels) + 1)


def _model_estimate(plans: Plans, step: StepPlan, backend: str) -> int | None:
    """The memory model's peak where the step's network is certain (Net1 on the coarse volume, Net2 on
    slice stacks, the baseline), else None."""
    if not step.shapes:
        return None
    shape = max(step.shapes, key=lambda s: math.prod(int(v) for v in s))
    try:
        if step.name == BASELINE_STEP:
            return memory_model.baseline_memory(baseline_kwargs(plans), step.batch_size, shape, True, backend).peak
        if step.input == "whole_coarse_volume":
            return memory_model.net1_memory(net1_kwargs(plans), step.batch_size, shape, True, backend).peak
        if step.input == "slice_stacks":
            return memory_model.net2_memory(net2_kwargs(plans), step.batch_size, shape, True, backend).peak
    except (RuntimeError, ValueError, OverflowError, MemoryError):  # sizes beyond what torch can even describe
        return None
    return None


def check_training_memory(plans: Plans, steps: dict[str, StepPlan], device: torch.device) -> None:
    """One-line HCError naming the plans field when a step cannot fit ``device``'s memory."""
    total = device_memory_bytes(device)
    if total is None:
        return
    for name, step in steps.items():
        need = input_bytes(step, plans.num_input_channels)
        if need <= total:
            need = max(need, _model_estimate(plans, step, device.type) or 0)
        if need > total:
            field = "baseline_unet" if name == BASELINE_STEP else f"training.steps[{name}]"
            shapes = " ".join("x".join(str(v) for v in s) for s in step.shapes)
            raise HCError(f"plans: {field}.batch_size {step.batch_size} with input shape(s) {shapes} needs at least "
                          f"{need / GiB:.1f} GiB, more than the {total / GiB:.1f} GiB of {device.type} memory; "
                          "lower the batch size or the shapes (or re-plan with hc_plan_and_preprocess)")
