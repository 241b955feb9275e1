"""The checkpoint format: what a trained model folder's ``checkpoint_*.pth`` holds, written atomically.

A checkpoint is a ``torch.save`` dict (see documentation/conventions.md, "Trained model folders"):

* read by inference: ``format_version`` (1), ``configuration`` (``"cascade"``/``"baseline"``), ``plans``,
  ``networks`` (``{"net1": sd, "net2": sd}`` or ``{"baseline": sd}``);
* resume state, read only by the trainer (:mod:`heartcascade.training.checkpoint`): ``kind``
  (latest/best/final), ``step`` (the curriculum step being trained, e.g. 3 or ``"baseline"``),
  ``step_index`` (its position in the run's step list), ``steps`` (that list), ``iteration``
  (iterations of that step already done), ``optimizer``, ``scaler``, ``rng`` (python/numpy/torch/cuda
  states of every rank), ``logger`` (log lines and metrics so the log files are rewritten to the
  checkpoint's moment), ``best`` (tracker of the best validation Dice), ``fold``, ``seed``,
  ``train_cases``, ``val_cases``, ``finished``.

Everything is stored as plain Python containers, numbers, strings and tensors (no numpy objects), so a
checkpoint also loads with ``torch.load(..., weights_only=True)``.

Writing goes through :func:`heartcascade.utils.atomic.atomic_path`: a temporary file in the same folder,
fsync, ``os.replace``. A process killed at any moment leaves either the previous checkpoint or the new
one, never a truncated file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from heartcascade.utils.atomic import atomic_path, remove_temp_files_of
from heartcascade.utils.errors import HCError

FORMAT_VERSION = 1
CHECKPOINT_NAMES = {"latest": "checkpoint_latest.pth", "best": "checkpoint_best.pth",
                    "final": "checkpoint_final.pth"}


def checkpoint_path(folder: str | Path, kind: str) -> Path:
    """``latest``/``best``/``final``, or ``step1``..``step4``: the weights each curriculum step handed on."""
    if kind.startswith("step") and kind[4:].isdigit():
        return Path(folder) / f"checkpoint_after_{kind}.pth"
    return Path(folder) / CHECKPOINT_NAMES[kind]


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (a reader or a crash never sees a partial file); leftovers of a write
    that a kill -9 interrupted are removed first (only the main process writes checkpoints)."""
    remove_temp_files_of(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; one-line HCError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise HCError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupted / foreign file
        raise HCError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") \
            from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise HCError(f"{path}: not a heartcascade checkpoint of format version {FORMAT_VERSION}")
    return state


def plain(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples inside ``obj`` into weights_only-safe Python objects."""
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, str)) else k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def state_dict_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict on the CPU, unwrapped from DDP / torch.compile prefixes."""
    module = unwrap(module)
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in module.state_dict().items()}


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # torch.compile
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module
