"""One run at a time per fold (``hc_train``) or per preprocessed dataset (``hc_plan_and_preprocess``).

The lock is a file beside the guarded folder, ``.NAME.lock``, holding the holder's pid, host, process
start time and command line. It is created in one step (written under a temporary name, then
hard-linked to the lock name, which fails if it exists), so a lock file is never seen half-written.
A second run finds it and fails at once, saying who holds it. A lock whose holder is a dead process of
this host (a ``kill -9``, a crash, a reboot) is stale: the next run removes it and goes on. A lock of
another host cannot be checked from here; the message says which file to remove if that run is gone.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from heartcascade.utils.errors import HCError
from heartcascade.utils.processes import owner_tag, pid_alive, process_start, this_host
from heartcascade.utils.stale_temps import sweep


def lock_path(guarded: str | os.PathLike) -> Path:
    """``.NAME.lock`` beside the guarded folder (outside it: installs swap fold folders whole)."""
    guarded = Path(guarded)
    return guarded.parent / f".{guarded.name}.lock"


def read_holder(lock: Path) -> dict[str, Any] | None:
    """The lock file's content; None when there is none; ``{}`` when it is unreadable."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def holder_alive(holder: dict[str, Any]) -> bool:
    """True unless the holder is provably gone (a dead process of this host, or an unreadable lock)."""
    try:
        pid = int(holder["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if holder.get("host") != this_host():
        return True
    start = holder.get("start")
    return pid_alive(pid, int(start) if isinstance(start, int) else None)


def describe(holder: dict[str, Any]) -> str:
    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {when}: {holder.get('command', '?')}"


def live_holder(guarded: str | os.PathLike) -> dict[str, Any] | None:
    """The holder of ``guarded``'s lock while it runs, else None (stale locks are not removed here)."""
    holder = read_holder(lock_path(guarded))
    return holder if holder and holder_alive(holder) else None


def _remove_stale(lock: Path, seen: dict[str, Any]) -> None:
    """Remove a stale lock, unless another run replaced it in between (then put that one back)."""
    aside = lock.parent / f".{lock.name}.{owner_tag()}.stale"
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    if read_holder(aside) != seen:  # a live run's fresh lock: give it back
        with contextlib.suppress(OSError):
            os.link(aside, lock)
    with contextlib.suppress(OSError):
        aside.unlink()


def acquire(guarded: str | os.PathLike, what: str) -> Path:
    """Take ``guarded``'s lock or raise a one-line HCError naming the holder; returns the lock file."""
    lock = lock_path(guarded)
    lock.parent.mkdir(parents=True, exist_ok=True)
    sweep(lock.parent, f".{lock.name}.", ".tmp")  # what a run killed while taking the lock left
    me = {"pid": os.getpid(), "host": this_host(), "start": process_start(os.getpid()),
          "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])[:300], "since": time.time()}
    for _ in range(5):
        fd, tmp = tempfile.mkstemp(prefix=f".{lock.name}.{owner_tag()}.", suffix=".tmp", dir=lock.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(me, fh)
            os.link(tmp, lock)
            return lock
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        holder = read_holder(lock)
        if holder is None:
            continue  # released meanwhile
        if holder_alive(holder):
            other_host = holder.get("host") != this_host()
            hint = f"; if that run is gone, remove {lock}" if other_host else "; wait for it or stop it"
            raise HCError(f"{guarded}: cannot start {what}: another run holds it ({describe(holder)}){hint}")
        _remove_stale(lock, holder)
    raise HCError(f"{lock}: could not take the lock (other runs keep taking it)")


def release(lock: Path) -> None:
    """Remove the lock if it is still this process's."""
    holder = read_holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == this_host():
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()


@contextlib.contextmanager
def run_lock(guarded: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold ``guarded``'s lock for a ``with`` block (see :func:`acquire`)."""
    lock = acquire(guarded, what)
    try:
        yield lock
    finally:
        release(lock)
