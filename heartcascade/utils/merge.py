"""Recursive merge of plans-like dicts: presets' machine sections, ``--plans-override``.

One rule for both, so an override and a machine section read the same way: dicts merge, lists of
curriculum steps merge entry by entry (matched by their ``"step"`` number), everything else replaces.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in recursively (dicts merge, everything else replaces)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        elif _is_step_list(value) and _is_step_list(out.get(key)):
            # training.steps: entries are matched by their "step" number, so an override may give
            # only {"step": 2, "epochs": 3}.
            merged = [copy.deepcopy(e) for e in out[key]]
            index = {e["step"]: i for i, e in enumerate(merged)}
            for entry in value:
                if entry["step"] in index:
                    merged[index[entry["step"]]] = deep_merge(merged[index[entry["step"]]], entry)
                else:
                    merged.append(copy.deepcopy(entry))
            out[key] = merged
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_step_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(e, Mapping) and "step" in e for e in value)
