"""hc_benchmark: a --quick smoke run on a tiny synthetic CT, plus the measurement helpers."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from heartcascade.benchmark import memory
from heartcascade.benchmark.roi_patch import reference_box
from heartcascade.benchmark.sections import shrink_to_fit
from heartcascade.cli.benchmark import main as benchmark_main

COMMON_KEYS = {"benchmark", "case", "device", "torch", "cpus"}


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value, record)


def test_quick_benchmark_smoke(tmp_path, capsys):
    """The real command on a tiny synthetic CT: every section but the memory-model checks (run
    separately by tests/test_planning.py), training step 4 only, the hc_predict console script."""
    import importlib.util

    # nnU-Net is not installed in the project's environment: the comparison must say it was skipped
    # (with an interpreter that has it, it would run for minutes: point it at a missing one then)
    nnunet_python = sys.executable if importlib.util.find_spec("nnunetv2") is None else sys.executable + "-missing"
    code = benchmark_main(["--quick", "--device", "cpu", "--cases", "ct", "--skip", "memory", "--steps", "4",
                           "--roi", "net1", "--work", str(tmp_path / "work"), "--compare-nnunet",
                           "--nnunet-python", nnunet_python])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    records = [json.loads(l) for l in lines]  # every stdout line is one JSON object
    by = {}
    for r in records:
        assert COMMON_KEYS <= set(r), r
        by.setdefault(r["benchmark"], []).append(r)
    nn = by.pop("nnunet")[0]
    # reported with the reason, not silently dropped: the reason names what is missing
    expected_reason = ("nnunetv2 is not importable" if nnunet_python == sys.executable
                       else f"--nnunet-python {nnunet_python}: no such interpreter")
    assert isinstance(nn["skipped"], str) and expected_reason in nn["skipped"], nn
    assert "nnunet_predict" not in by, by.get("nnunet_predict")
    assert code == 0
    assert all("error" not in r for rs in by.values() for r in rs), [r for rs in by.values() for r in rs if "error" in r]
    for name in ("environment", "dataset", "preprocessing", "plans", "model", "loader", "training_step",
                 "predict_cli", "predict_inprocess", "summary"):
        assert name in by, (name, sorted(by))
    env = by["environment"][0]
    assert env["device"] == "cpu" and env["cpus"] == os.cpu_count() and env["torch"]
    pre = by["preprocessing"][0]
    _positive(pre, "seconds_per_case_mean", "fingerprint_and_plan_s", "main_peak_rss_gb")
    assert set(pre["seconds"]) == {"ct_small_000", "ct_small_001"}
    assert by["plans"][0]["K"] >= 3
    loader = by["loader"][0]
    assert loader["step"] == "4"
    _positive(loader, "batches_per_s", "sample_ms_in_process")
    step = by["training_step"][0]
    assert step["step"] == "4" and step["timed_iterations"] == 1
    _positive(step, "step_s", "peak_rss_gb", "net1_precompute_s")
    cli = by["predict_cli"][0]
    assert cli["roi"] == "net1" and cli["returncode"] == 0 and cli["how"].startswith("hc_predict")
    _positive(cli, "wall_s", "peak_rss_gb")
    assert os.path.isfile(cli["output"])
    inproc = by["predict_inprocess"][0]
    _positive(inproc, "predict_s", "predict_preprocessed_s", "preprocess_s", "file_to_file_s", "peak_rss_gb")
    assert inproc["gpu_peak_allocated_gb"] is None  # CPU run
    box, shape = inproc["roi_box"], inproc["preprocessed_shape"]
    assert len(box) == len(shape) == 3 and all(0 <= a < b <= n for (a, b), n in zip(box, shape)), (box, shape)
    fraction = np.prod([b - a for a, b in box]) / np.prod(shape)
    assert 0 < inproc["roi_fraction"] <= 1 and abs(inproc["roi_fraction"] - fraction) < 1e-3, inproc
    assert by["summary"][0]["failures"] == 0


_PEAK_RSS_CHECK = """
import time
import numpy as np
from heartcascade.benchmark import memory
with memory.PeakRss() as base:
    time.sleep(0.1)
with memory.PeakRss() as big:
    a = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    if not big.exact:
        time.sleep(0.2)  # sampled every 20 ms: a shorter-lived block is invisible to a sampler by design
    del a
print(big.method, big.peak - base.peak)
"""


def test_peak_rss_tracks_a_large_allocation():
    # In a fresh interpreter: once hc_predict's tune_host_allocator() has run in this process (other
    # tests call it), freed 64 MiB blocks stay in the heap and are reused, so the peak would not move.
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_CHECK], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    method, grown = out.stdout.split()[-2:]
    assert int(grown) > 50 * 2**20, out.stdout


def test_run_measured_reports_child_peak_rss_and_output():
    code = "import numpy as np, sys; a = np.ones(96 * 2**20 // 8); print('hi'); sys.exit(3)"
    run = memory.run_measured([sys.executable, "-c", code], timeout=60)
    assert run.returncode == 3 and run.stdout.strip() == "hi" and not run.timed_out
    assert run.peak_rss_bytes > 96 * 2**20 and run.wall_s > 0


def test_shrink_to_fit_keeps_multiples_and_fixed_axes():
    shape = shrink_to_fit([9, 512, 512], lambda s: float(np.prod(s)), 9 * 100 * 100, [9, 8, 8], [1, 8, 8], fixed=(0,))
    assert shape[0] == 9 and all(s % 8 == 0 for s in shape[1:]) and np.prod(shape) <= 9 * 100 * 100
    assert shrink_to_fit([64, 64, 64], lambda s: 0.0, 1.0, [16] * 3, [16] * 3) == [64, 64, 64]


def test_reference_box_in_canonical_order_with_margin():
    label = np.zeros((20, 30, 40), np.uint8)  # (z, y, x)
    label[5:10, 10:20, 12:30] = 1
    props = {"crop_bbox_zyx": [[0, 20], [0, 30], [2, 40]], "slice_axis": 0,  # slice axis x: canonical (x, z, y)
             "shape": [38, 20, 30], "spacing": [1.0, 2.0, 1.0], "coarse_shape": [38, 20, 30]}
    box = reference_box(label, props, margin_mm=2.0)
    # x 12..30 -> cropped 10..28, grown by 2 voxels; z 5..10 grown by 1 (2 mm / 2 mm); y 10..20 grown by 2
    assert box == ((8, 30), (4, 11), (8, 22))
