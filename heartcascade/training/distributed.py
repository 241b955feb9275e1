"""DistributedDataParallel helpers (``torchrun --nproc_per_node N hc_train ...``).

Without the torchrun environment (``WORLD_SIZE`` unset or 1) everything here is a no-op and the trainer
runs as a single process. With it, the process group uses NCCL when training on CUDA and gloo on CPU;
each rank takes GPU ``LOCAL_RANK``. Rank 0 alone writes files (checkpoints, logs, splits); the others
wait at barriers.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from heartcascade.utils.errors import HCError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_dist_info() -> DistInfo:
    """Rank information from torchrun's environment variables (single process when absent)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise HCError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun)") from None
    return DistInfo(rank, world, local)


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group if launched by torchrun; returns this process's :class:`DistInfo`."""
    info = env_dist_info()
    if not info.enabled:
        return info
    if dist.is_initialized():
        return info
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        if torch.cuda.device_count() <= info.local_rank:
            raise HCError(f"rank {info.rank} wants GPU {info.local_rank} but only "
                          f"{torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return info


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_active():
        dist.barrier()


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean of a list of floats over all ranks (identity when not distributed)."""
    if not is_active() or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel(module)`` when distributed (only parameters with requires_grad are synced)."""
    if not is_active():
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)
