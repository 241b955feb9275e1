"""Two-channel data end to end through the console commands (subprocesses): plan and preprocess, hc_train
with a custom --splits file, hc_predict with -f of that fold, hc_evaluate."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_fixture import LABELS, SPACING_XYZ, make_case  # noqa: E402
from test_bad_inputs import SHORT_TRAINING, run  # noqa: E402

DATASET_ID = 971


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin((-10.0, 5.0, 30.0))
    sitk.WriteImage(image, str(path))


def test_two_channels_plan_train_with_splits_predict_evaluate(tmp_path):
    roots = {k: tmp_path / k for k in ("raw", "pre", "res")}
    for p in roots.values():
        p.mkdir()
    raw = roots["raw"] / f"Dataset{DATASET_ID:03d}_TwoChannel"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (raw / sub).mkdir(parents=True)
    ids = [f"tiny_{i:03d}" for i in range(4)]
    for i, cid in enumerate(ids):
        image, label = make_case(i)
        split = "Ts" if i == 3 else "Tr"
        _write(image, raw / f"images{split}" / f"{cid}_0000.nii.gz")
        _write(np.sqrt(np.clip(image, 0, None)) * 10, raw / f"images{split}" / f"{cid}_0001.nii.gz")  # 2nd contrast
        _write(label, raw / f"labels{split}" / f"{cid}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR", "1": "MR2"}, "labels": dict(LABELS),
                                                  "numTraining": 3, "file_ending": ".nii.gz"}))
    assert run("hc_verify_dataset", "-d", DATASET_ID, "--no-progress", roots=roots).returncode == 0

    proc = run("hc_plan_and_preprocess", "-d", DATASET_ID, "--preset", "demo", "-np", 1, "--no-progress", roots=roots)
    assert proc.returncode == 0, proc.stderr
    pre = roots["pre"] / raw.name
    plans = json.loads((pre / "plans.json").read_text())
    assert plans["settings"]["num_input_channels"] == 2 and len(plans["settings"]["normalization"]) == 2
    assert np.load(pre / "data" / "tiny_000_image.npy", mmap_mode="r").shape[0] == 2

    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ids[:2], "val": [ids[2]]}]))
    proc = run("hc_train", DATASET_ID, "0", "--splits", splits, "--device", "cpu", "--num-workers", "0", "--quiet",
               "--plans-override", json.dumps(SHORT_TRAINING), roots=roots)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fold = roots["res"] / raw.name / "cascade" / "fold_0"
    checkpoint = fold / "checkpoint_final.pth"
    assert checkpoint.is_file()
    # the custom split was used: the fold validated exactly the case the file names
    predicted = sorted(p.name for p in (fold / "validation").glob("*.nii.gz"))
    assert predicted == [f"{ids[2]}.nii.gz"], predicted

    out = tmp_path / "pred"
    proc = run("hc_predict", "-i", raw / "imagesTs", "-o", out, "-d", DATASET_ID, "-f", "0", "--device", "cpu",
               "--quiet", roots=roots)
    assert proc.returncode == 0 and "1 predicted" in proc.stdout, proc.stdout + proc.stderr
    pred = sitk.ReadImage(str(out / f"{ids[3]}.nii.gz"))
    ref = sitk.ReadImage(str(raw / "imagesTs" / f"{ids[3]}_0000.nii.gz"))
    assert (pred.GetSize(), pred.GetSpacing(), pred.GetOrigin()) == (ref.GetSize(), ref.GetSpacing(), ref.GetOrigin())
    proc = run("hc_evaluate", "-ref", raw / "labelsTs", "-pred", out, "-d", DATASET_ID, "--quiet", roots=roots)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "summary.json").read_text())["num_cases"] == 1

    # one channel file for the two-channel model: that case fails with its reason, the run says so
    single = tmp_path / "single"
    single.mkdir()
    (single / "x_0000.nii.gz").write_bytes((raw / "imagesTs" / f"{ids[3]}_0000.nii.gz").read_bytes())
    proc = run("hc_predict", "-i", single, "-o", tmp_path / "pred2", "-d", DATASET_ID, "-f", "0", "--device", "cpu",
               "--quiet", roots=roots)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "missing channel file(s) x_0001" in proc.stderr, proc.stderr
