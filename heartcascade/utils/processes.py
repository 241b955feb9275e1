"""Who owns a lock or a temporary file, and whether that process still runs.

Why: a ``kill -9`` leaves lock files and temporary files behind; the next run may remove them only when
their owner is gone. Owners are named by pid and host (and, where ``/proc`` exists, the process's start
time, so a reused pid is not taken for the old process).
"""
from __future__ import annotations

import hashlib
import os
import socket


def this_host() -> str:
    return socket.gethostname() or "localhost"


def host_code(host: str | None = None) -> str:
    """Six hex digits naming a host inside file names (host names may hold dots and dashes)."""
    return hashlib.sha1((host or this_host()).encode()).hexdigest()[:6]


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), if readable."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    try:
        return int(text.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def pid_alive(pid: int, start: int | None = None) -> bool:
    """True while process ``pid`` of this host runs (a zombie, or a pid reused by a process started at
    another time than ``start``, counts as gone)."""
    pid = int(pid)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    except OSError:
        return False
    if _is_zombie(pid):
        return False
    if start is not None:
        now = process_start(pid)
        if now is not None and now != int(start):
            return False
    return True


def owner_tag() -> str:
    """``hc<pid>-<host code>``: put into temporary names so a later run can tell dead owners' files."""
    return f"hc{os.getpid()}-{host_code()}"
