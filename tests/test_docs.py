"""Documentation that is generated or promised: usage.md's command reference and the nnU-Net guide."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("update_usage", REPO / "scripts" / "update_usage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_usage_reference_matches_help():
    script = _script()
    current = script.USAGE.read_text(encoding="utf-8")
    _, block, _, version = script.split(current)
    from heartcascade.cli import COMMANDS

    assert all(f"### {command}\n```\nusage: {command}" in block for command in COMMANDS)
    if version != script.python_version():
        pytest.skip(f"usage.md was generated with Python {version}; argparse lays help out differently in "
                    f"{script.python_version()}")
    assert script.render(current) == current, "usage.md is out of date: run python scripts/update_usage.py"


def test_coming_from_nnunet_guide_covers_the_mapping():
    text = (REPO / "documentation" / "coming_from_nnunet.md").read_text(encoding="utf-8")
    for needle in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train", "nnUNetv2_predict", "nnUNetv2_evaluate_folder",
                   "nnUNetv2_ensemble", "nnUNet_raw", "splits_final.json", "-chk", "--preset cpu", "region",
                   "2D", "MPS", "hc_export_model"):
        assert needle in text, needle
    assert sys.version_info >= (3, 10)
