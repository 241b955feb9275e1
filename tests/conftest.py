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
#: Measured (--durations, OMP_NUM_THREADS=1): everything listed took over 10 s on a loaded 2-core machine;
#: the rest (`make test-fast`, 270 tests) then ran in 103 s wall at load average ~6 on that machine.
SLOW = {
    "test_demo.py", "test_wheel_install.py", "test_training_ddp.py", "test_cli_end_to_end.py", "test_behaviour_pin.py",
    "test_device_check.py::test_smoke_run_prints_every_record_kind",
    "test_device_check.py::test_new_venv_uses_the_base_interpreters_torch",
    "test_benchmark.py::test_quick_benchmark_smoke",
    "test_training.py::test_four_steps_learn_and_validate",
    "test_training.py::test_kill_and_continue_matches_uninterrupted_run",
    "test_time_budget.py::test_time_budget_run_ends_on_time_and_is_recorded",
    "test_time_budget.py::test_keep_best_per_step_hands_on_the_better_weights",
    "test_bad_inputs.py::test_train_sigkill_mid_step_then_continue",
    "test_bad_inputs.py::test_preprocess_corrupt_plans_and_damaged_arrays",
    "test_bad_inputs.py::test_predict_input_folder_as_output_folder",
    "test_bad_inputs.py::test_predict_sigkill_mid_batch_then_rerun",
    "test_bad_inputs.py::test_train_damaged_preprocessed_array",
    "test_bad_inputs.py::test_full_or_read_only_disk",
    "test_preprocessing.py::test_driver_idempotent_and_reports_bad_case",
    "test_planning.py::test_default_preset_is_the_planners_default_and_differs_by_machine",
}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: a heavy test (training, a fresh venv, end to end); "
                                       "`make test-fast` runs -m 'not slow'")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        module = Path(str(item.fspath)).name
        if module in SLOW or f"{module}::{item.originalname}" in SLOW:
            item.add_marker(pytest.mark.slow)
