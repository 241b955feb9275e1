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


#: The heavy tests (`make test-fast` runs everything else): whole modules, or single tests as "module::name".
SLOW = {
    "test_demo.py", "test_wheel_install.py", "test_training_ddp.py", "test_cli_end_to_end.py", "test_behaviour_pin.py",
}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a heavy test (training, a fresh venv, end to end); "
                                       "`make test-fast` runs -m 'not slow'")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = Path(str(item.fspath)).name
        if module in SLOW or f"{module}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
