"""Peak memory measurement for the benchmark: host RSS (this process, a child process) and GPU memory.

Host memory, Linux:

* this process: the kernel's own high-water mark ``VmHWM`` from ``/proc/self/status``; it is reset by
  writing ``5`` to ``/proc/self/clear_refs`` (:func:`reset_peak_rss`), so each measured section gets its own
  peak. Where that file is not writable, :class:`RssSampler` (a thread polling ``VmRSS`` every few ms)
  gives a sampled peak instead (it can miss spikes shorter than the interval).
* a child process: :func:`run_measured` starts it, samples its RSS (and its descendants') while it runs
  and collects its exact ``ru_maxrss`` with ``os.wait4`` when it exits (``RUSAGE_CHILDREN`` would mix in
  every earlier child of this process). Note that Linux derives ``ru_maxrss`` from the same high-water
  mark that ``clear_refs`` resets: for a child that resets it (the benchmark's workers do, per section)
  ``ru_maxrss`` is the peak since its last reset, and only the sampled peak covers its whole life.

GPU: ``torch.cuda.reset_peak_memory_stats`` / ``torch.cuda.max_memory_allocated`` (bytes handed out
by PyTorch's caching allocator -- what the planner's memory model predicts) and
``max_memory_reserved`` (what the allocator took from the driver). Without CUDA these return None.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

GiB = 1024 ** 3


def _status_kb(field_name: str, pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes(pid: int | str = "self") -> int | None:
    kb = _status_kb("VmRSS", pid)
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int:
    """This process's peak RSS since start or the last :func:`reset_peak_rss` (VmHWM; ru_maxrss elsewhere)."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS), never reset
        value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(value if sys.platform == "darwin" else value * 1024)
    return kb * 1024


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as fh:
                    kids = [int(k) for k in fh.read().split()]
            except (OSError, ValueError):
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


class RssSampler:
    """Background thread sampling RSS of a process (and optionally its descendants, summed).

    ``with RssSampler() as s: ...`` then ``s.peak`` (bytes). ``pid=None`` samples this process.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.02, tree: bool = False) -> None:
        self.pid = pid
        self.interval = float(interval)
        self.tree = tree
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        pid = "self" if self.pid is None else self.pid
        rss = current_rss_bytes(pid) or 0
        if self.tree and self.pid is not None:
            rss += sum(current_rss_bytes(c) or 0 for c in descendants(self.pid))
        self.peak = max(self.peak, rss)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> "RssSampler":
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.peak

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PeakRss:
    """Peak RSS of this process over a ``with`` block: VmHWM after a reset, else a sampled peak."""

    def __init__(self) -> None:
        self.exact = False
        self.peak = 0
        self._sampler: RssSampler | None = None

    def __enter__(self) -> "PeakRss":
        self.exact = reset_peak_rss()
        if not self.exact:
            self._sampler = RssSampler().start()
        return self

    def __exit__(self, *exc) -> None:
        if self.exact:
            self.peak = peak_rss_bytes()
        else:
            assert self._sampler is not None
            self.peak = self._sampler.stop()

    @property
    def method(self) -> str:
        return "VmHWM" if self.exact else "sampled VmRSS"


@dataclass
class ChildRun:
    """Result of :func:`run_measured`."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int          # ru_maxrss of the child (largest single process it waited for, incl. itself)
    sampled_peak_bytes: int      # sampled RSS of the child + its descendants, summed
    user_s: float
    sys_s: float
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False
    extra: dict = field(default_factory=dict)


def run_measured(cmd: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = None,
                 cwd: str | Path | None = None, interval: float = 0.05) -> ChildRun:
    """Run ``cmd``; wall time, exact peak RSS (``os.wait4``) and a sampled tree peak; output captured."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, cwd=cwd, stdout=out, stderr=err,
                                text=True)
        sampler = RssSampler(proc.pid, interval=interval, tree=True).start()
        timed_out = False
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid != 0:
                break
            if deadline is not None and time.perf_counter() > deadline:
                timed_out = True
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        sampler.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    maxrss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return ChildRun(proc.returncode, wall, int(maxrss), int(sampler.peak), usage.ru_utime, usage.ru_stime,
                    stdout, stderr, timed_out)


# --------------------------------------------------------------------------------------------------
# GPU


def gpu_reset(device) -> None:
    import torch  # deferred: torch, runner.py imports this module and stays light for hc_benchmark --help

    if getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peaks(device) -> dict[str, float | None]:
    """``{"gpu_peak_allocated_gb", "gpu_peak_reserved_gb"}`` since the last :func:`gpu_reset` (None on CPU)."""
    import torch  # deferred: torch, runner.py imports this module and stays light for hc_benchmark --help

    if not (getattr(device, "type", str(device)).startswith("cuda") and torch.cuda.is_available()):
        return {"gpu_peak_allocated_gb": None, "gpu_peak_reserved_gb": None}
    torch.cuda.synchronize(device)
    return {"gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated(device) / GiB, 3),
            "gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / GiB, 3)}


def gb(nbytes: float | int | None, digits: int = 3) -> float | None:
    return None if nbytes is None else round(float(nbytes) / GiB, digits)


def mem_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (what can still be allocated without swapping), bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
