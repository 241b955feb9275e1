"""A CI-sized run of the README's main job: synthetic hearts → plans → four-step training → prediction → metrics."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from heartcascade.workflows.demo import DemoSettings, run_demo

# The demo preset's recipe on a CI budget (~450 iterations instead of 1400, 3 training cases instead of 8):
# the main job must run, write correct outputs, and learn (the full demo's accuracy is measured by
# `hc_demo` itself and recorded in documentation/results.md). Step 4 is cheap (~0.05 s/it) and gets 300
# iterations: with 100, LA and AA/PA stayed near 0 and whether 5 of 7 structures passed 0.35 depended on
# float rounding (measured 2026-12-02: the old and the new code each fell on either side of it).
TINY_SCHEDULE = {"training": {"validation_interval_epochs": 100, "checkpoint_interval_epochs": 100, "steps": {
    "1": {"epochs": 6, "iterations_per_epoch": 20},
    "2": {"epochs": 0},
    "3": {"epochs": 2, "iterations_per_epoch": 20},
    "4": {"epochs": 15, "iterations_per_epoch": 20},
}}}


def test_demo_end_to_end_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("HC_N_PROC_DA", "0")
    out = tmp_path / "demo"
    result = run_demo(DemoSettings(output=out, num_training=3, num_test=1, num_processes=1, fresh=True,
                                   plans_override=TINY_SCHEDULE, device="cpu", progress=False))
    summary = json.loads(result.summary_path.read_text())
    assert summary["num_test"] == 1
    assert set(summary["per_structure"]) == {"LV", "Myo", "RV", "LA", "RA", "AA", "PA"}
    for name, metrics in summary["per_structure"].items():
        assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["jaccard"] <= metrics["dice"] + 1e-9, name
    assert summary["targets"]["whole_heart_dice"] == 0.85 and isinstance(summary["targets"]["met"], bool)
    assert result.overlay_path is not None and result.overlay_path.stat().st_size > 10_000
    # predictions sit exactly on the input grid
    raw = next((out / "raw").iterdir())
    image = sitk.ReadImage(str(next((raw / "imagesTs").iterdir())))
    pred = sitk.ReadImage(str(next(p for p in (out / "predictions").iterdir() if p.name.endswith(".nii.gz"))))
    assert pred.GetSize() == image.GetSize()
    assert pred.GetSpacing() == image.GetSpacing()
    assert pred.GetOrigin() == image.GetOrigin()
    assert pred.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayFromImage(pred))) <= set(range(8))
    # the four training steps ran and were logged
    fold = out / "results" / raw.name / "cascade" / "fold_0"
    assert (fold / "progress.png").is_file() and (fold / "checkpoint_final.pth").is_file()
    records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    assert {r.get("step") for r in train} == {"1", "3", "4"}  # step 2 has 0 epochs in this schedule
    for step_name in ("1", "4"):  # the loss falls within each step that has several epochs
        losses = [r["loss"] for r in train if r["step"] == step_name]
        assert losses[-1] < 0.8 * losses[0], (step_name, losses)
    # and it learned: the heart is found and most structures are largely right. Measured on this CI
    # schedule (2 CPU cores): LV 0.75, Myo 0.67, RV 0.79, RA 0.55, PA 0.52, AA 0.17, LA 0.00 -- ~250
    # iterations are too few for the small atrium and aorta (the full demo reaches >= 0.81 on every one).
    assert summary["whole_heart_dice"] > 0.6, summary["whole_heart"]
    dice = {name: m["dice"] for name, m in summary["per_structure"].items()}
    assert np.mean(list(dice.values())) > 0.3, dice
    assert sum(d > 0.35 for d in dice.values()) >= 5, dice
    assert min(dice["LV"], dice["Myo"], dice["RV"]) > 0.5, dice  # the ventricles and myocardium above all
