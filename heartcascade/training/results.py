"""What a training run hands back, and how a callback stops it."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

Callback = Callable[[str, dict[str, Any]], None]


class StopTraining(Exception):
    """Raise from a callback to stop a run (as if killed) -- used by tests."""


@dataclass
class TrainingResult:
    """The fold folder, the final checkpoint, the loss curves and the final validation of a run."""

    output_folder: Path
    configuration: str
    fold: str
    step_names: list[str]
    final_checkpoint: Path
    epoch_losses: dict[str, list[float]] = field(default_factory=dict)
    last_validation: dict[str, Any] | None = None
    seconds_per_iteration: dict[str, float] = field(default_factory=dict)
    validation_summary: dict[str, Any] | None = None
    validation_method: str | None = None
