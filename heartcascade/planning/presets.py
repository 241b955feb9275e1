"""Planner presets: the human-editable starting points (``plans/<name>.json`` at the repository top).

A preset holds the method's fixed choices and upper bounds (schedule, learning rate, maximal widths,
augmentation ranges, ...); the planner turns it into dataset- and memory-specific plans. The folder is
``$HC_PRESETS_DIR`` when set (users' own presets), else the presets shipped inside the installed package
(``heartcascade/presets``, built from ``plans/``), else ``<repo>/plans`` of a source checkout.
``--preset`` also accepts a path to a JSON file.

Defaults live in one place, :data:`PRESET_DEFAULTS` below: every preset key the planner reads and a preset
may leave out, with its value. :func:`load_preset` merges the preset onto them, so the planner reads
values (``preset["net2"]["k_min"]``), never ``.get(key, fallback)``; tests/test_planning.py holds the line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import heartcascade
from heartcascade.planning.augmentation_plan import AugmentationParams, augmentation_dict
from heartcascade.planning.curriculum import CURRICULUM_STEPS
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json
from heartcascade.utils.merge import deep_merge

PRESET_VERSION = 1
DEFAULT_PRESET = "default"
#: What a preset that leaves a key out gets (documentation/plans.md). Keys without an entry here are required.
PRESET_DEFAULTS: dict[str, Any] = {
    "memory": {"target_gb": None, "default_target_gb": 12.0, "usable_fraction": 0.85, "reserve_gb": 0.5},
    "cropping": {"margin_mm": 10.0},
    "normalization": {"percentile_low": 0.5, "percentile_high": 99.5},
    "full_resolution": {"max_inplane_spacing_ratio": 2.0},
    "net1": {"min_base_features": 4, "min_coarse_spacing_mm": None, "max_coarse_spacing_mm": 8.0,
             "coarse_spacing_step": 1.05},
    "net2": {"k_extent_mm": 6.0, "k_min": 3, "k_max": 9, "min_base_features": 8, "convs_per_level": 2,
             "dropout": 0.0, "expansive_kernel": 5, "input_mode": "probabilities"},
    "subvolumes": {"min_inplane": 32, "min_extra_slices": 2},
    "training": {
        "lr": 1e-4, "amp": "bf16", "weight_decay": 0.0, "dice_weighting": "inverse_count",
        "classifier_bias_init": "zero", "lr_schedule": "constant", "warmup_iterations": 0, "grad_clip": 12.0,
        "ema_momentum": 0.9, "keep_best_per_step": False, "time_budget_s": None, "budget_probe_iterations": 10,
        "validation_interval_epochs": 10, "checkpoint_interval_epochs": 10, "checkpoint_interval_iterations": 0,
        "val_max_cases": None, "num_workers": 4, "num_threads": None, "seed": 0,
        # per step; lr null: the training lr; losses: the curriculum's (planning/curriculum.py)
        "steps": [{"step": row.step, "enabled": True, "losses": list(row.losses), "epochs": 200,
                   "iterations_per_epoch": 16, "lr": None, "max_batch_size": 1, "time_fraction": None,
                   "max_inplane_mm": None} for row in CURRICULUM_STEPS]},
    "augmentation": augmentation_dict(AugmentationParams()),
    "sampling": {"max_locations_per_class": 10000, "background_as_class": True},
    "inference": {"roi_margin_mm": 10.0, "roi_rule": "heart_components", "roi_min_component_fraction": 0.1,
                  "roi_join_distance_mm": 0.0, "roi_centre_sigma": 0.0, "tta": False, "tta_quarter_turns": False,
                  "max_z_chunk": 64, "whole_volume_max_voxels": None,
                  # null: off; else {"target_quantile": q, "max_factor": f, "min_voxels": n} (planner rule 13)
                  "brightening": None},
    "baseline_unet": {"spacing_mm": 2.0, "num_levels": 4, "norm": "instance", "max_batch_size": 2, "lr": 1e-4,
                      "epochs": 800, "iterations_per_epoch": 16, "losses": ["L"]},
    "machines": {},
}
_REQUIRED = ("memory", "cropping", "normalization", "full_resolution", "net1", "net2", "subvolumes", "training",
             "augmentation", "sampling", "inference", "baseline_unet")


def presets_dir() -> Path:
    env = os.environ.get("HC_PRESETS_DIR")
    if env:
        return Path(env).expanduser()
    package = Path(heartcascade.__file__).resolve().parent
    if (package / "presets").is_dir():  # a wheel install: plans/ was packaged as heartcascade.presets
        return package / "presets"
    return package.parent / "plans"


def available_presets() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def load_preset(name: str) -> dict[str, Any]:
    """Load a preset by name (from :func:`presets_dir`) or by path to a JSON file; validates it."""
    path = Path(name)
    if not (path.suffix == ".json" and path.is_file()):
        path = presets_dir() / f"{name}.json"
        if not path.is_file():
            names = ", ".join(available_presets()) or "none"
            raise HCError(f"unknown preset {name!r}: {path} not found (available in {presets_dir()}: {names})")
    preset = load_json(path)
    if not isinstance(preset, dict):
        raise HCError(f"{path}: a preset must be a JSON object")
    if preset.get("preset_version") != PRESET_VERSION:
        raise HCError(f"{path}: preset_version {preset.get('preset_version')!r} is not {PRESET_VERSION}")
    missing = [k for k in _REQUIRED if k not in preset]
    if missing:
        raise HCError(f"{path}: preset lacks section(s) {', '.join(missing)}")
    steps = preset["training"].get("steps", [])
    if [s.get("step") for s in steps] != [1, 2, 3, 4]:
        raise HCError(f"{path}: training.steps must list steps 1, 2, 3, 4 in order")
    preset = deep_merge(PRESET_DEFAULTS, preset)
    preset.setdefault("name", path.stem)
    preset["_source"] = str(path)
    return preset
