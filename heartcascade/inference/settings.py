"""The plans' ``inference`` section and the other plans fields the predictor reads, with their defaults.

Parsed once per predictor (:class:`InferenceSettings`); the label-code helpers map training labels to
the dataset's own codes for written files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from heartcascade.planning.plans import NETWORK_INPUT_MODE, ROI_DEFAULTS, roi_fields
from heartcascade.utils.errors import HCError

#: Bytes of working memory Net2 / the baseline may use per pass when the plans do not say (CPU).
DEFAULT_CPU_BUDGET = 1.0 * 2**30
#: Fraction of free GPU memory Net2 / the baseline may use per pass when the plans do not say.
GPU_BUDGET_FRACTION = 0.5
DEFAULT_ROI_MARGIN_MM = 10.0
DEFAULT_BASELINE_SPACING = (2.0, 2.0, 2.0)


@dataclass
class InferenceSettings:
    """The plans' ``inference`` section (documentation/plans.md), with defaults for missing fields."""

    roi_margin_mm: float = DEFAULT_ROI_MARGIN_MM
    z_chunk: int | None = None             # output slices per Net2 pass; None = from the memory budget
    memory_budget_bytes: float | None = None
    baseline_spacing: tuple[float, float, float] = DEFAULT_BASELINE_SPACING
    baseline_patch: tuple[int, int, int] | None = None
    max_z_chunk: int | None = None         # cap on the automatic chunk
    roi_rule: str = ROI_DEFAULTS["roi_rule"]
    roi_min_component_fraction: float = ROI_DEFAULTS["roi_min_component_fraction"]
    roi_join_distance_mm: float = ROI_DEFAULTS["roi_join_distance_mm"]

    @classmethod
    def from_plans(cls, plans: Mapping[str, Any]) -> "InferenceSettings":
        section = plans.get("inference") or {}
        if not isinstance(section, Mapping):
            raise HCError("plans: 'inference' must be an object")
        s = cls()
        margin = section.get("roi_margin_mm")
        if margin is not None:
            s.roi_margin_mm = float(margin)
        chunk = section.get("z_chunk")
        if chunk is not None:
            s.z_chunk = int(chunk)
        if section.get("max_z_chunk") is not None:
            s.max_z_chunk = int(section["max_z_chunk"])
        if section.get("memory_budget_gb") is not None:
            s.memory_budget_bytes = float(section["memory_budget_gb"]) * 2**30
        s.baseline_spacing, s.baseline_patch = _baseline_grid(plans, s.baseline_spacing)
        roi = roi_fields(dict(plans), "plans")
        s.roi_rule, s.roi_min_component_fraction = roi["roi_rule"], roi["roi_min_component_fraction"]
        s.roi_join_distance_mm = roi["roi_join_distance_mm"]
        if s.roi_margin_mm < 0:
            raise HCError(f"plans: inference.roi_margin_mm must be >= 0, got {s.roi_margin_mm}")
        if s.z_chunk is not None and s.z_chunk < 1:
            raise HCError(f"plans: inference.z_chunk must be >= 1, got {s.z_chunk}")
        return s


def _triple(value: Any, what: str) -> tuple[Any, Any, Any]:
    if isinstance(value, (int, float)):
        return (value, value, value)
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(value)  # type: ignore[return-value]
    raise HCError(f"plans: {what} must be a number or three numbers (D, H, W), got {value!r}")


def _baseline_grid(plans: Mapping[str, Any], default: tuple[float, float, float]):
    """Baseline spacing and sliding-window patch from ``baseline_unet`` (planner) or ``baseline``."""
    spacing, patch = default, None
    for name in ("baseline_unet", "baseline"):
        section = plans.get(name)
        if not isinstance(section, Mapping):
            continue
        value = section.get("spacing_mm", section.get("spacing"))
        if value is not None:
            spacing = tuple(float(v) for v in _triple(value, f"{name}.spacing_mm"))  # type: ignore[assignment]
        for key in ("patch_shape", "patch_size"):
            if section.get(key) is not None:
                patch = tuple(int(v) for v in _triple(section[key], f"{name}.{key}"))
                break
        sizes = (section.get("training") or {}).get("patch_sizes") if isinstance(section.get("training"), Mapping) else None
        if patch is None and sizes:
            patch = max((tuple(int(v) for v in _triple(p, f"{name}.training.patch_sizes")) for p in sizes),
                        key=lambda p: int(np.prod(p)))
        break
    return spacing, patch


def net2_input_mode(plans: Mapping[str, Any]) -> str:
    """Net2's input form as the networks name it: 'probs' or 'label' (plans may say probabilities/labelmap)."""
    mode = str((plans.get("net2") or {}).get("input_mode", "probs"))
    mode = NETWORK_INPUT_MODE.get(mode, mode)
    if mode not in NETWORK_INPUT_MODE.values():
        raise HCError(f"plans: net2.input_mode must be 'probabilities' or 'labelmap', got {mode!r}")
    return mode


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
