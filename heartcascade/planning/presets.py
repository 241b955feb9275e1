"""Planner presets: the human-editable starting points (``plans/<name>.json`` at the repository top).

A preset holds the method's fixed choices and upper bounds (schedule, learning rate, maximal widths,
augmentation ranges, ...); the planner turns it into dataset- and memory-specific plans. The folder is
``$HC_PRESETS_DIR`` when set (users' own presets), else the presets shipped inside the installed package
(``heartcascade/presets``, built from ``plans/``), else ``<repo>/plans`` of a source checkout.
``--preset`` also accepts a path to a JSON file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import heartcascade
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json

PRESET_VERSION = 1
DEFAULT_PRESET = "default"
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
    preset.setdefault("name", path.stem)
    preset["_source"] = str(path)
    return preset
