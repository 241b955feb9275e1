"""Which weights are "best": the moving average of the validation Dice, and keep_best_per_step.

``checkpoint_best.pth`` is written when the exponential moving average (``training.ema_momentum``) of
the mean foreground validation Dice improves; the average restarts when the validation target changes
(Net1 in steps 1-2, the cascade in 3-4). With ``training.keep_best_per_step`` each step ends with its
best-validated weights, and a step validated on the same target as the step before starts with the
earlier step's score, so a step that only loses accuracy hands on the weights it was given.
The three dicts are stored in the checkpoints as they are (keys ``best``, ``step_best``, ``best_by_target``).
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from heartcascade.model.checkpoint import state_dict_cpu


def _snapshot(networks: Mapping[str, nn.Module]) -> dict[str, Any]:
    return {k: state_dict_cpu(v) for k, v in networks.items()}


class BestTracker:
    """The moving-average best and the per-step best candidates of one training run."""

    def __init__(self, momentum: float, keep_best_per_step: bool) -> None:
        self.momentum = float(momentum)
        self.keep_best_per_step = bool(keep_best_per_step)
        self.best: dict[str, Any] = {"target": None, "ema": None, "best_ema": None, "step": None, "iteration": None}
        self.step_best: dict[str, Any] | None = None  # best-validated weights of the running step
        self.best_by_target: dict[str, float] = {}  # score of the weights each step handed on, by target

    def state(self, kind: str) -> dict[str, Any]:
        """The checkpoint entries (the running step's candidate only in ``checkpoint_latest``)."""
        return {"best": dict(self.best), "step_best": self.step_best if kind == "latest" else None,
                "best_by_target": dict(self.best_by_target)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.best = dict(state.get("best") or self.best)
        self.step_best = state.get("step_best")
        self.best_by_target = dict(state.get("best_by_target") or {})

    def record(self, target: str, mean: float, step_name: str, iteration: int,
               networks: Mapping[str, nn.Module]) -> bool:
        """Add a validation score; True when the moving average improved (then it is the new best)."""
        best = self.best
        if best.get("target") != target:
            best.update(target=target, ema=None, best_ema=None)
        m = self.momentum
        best["ema"] = mean if best.get("ema") is None else m * best["ema"] + (1 - m) * mean
        improved = best.get("best_ema") is None or best["ema"] > best["best_ema"]
        if self.keep_best_per_step and (self.step_best is None or mean > self.step_best["score"]):
            self.step_best = {"score": mean, "iteration": iteration, "target": target, "networks": _snapshot(networks)}
        if improved:
            best.update(best_ema=best["ema"], step=step_name, iteration=iteration)
        return improved

    def start_step(self, target: str, networks: Mapping[str, nn.Module]) -> None:
        """The weights a step starts from compete with what it trains (same target as an earlier step)."""
        self.step_best = None
        if self.keep_best_per_step and target in self.best_by_target:
            self.step_best = {"score": self.best_by_target[target], "iteration": 0, "target": target,
                              "networks": _snapshot(networks)}

    def finish_step(self, chosen: dict[str, Any] | None) -> dict[str, Any] | None:
        """Close the step with ``chosen`` (the main rank's candidate); returns it when its weights must be
        restored (it is not the step's last iteration's), else None."""
        self.step_best = None
        if chosen is None:
            return None
        self.best_by_target[chosen["target"]] = float(chosen["score"])
        return chosen
