"""Training within a wall-clock budget, the per-step learning-rate schedule and keep-best-per-step."""
from __future__ import annotations

import json
import time

import pytest
import torch

from heartcascade.training.time_budget import StepSchedule, parse_duration, step_allotment
from heartcascade.training.trainer import step_learning_rate
from heartcascade.utils.errors import HCError

from test_training import DATASET_ID, SHORT_OVERRIDE, _trainer, tiny  # noqa: F401  (module fixture)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text,seconds", [("60m", 3600), ("1.5h", 5400), ("900s", 900), ("45", 45), (30, 30),
                                          (" 2 min ", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "m", "-5m", "0", "10 parsecs", "1e3x"])
def test_parse_duration_rejects(text):
    with pytest.raises(HCError, match="time-budget"):
        parse_duration(text)


def test_allotment_shares_what_is_left_by_fraction():
    fractions = {"1": 0.25, "2": 0.05, "3": 0.1, "4": 0.6}
    assert step_allotment(3600, "1", ["1", "2", "3", "4"], fractions) == pytest.approx(900)
    # step 1 overran by 100 s: the later steps share what is left in their own proportions
    left = 3600 - 1000
    assert step_allotment(left, "4", ["2", "3", "4"], fractions) == pytest.approx(left * 0.6 / 0.75)
    assert step_allotment(100, "4", ["4"], fractions) == pytest.approx(100)


def test_schedule_sets_iterations_from_measured_speed_and_validation_cost():
    clock = FakeClock()
    s = StepSchedule(planned=999, allotted_s=100.0, probe=10, clock=clock)
    assert s.iterations == 10  # only the probe until measured
    clock.now += 5.0
    s.record_iterations(10, 5.0)  # 0.5 s per iteration
    assert s.update(10, iterations_per_validation=20) == 10 + int(95 // 0.5)  # no validation measured yet
    s.record_validation(2.0)
    clock.now += 2.0
    # 93 s left, 2 s kept for the closing validation; each iteration also pays 2 s / 20 of a validation
    assert s.update(10, iterations_per_validation=20) == 10 + int(91 // 0.6)
    assert not s.out_of_time()
    clock.now += 200
    assert s.out_of_time()
    assert s.update(40, iterations_per_validation=20) == 40  # never below what is done


def test_schedule_without_budget_keeps_the_plans_count_and_resumes_spent_time():
    assert StepSchedule(planned=123).iterations == 123
    clock = FakeClock()
    s = StepSchedule(planned=5, allotted_s=60.0, spent_s=45.0, clock=clock)
    assert s.remaining() == pytest.approx(15.0)
    assert s.state()["spent_s"] == pytest.approx(45.0)


def test_learning_rate_warmup_then_poly_to_zero():
    assert step_learning_rate(1e-3, 0, 100, 10, "poly") == pytest.approx(1e-4)
    assert step_learning_rate(1e-3, 9, 100, 10, "poly") == pytest.approx(1e-3)
    assert step_learning_rate(1e-3, 10, 100, 10, "poly") == pytest.approx(1e-3)
    mid = step_learning_rate(1e-3, 55, 100, 10, "poly")
    assert mid == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert step_learning_rate(1e-3, 99, 100, 10, "poly") < 3e-5
    assert step_learning_rate(1e-3, 99, 100, 0, "constant") == 1e-3


def test_time_budget_run_ends_on_time_and_is_recorded(tiny):
    budget = 25.0
    override = {"training": {"validation_interval_epochs": 1, "budget_probe_iterations": 3}}
    t0 = time.perf_counter()
    result = _trainer(plans_override=override, predict_validation=False, time_budget=f"{budget}s",
                      output_folder=tiny["root"] / "budget").run()
    seconds = time.perf_counter() - t0
    folder = result.output_folder
    plans = json.loads((folder / "plans.json").read_text())
    assert plans["settings"]["training"]["time_budget_s"] is None  # the run's option, not written into the plans
    # On a quiet machine the run ends within the budget (+ the last checkpoint). On a loaded one a step
    # still runs its minimum (one iteration and its closing validation) after its deadline, so the wall
    # time is checked loosely and the schedule's logic exactly: shares add up to at most the budget, and a
    # step that overran its share stopped at its first measurement (the probe) or right after.
    assert seconds < 3 * budget + 30, seconds
    log = (folder / "training_log.txt").read_text()
    for step in "1234":
        assert f"=== step {step} " in log and "of the time budget" in log
    import re

    spent = [(int(n), float(t), float(share)) for n, t, share in
             re.findall(r"step \d: (\d+) iterations in (\d+) s \(budget share (\d+) s\)", log)]
    assert len(spent) == 4 and sum(share for *_, share in spent) <= budget + 4  # shares rounded to 1 s
    for n, t, share in spent:
        assert t <= share + 5 or n <= 3, spent
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["budget"]["time_budget_s"] == budget  # ... but saved with the run
    iterations = final["budget"]["iterations"]
    assert re.search(r"step 1 iteration \d+/\d+ \(as many as fit: \d+ s left in the step, \d+ s in the run\)", log)
    assert all(iterations[s] >= 1 for s in "1234"), iterations
    planned = {str(e["step"]): e["epochs"] * e["iterations_per_epoch"] for e in plans["settings"]["training"]["steps"]}
    assert sum(iterations.values()) < sum(planned.values()), (iterations, planned)  # the budget, not the counts


def test_keep_best_per_step_hands_on_the_better_weights(tiny):
    """A step that only destroys accuracy (lr 1.0) ends with the weights it started from."""
    from heartcascade.model.checkpoint import load_checkpoint

    override = {"training": {"keep_best_per_step": True, "validation_interval_epochs": 1,
                             "steps": [{"step": 1, "epochs": 4, "iterations_per_epoch": 4, "lr": 5e-3},
                                       {"step": 2, "epochs": 2, "iterations_per_epoch": 3, "lr": 5.0}]}}
    folder = tiny["root"] / "keep_best"
    _trainer(plans_override=override, steps=[1, 2], predict_validation=False, output_folder=folder).run()
    after1 = load_checkpoint(folder / "checkpoint_after_step1.pth")["networks"]["net1"]
    final = load_checkpoint(folder / "checkpoint_final.pth")
    records = final["logger"]["records"]
    val2 = [r["mean_dice"] for r in records if r["type"] == "val" and r["step"] == "2"]
    restores = [r for r in records if r["type"] == "restore"]
    assert restores and restores[0]["step"] == "2" and restores[0]["restored_iteration"] == 0, (val2, restores)
    for key, value in after1.items():
        assert torch.equal(value, final["networks"]["net1"][key]), key
    assert max(val2) < restores[0]["mean_dice"]
