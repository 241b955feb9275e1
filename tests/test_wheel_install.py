"""A non-editable install works: build the wheel, install it alone into a fresh virtual environment
and plan + preprocess a tiny dataset with its console command.

Why: with ``pip install .`` nothing of the source checkout is importable, so package data missing
from the wheel (the planner presets once were) only shows up here. The fresh environment gets the
wheel without dependencies; torch, SimpleITK & co. come from the test's own environment through a
``.pth`` line, which adds that ``site-packages`` folder to ``sys.path`` but never runs its ``.pth`` files,
so an editable heartcascade installed there stays invisible.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would make the source checkout importable or pick other presets."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HC_PRESETS_DIR")}
    env.update(extra)
    return env


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _clean_env())
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, f"{cmd[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def _build_flags() -> list[str]:
    """Build with this environment's setuptools when it can make wheels itself (>= 70.1, or with the
    ``wheel`` package; torch depends on setuptools, so usually yes): no download, about a second.
    Otherwise pip's isolated build fetches setuptools."""
    try:
        import setuptools
    except ImportError:
        return []
    major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    try:
        import wheel  # noqa: F401  (only whether it is there)
        has_wheel = True
    except ImportError:
        has_wheel = False
    return ["--no-build-isolation"] if (major, minor) >= (70, 1) or has_wheel else []


def test_wheel_plans_and_preprocesses_in_fresh_venv(tmp_path):
    from _training_fixture import LABELS, SPACING_XYZ, make_case

    # 1. build the wheel from a copy of the sources (no build/ or egg-info litter in the checkout)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy2(REPO / "setup.py", src / "setup.py")
    for folder in ("heartcascade", "plans"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", *_build_flags(), "-q", "-w", tmp_path / "dist", src])
    wheels = list((tmp_path / "dist").glob("heartcascade-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as zf:
        names = set(zf.namelist())
    assert {f"heartcascade/presets/{name}.json" for name in ("paper", "demo", "cpu")} <= names

    # 2. a fresh venv with only the wheel; dependencies visible from this environment
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    vpython = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", vpython, "install", "--no-deps", "-q", wheels[0]])
    vsite = Path(_run([vpython, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (vsite / "_hc_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    # 3. a tiny raw dataset, planned and preprocessed with the installed console command
    roots = {var: tmp_path / var for var in ("HC_RAW", "HC_PREPROCESSED", "HC_RESULTS")}
    raw = roots["HC_RAW"] / "Dataset077_WheelTest"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for i in range(2):
        image, label = make_case(i)
        for array, path in ((image, raw / "imagesTr" / f"w{i}_0000.nii.gz"), (label, raw / "labelsTr" / f"w{i}.nii.gz")):
            img = sitk.GetImageFromArray(array)
            img.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(img, str(path))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": LABELS,
                                                  "numTraining": 2, "file_ending": ".nii.gz"}))
    env = _clean_env(OMP_NUM_THREADS="1", **{var: str(path) for var, path in roots.items()})
    where = _run([vpython, "-c", "import heartcascade, sys; print(heartcascade.__file__)"], env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    result = _run([venv / "bin" / "hc_plan_and_preprocess", "-d", "77", "-np", "1", "--quiet"], env=env,
                  cwd=tmp_path)
    from heartcascade.planning.presets import DEFAULT_PRESET

    assert f"preset {DEFAULT_PRESET}" in result.stdout  # the packaged default preset was found
    out = roots["HC_PREPROCESSED"] / "Dataset077_WheelTest"
    assert json.loads((out / "plans.json").read_text())["preset"] == DEFAULT_PRESET
    assert len(list(out.rglob("w0*"))) >= 1 and len(list(out.rglob("w1*"))) >= 1
    listed = _run([vpython, "-c", "from heartcascade.planning.presets import available_presets as a; print(a())"],
                  env=env, cwd=tmp_path)
    assert {"paper", "demo", "cpu"} <= set(eval(listed.stdout)), listed.stdout
    assert np.isfinite(json.loads((out / "plans.json").read_text())["memory"]["target_gb"])
