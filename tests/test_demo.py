"""A CI-sized run of the README's main job: synthetic hearts → plans → four-step training → prediction → metrics."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from heartcascade.workflows.demo import DemoSettings, run_demo

# Learning itself is asserted in tests/test_training.py; here the whole main job must run and write
# correct outputs in a CI-sized budget.
TINY_SCHEDULE = {"training": {"validation_interval_epochs": 1, "checkpoint_interval_epochs": 1, "steps": {
    "1": {"epochs": 1, "iterations_per_epoch": 2},
    "2": {"epochs": 1, "iterations_per_epoch": 2},
    "3": {"epochs": 1, "iterations_per_epoch": 2},
    "4": {"epochs": 1, "iterations_per_epoch": 2},
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
    assert {r.get("stage") for r in records if r.get("type") == "train"} == {"1", "2", "3", "4"}
