"""The plans file (``plans.json``): a plain dict with a versioned schema, plus small accessors.

Plans are kept as a plain JSON dict on purpose: every later stage (training, prediction, benchmark)
reads them, humans read and occasionally edit them, and a dict round-trips through JSON and
checkpoints without custom classes. Every field is documented in ``documentation/plans.md``.

This module loads/saves/validates them and offers the few derived values other stages need, so the
field layout is spelled out in one place: keyword arguments for the networks (:func:`net1_kwargs`,
:func:`net2_kwargs`, :func:`baseline_kwargs`, :func:`cascade_kwargs`), one training step
(:func:`training_step`) and the hash of the preprocessing-relevant fields (:func:`preprocessing_hash`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from heartcascade.preprocessing.preprocess import PREPROCESSING_VERSION
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

PLANS_VERSION = 1
PLANS_FILE = "plans.json"

#: Top-level keys every plans file has (validated on load).
REQUIRED_KEYS = (
    "plans_version", "dataset", "preset", "modality", "num_input_channels", "labels", "num_classes", "label_codes",
    "normalization", "cropping", "full_resolution", "net1", "net2", "training", "augmentation", "sampling",
    "inference", "baseline_unet", "memory",
)
_SECTION_KEYS = {
    "net1": ("coarse_spacing", "patch_shape", "in_channels", "num_classes", "base_features", "max_features", "widths",
             "dilations", "bottleneck_dilation", "dropout", "kernel_size", "norm"),
    "net2": ("K", "input_mode", "in_channels", "num_classes", "base_features", "max_features", "widths", "num_levels",
             "recursions", "convs_per_level", "dropout", "expansive_kernel", "inplane_tile"),
    "training": ("optimizer", "lr", "steps"),
    "inference": ("roi_margin_mm", "z_chunk", "inplane_tile"),
}
#: plans' Net2 input modes -> the names used by heartcascade.networks (Cascade / net2_input_channels)
NETWORK_INPUT_MODE = {"probabilities": "probs", "labelmap": "label"}
#: ``inference.roi_rule`` values: the ROI from the heart's connected component(s) of Net1's whole-heart
#: probability, or (the rule before plans had the field) the box of every Net1 foreground voxel.
ROI_RULES = ("heart_components", "all_foreground")
#: What plans without the ROI fields get (documentation/plans.md): the heart-component rule.
ROI_DEFAULTS = {"roi_rule": "heart_components", "roi_min_component_fraction": 0.1, "roi_join_distance_mm": 0.0}


def plans_path(preprocessed_dataset_dir: str | os.PathLike) -> Path:
    return Path(preprocessed_dataset_dir) / PLANS_FILE


def validate_plans(plans: Any, source: str = "plans") -> dict[str, Any]:
    """Check version and required fields; raises HCError naming the first problem."""
    if not isinstance(plans, dict):
        raise HCError(f"{source}: plans must be a JSON object")
    version = plans.get("plans_version")
    if version != PLANS_VERSION:
        raise HCError(f"{source}: plans_version {version!r} is not supported (expected {PLANS_VERSION}); "
                      "re-run hc_plan_and_preprocess --overwrite")
    missing = [k for k in REQUIRED_KEYS if k not in plans]
    if missing:
        raise HCError(f"{source}: missing field(s) {', '.join(missing)}")
    for section, keys in _SECTION_KEYS.items():
        lack = [k for k in keys if k not in plans[section]]
        if lack:
            raise HCError(f"{source}: '{section}' lacks field(s) {', '.join(lack)}")
    if plans["net2"]["input_mode"] not in NETWORK_INPUT_MODE:
        raise HCError(f"{source}: net2.input_mode must be one of {', '.join(NETWORK_INPUT_MODE)}, "
                      f"got {plans['net2']['input_mode']!r}")
    k = plans["net2"]["K"]
    if not isinstance(k, int) or k < 1 or k % 2 != 1:
        raise HCError(f"{source}: net2.K must be a positive odd integer, got {k!r}")
    if len(plans["normalization"]) != plans["num_input_channels"]:
        raise HCError(f"{source}: 'normalization' needs one entry per input channel ({plans['num_input_channels']})")
    steps = plans["training"]["steps"]
    if [s.get("step") for s in steps] != [1, 2, 3, 4]:
        raise HCError(f"{source}: training.steps must list steps 1, 2, 3, 4 in order")
    roi_fields(plans, source)
    return plans


def roi_fields(plans: dict[str, Any], source: str = "plans") -> dict[str, Any]:
    """The ROI rule of ``inference`` (``roi_rule``, ``roi_min_component_fraction``, ``roi_join_distance_mm``),
    checked, with :data:`ROI_DEFAULTS` for fields that older plans lack."""
    section = plans.get("inference") or {}
    out = {key: section.get(key, default) for key, default in ROI_DEFAULTS.items()}
    for key, default in ROI_DEFAULTS.items():
        if out[key] is None:
            out[key] = default
    if out["roi_rule"] not in ROI_RULES:
        raise HCError(f"{source}: inference.roi_rule must be one of {', '.join(ROI_RULES)}, got {out['roi_rule']!r}")
    for key, lo, hi in (("roi_min_component_fraction", 0.0, 1.0), ("roi_join_distance_mm", 0.0, float("inf"))):
        value = out[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise HCError(f"{source}: inference.{key} must be a number in [{lo}, {hi}], got {value!r}")
        out[key] = float(value)
    return out


def load_plans(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a plans file (a folder is accepted: its ``plans.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / PLANS_FILE
    return validate_plans(load_json(path), str(path))


def save_plans(path: str | os.PathLike, plans: dict[str, Any]) -> None:
    validate_plans(plans, str(path))
    atomic_write_json(path, plans)


def training_step(plans: dict[str, Any], step: int) -> dict[str, Any]:
    """The ``training.steps`` entry of step 1..4."""
    for entry in plans["training"]["steps"]:
        if entry["step"] == step:
            return entry
    raise HCError(f"plans have no training step {step}")


def net1_kwargs(plans: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net1``."""
    n = plans["net1"]
    return {"in_channels": n["in_channels"], "num_classes": n["num_classes"], "base_features": n["base_features"],
            "max_features": n["max_features"], "dilations": list(n["dilations"]),
            "bottleneck_dilation": n["bottleneck_dilation"], "dropout": n["dropout"],
            "kernel_size": n["kernel_size"], "norm": n["norm"]}


def net2_kwargs(plans: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Net2``."""
    n = plans["net2"]
    return {"in_channels": n["in_channels"], "num_classes": n["num_classes"], "K": n["K"],
            "base_features": n["base_features"], "num_levels": n["num_levels"], "recursions": n["recursions"],
            "max_features": n["max_features"], "convs_per_level": n["convs_per_level"], "dropout": n["dropout"],
            "expansive_kernel": n["expansive_kernel"]}


def cascade_kwargs(plans: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.Cascade`` besides the two networks.

    Scale factors are per case (``properties['coarse_scale_factors']``); pass them to ``forward``.
    """
    return {"input_mode": NETWORK_INPUT_MODE[plans["net2"]["input_mode"]],
            "image_channels": plans["num_input_channels"]}


def baseline_kwargs(plans: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``heartcascade.networks.BaselineUNet3D``."""
    b = plans["baseline_unet"]
    return {"in_channels": plans["num_input_channels"], "num_classes": plans["num_classes"],
            "base_features": b["base_features"], "max_features": b["max_features"], "num_levels": b["num_levels"],
            "norm": b["norm"]}


def preprocessing_fields(plans: dict[str, Any]) -> dict[str, Any]:
    """The plans fields the preprocessed arrays depend on (changing anything else keeps them valid)."""
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


def preprocessing_hash(plans: dict[str, Any]) -> str:
    """Short hash of :func:`preprocessing_fields`; stored with every preprocessed case."""
    text = json.dumps(preprocessing_fields(plans), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
