"""scripts/device_check.sh: its --smoke run on the CPU, its setup errors, and how its summary reports gaps."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from heartcascade.benchmark.device_check import EXIT_INCOMPLETE, EXIT_OK, EXIT_TIME_CAP, summarise

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "device_check.sh"


def _env() -> dict[str, str]:
    # the script's own settings come from the arguments alone
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HC_PYTHON", "HC_VENV", "HC_WHEEL_DIR",
                                                                      "HC_DEVICE", "HC_CHECK_", "HC_NNUNET"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def _positive(record: dict, *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value, record)
        assert math.isfinite(value) and value > 0, (key, value, record)


def test_smoke_run_prints_every_record_kind(tmp_path):
    """The real script, --smoke on the CPU with this interpreter: eager steps 1-4, compiled step 4,
    hc_predict file to file, nnU-Net (skipped unless importable) and the summary, as JSON lines."""
    out_file = tmp_path / "check.jsonl"
    # a generous cap: the smoke run's own 150 s default is for a free machine, this suite may share one
    run = subprocess.run(["bash", str(SCRIPT), "--smoke", "--device", "cpu", "--python", sys.executable,
                          "--output", str(out_file), "--work", str(tmp_path / "work"), "--time-cap", "540"],
                         env=_env(), capture_output=True, text=True, timeout=600)
    lines = [l for l in run.stdout.splitlines() if l.strip()]
    records = [json.loads(l) for l in lines]  # stdout holds JSON lines only
    assert out_file.read_text().splitlines() == lines
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["benchmark"], []).append(r)
    summary = by["device_check_summary"][0]
    errors = [r for r in records if "error" in r or r["benchmark"].endswith("error")]
    assert run.returncode == 0, (summary, errors, run.stderr[-2000:])
    assert summary["complete"] is True and summary["missing"] == [] and summary["exit_status"] == 0
    assert summary["smoke"] is True and 0 < summary["wall_s"] <= summary["time_cap_s"] == 540
    for kind in ("device_check_setup", "environment", "loader", "training_step", "predict_cli",
                 "predict_inprocess", "device_check_training", "device_check_predict", "device_check_nnunet"):
        assert kind in by, (kind, sorted(by))
    setup = by["device_check_setup"][0]
    assert setup["device"] == "cpu" and setup["python"] == sys.executable and setup["how"] == "given interpreter"

    training = by["device_check_training"]
    assert [(r["step"], r["compile"]) for r in training] == [("1", False), ("2", False), ("3", False),
                                                             ("4", False), ("4", True)]
    for r in training:
        _positive(r, "step_s", "loader_batches_per_s")
        assert isinstance(r["outpaces"], bool), r
        assert r["amp"] == "off" and r["gpu_peak_allocated_gb"] is None  # CPU: float32, no GPU
    compiled = [r for r in by["training_step"] if r["compile"]]
    assert [r["step"] for r in compiled] == ["4"]

    predict = by["device_check_predict"][0]
    _positive(predict, "wall_s", "peak_rss_gb", "inprocess_predict_s")
    assert predict["roi"] == "reference" and predict["gpu_peak_allocated_gb"] is None
    assert os.path.isfile(by["predict_cli"][0]["output"])

    nnunet = by["device_check_nnunet"][0]
    if "skipped" in nnunet:
        assert "nnunetv2 is not importable" in nnunet["skipped"], nnunet
    else:
        _positive(nnunet, "predict_s", "ratio_nnunet_over_heartcascade")
    assert not any("error" in r for r in records), [r for r in records if "error" in r]


@pytest.mark.parametrize("args, message", [
    (["--python", "/nonexistent/python"], "--python /nonexistent/python: no such interpreter"),
    (["--venv", "{tmp}/no_venv", "--wheel-dir", "{tmp}/no_wheels"], "no wheel folder"),
    (["--time-cap", "soon"], "--time-cap must be a whole number"),
])
def test_setup_failure_is_one_line_and_non_zero(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    run = subprocess.run(["bash", str(SCRIPT), "--smoke", *args], env=_env(), capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and run.stderr.startswith("device_check: error: "), run.stderr
    assert message in run.stderr
    assert not (tmp_path / "no_venv").exists()


def test_broken_interpreter_fails_in_the_import_check(tmp_path):
    # this interpreter without its site packages: heartcascade's requirements cannot be imported
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    run = subprocess.run(["bash", str(SCRIPT), "--smoke", "--python", str(python)], env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.startswith("device_check: error: setup failed: cannot import the requirements with "), run.stderr
    assert len(run.stderr.splitlines()) == 1 and "ModuleNotFoundError" in run.stderr, run.stderr


def test_new_venv_uses_the_base_interpreters_torch(tmp_path):
    """No venv yet: one is made on top of this interpreter's packages (a .pth file, which also works when
    the base is itself a venv, as on the GPU machines) and the checkout installed into it, offline."""
    import torch

    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    wheels.mkdir()
    run = subprocess.run(["bash", str(SCRIPT), "--setup-only", "--device", "cpu", "--venv", str(venv),
                          "--wheel-dir", str(wheels), "--base-python", sys.executable], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    setup = json.loads(run.stdout)
    assert setup["benchmark"] == "device_check_setup" and setup["how"].startswith(f"venv {venv} created")
    assert setup["python"] == str(venv / "bin" / "python") and setup["torch"] == str(torch.__version__)
    assert not (venv / ".hc_device_check_incomplete").exists()
    # the second run reuses it as it is
    again = subprocess.run(["bash", str(SCRIPT), "--setup-only", "--device", "cpu", "--venv", str(venv)],
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["how"] == f"reused venv {venv}", again.stderr


def _step(step: str, compiled: bool, **extra) -> dict:
    return {"benchmark": "training_step", "step": step, "compile": compiled, "amp": "bf16", "step_s": 0.5,
            "loader_batches_per_s": 4.0, "outpaces": True, **extra}


def test_summary_names_what_is_missing_and_why():
    eager = [_step(s, False) for s in "1234"] + [
        {"benchmark": "predict_cli", "roi": "reference", "wall_s": 20.0, "peak_rss_gb": 3.0,
         "gpu_peak_allocated_gb": 5.0},
        {"benchmark": "nnunet", "skipped": "nnunetv2 is not importable"}]
    compiled = [_step("1", True), {"benchmark": "training", "error": "timed out after 200 s"}]
    out = summarise(eager, compiled, ["1", "2", "3", "4"], ["1", "2", "3", "4"],
                    {"compile": "time cap of 480 s reached during this run"}, 480.0, 480.0, False)
    summary = out[-1]
    assert summary["exit_status"] == EXIT_TIME_CAP and not summary["complete"]
    # the section's own error is the reason given for each compiled step it did not reach
    assert summary["missing"] == [f"device_check_training step {s} compile: training: timed out after 200 s"
                                  for s in "234"]
    assert out[4]["compile"] is True and out[4]["step_s"] == 0.5
    assert out[-2] == {"benchmark": "device_check_nnunet", "skipped": "nnunetv2 is not importable"}
    assert out[-3]["gpu_peak_allocated_gb"] == 5.0

    whole = summarise(eager, [_step(s, True) for s in "1234"], list("1234"), list("1234"), {}, 300.0, 480.0, False)
    assert whole[-1]["exit_status"] == EXIT_OK and whole[-1]["missing"] == []
    no_predict = summarise(eager[:4], [_step(s, True) for s in "1234"], list("1234"), list("1234"), {}, 1.0, 480.0,
                           True)
    assert no_predict[-1]["exit_status"] == EXIT_INCOMPLETE
    assert no_predict[-1]["missing"] == ["device_check_predict: no predict_cli record",
                                         "device_check_nnunet: no nnunet record"]
