"""Shared fixtures. Tests that need the real data in ../shared/data skip when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def hc_roots(tmp_path, monkeypatch) -> dict[str, Path]:
    """Point HC_RAW / HC_PREPROCESSED / HC_RESULTS at fresh temporary folders."""
    roots = {}
    for key, var in (("raw", "HC_RAW"), ("preprocessed", "HC_PREPROCESSED"), ("results", "HC_RESULTS")):
        roots[key] = tmp_path / key
        roots[key].mkdir()
        monkeypatch.setenv(var, str(roots[key]))
    return roots
