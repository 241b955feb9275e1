"""The torch device of a ``--device`` option: one rule for training, inference and the benchmark."""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from heartcascade.utils.errors import HCError


def flush_denormals() -> bool:
    """Treat subnormal floats (below ~1.2e-38) as zero in this thread's CPU arithmetic and in the threads it
    starts later (torch's OpenMP pool inherits the flag when it is created afterwards).

    Why: trained networks produce subnormal activations and gradients, which x86 CPUs compute through a
    slow microcode path. On this project's 2-core CPU one step-4 iteration with a trained Net2 took 1.3 s
    instead of 0.08 s with the flag (documentation/benchmarks.md, "Subnormal numbers"); values that small
    change no prediction. Returns False where the CPU has no such mode."""
    return bool(torch.set_flush_denormal(True))


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when torch sees a GPU; asking for CUDA without one is an HCError, not a crash.

    Every path that computes (training, prediction, the benchmark) resolves its device here first, so this
    is also where subnormal floats are switched off (:func:`flush_denormals`), before torch starts threads."""
    flush_denormals()
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HCError(f"--device {name} was asked for but no CUDA GPU is available to torch "
                          f"(torch {torch.__version__}, cuda build: {torch.version.cuda or 'none'}); "
                          f"use --device cpu or --device auto")
        return torch.device(name)
    raise HCError(f"unknown device {name!r}; expected cpu, cuda or auto")


def autocast(device: torch.device, amp: str = "bf16") -> Any:
    """Mixed precision on CUDA (``amp``: bf16, fp16 or none); nothing on the CPU, where bf16 convolutions
    are slower than fp32. Training and inference pass the plans' ``amp``."""
    if device.type == "cuda" and amp in ("bf16", "fp16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    return contextlib.nullcontext()
