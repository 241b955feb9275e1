"""The plans fields the predictor reads, taken once from the typed plans (:class:`InferenceSettings`); the
label-code helpers map training labels to the dataset's own codes for written files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from heartcascade.planning.plans import Plans, as_plans
from heartcascade.utils.errors import HCError

#: Bytes of working memory Net2 / the baseline may use per pass when the plans do not say (CPU).
DEFAULT_CPU_BUDGET = 1.0 * 2**30
#: Fraction of free GPU memory Net2 / the baseline may use per pass when the plans do not say.
GPU_BUDGET_FRACTION = 0.5


@dataclass(frozen=True)
class InferenceSettings:
    """The plans' ``inference`` section and the other fields prediction follows (documentation/plans.md)."""

    roi_margin_mm: float
    z_chunk: int | None                    # output slices per Net2 pass; None = from the memory budget
    memory_budget_bytes: float | None
    baseline_spacing: tuple[float, float, float]
    baseline_patch: tuple[int, int, int]
    max_z_chunk: int | None                # cap on the automatic chunk
    roi_rule: str
    roi_min_component_fraction: float
    roi_join_distance_mm: float
    input_mode: str                        # Net2's input form (plans' net2.input_mode)
    amp: str                               # autocast on CUDA: the plans' amp, as in training
    usable_gb: float                       # the planner's usable memory (CUDA budget)
    roi_centre_sigma: float = 0.0          # position weight of the heart-component ROI rule (0 = off)
    tta: bool = False                      # mirroring test-time augmentation unless the caller decides

    @classmethod
    def from_plans(cls, plans: Plans | Mapping[str, Any]) -> "InferenceSettings":
        p = as_plans(plans)
        inf = p.inference
        return cls(roi_margin_mm=inf.roi_margin_mm, z_chunk=inf.z_chunk,
                   memory_budget_bytes=None if inf.memory_budget_gb is None else inf.memory_budget_gb * 2**30,
                   baseline_spacing=p.baseline_unet.spacing, baseline_patch=p.baseline_unet.patch_shape,
                   max_z_chunk=inf.max_z_chunk, roi_rule=inf.roi_rule,
                   roi_min_component_fraction=inf.roi_min_component_fraction,
                   roi_join_distance_mm=inf.roi_join_distance_mm, input_mode=p.net2.input_mode, amp=p.amp,
                   usable_gb=p.memory.usable_gb, roi_centre_sigma=inf.roi_centre_sigma,
                   tta=inf.tta)


def label_codes_from(plans: Mapping[str, Any], dataset_json: Mapping[str, Any] | None = None) -> dict[int, int] | None:
    """Training label -> the dataset's own code (e.g. 1 -> 500), from the plans or dataset.json."""
    for source in (plans, dataset_json or {}):
        codes = source.get("label_codes")
        if codes:
            return {int(k): int(v) for k, v in codes.items()}
    return None


def code_lookup(label_codes: Mapping[int, int] | None, num_classes: int) -> np.ndarray | None:
    """Lookup table training label -> code in the smallest integer type that holds every code."""
    if not label_codes:
        return None
    values = [0] + [int(label_codes.get(c, c)) for c in range(1, num_classes)]
    lo, hi = min(values), max(values)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            break
    else:
        raise HCError(f"label codes {lo}..{hi} do not fit a 32-bit integer")
    return np.asarray(values, dtype=dtype)
