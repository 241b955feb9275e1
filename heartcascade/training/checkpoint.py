"""Resume state of a training run: the RNG states of every rank and the optimizer's state on the CPU.

The checkpoint format itself (paths, atomic save, safe load, weights_only-safe containers) is
:mod:`heartcascade.model.checkpoint`, shared with inference.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


# RNG states as weights_only-safe containers


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (legacy global) and torch (CPU and CUDA) random states."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [int(py_version), [int(v) for v in py_state], py_gauss],
        "numpy": [str(np_name), torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos),
                  int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(v) for v in py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np.asarray(np_keys.numpy(), dtype=np.uint32), int(np_pos),
                         int(np_has_gauss), float(np_gauss)))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def optimizer_state_cpu(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    def to_cpu(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().clone()
        if isinstance(obj, dict):
            return {k: to_cpu(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(to_cpu(v) for v in obj)
        return obj

    return to_cpu(optimizer.state_dict())
