#!/usr/bin/env python
"""Convert a model zip (or a training fold's checkpoints) from plans_version 2 to 3, weights untouched.

Version 3 only moved fields (issue #24): the planner's records -- versions, preset, dataset, machine, memory
estimates, fingerprint summary, widths, the median and 95th-percentile geometry -- went from beside the
settings into a ``report`` part; the rest became ``settings``. The three copies of the memory model's peaks
(``training.steps[].predicted_peak_gb``, ``inference.predicted_peak_gb``, ``baseline_unet.predicted_peak_gb``)
were dropped: ``memory.predicted_peak_gb`` holds the same numbers. No value that takes effect changes, so a
model trained under version 2 predicts the same after conversion. heartcascade itself reads only the current
version (older plans: re-plan with ``--overwrite``); this one-off script exists so the shipped model and
models trained just before the change need not be retrained. It was used on the shipped
``heartcascade/pretrained/cine_mr_lv_myo_rv.zip``.

Usage::

    python scripts/convert_model_plans_v3.py model.zip                 # rewritten in place, atomically
    python scripts/convert_model_plans_v3.py RESULTS/Dataset030_X/cascade/fold_all   # its checkpoints + plans.json
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from heartcascade.model.checkpoint import load_checkpoint, save_checkpoint
from heartcascade.planning.plans import PLANS_VERSION, parse_plans, split_plans
from heartcascade.utils.atomic import atomic_path, atomic_write_json

PEAK_COPIES = ("inference", "baseline_unet")


def convert_plans(old: dict[str, Any], source: str) -> dict[str, Any]:
    """A version-2 plans dict as version 3 (a version-3 dict is returned unchanged), validated."""
    if old.get("plans_version") == PLANS_VERSION:
        return old
    if old.get("plans_version") != 2:
        raise SystemExit(f"{source}: plans_version {old.get('plans_version')!r}: only version 2 converts")
    planned = {k: json.loads(json.dumps(v)) for k, v in old.items() if k != "plans_version"}
    for step in planned["training"]["steps"]:
        step.pop("predicted_peak_gb", None)
    for section in PEAK_COPIES:
        planned[section].pop("predicted_peak_gb", None)
    new = split_plans(planned)
    parse_plans(new, source)
    return new


def convert_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        entries = [(info, zf.read(info.filename)) for info in zf.infolist()]
    with atomic_path(path, suffix=".zip") as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in entries:
            name = info.filename
            if name.endswith(".pth"):
                state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
                state["plans"] = convert_plans(state["plans"], f"{path}:{name}")
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
            elif name.endswith("plans.json"):
                data = (json.dumps(convert_plans(json.loads(data), f"{path}:{name}"), indent=2) + "\n").encode()
            elif name == "heartcascade_model.json":
                manifest = json.loads(data)
                manifest["plans_version"] = PLANS_VERSION
                data = (json.dumps(manifest, indent=2) + "\n").encode()
            elif name == "README.md":
                data = re.sub(rb"plans_version \d+", f"plans_version {PLANS_VERSION}".encode(), data)
            out.writestr(info, data)
    print(f"{path}: plans_version {PLANS_VERSION}")


def convert_folder(folder: Path) -> None:
    for checkpoint in sorted(folder.glob("checkpoint_*.pth")):
        state = load_checkpoint(checkpoint)
        state["plans"] = convert_plans(state["plans"], str(checkpoint))
        save_checkpoint(checkpoint, state)
        print(f"{checkpoint}: plans_version {PLANS_VERSION}")
    plans = folder / "plans.json"
    if plans.is_file():
        atomic_write_json(plans, convert_plans(json.loads(plans.read_text()), str(plans)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="model zips or fold folders")
    args = parser.parse_args()
    for path in args.paths:
        convert_zip(path) if path.suffix == ".zip" else convert_folder(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
