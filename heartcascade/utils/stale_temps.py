"""Removing what killed processes left behind: temporary files and staging folders whose names carry
the owner tag of :func:`heartcascade.utils.processes.owner_tag` (``hc<pid>-<host code>``).

Why: every output is written under a temporary name and renamed (utils/atomic.py), so a ``kill -9``
never leaves a half-written file under a final name, but it does leave the temporary file (or an
unpacked model, a staging folder of an install). The next run of the same command calls :func:`sweep`
on the folders it writes to: entries of dead processes of this host go; those of live processes and of
other hosts stay (their owner cannot be checked from here).
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from heartcascade.utils.processes import host_code, pid_alive

_TAG = re.compile(r"hc(\d+)-([0-9a-f]{6})(?![0-9a-f])")
#: Temporary names written before the owner tag existed are removed once they are this old.
UNTAGGED_MAX_AGE_S = 24 * 3600.0


def owner_of(name: str) -> tuple[int, str] | None:
    """``(pid, host code)`` of a tagged temporary name, else None."""
    match = _TAG.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def is_stale(path: Path, untagged_max_age_s: float | None = UNTAGGED_MAX_AGE_S) -> bool:
    """True when ``path``'s owner (from its name) is a dead process of this host; an untagged name
    counts as stale once older than ``untagged_max_age_s`` (None: never)."""
    owner = owner_of(path.name)
    if owner is None:
        if untagged_max_age_s is None:
            return False
        try:
            return time.time() - path.lstat().st_mtime > untagged_max_age_s
        except OSError:
            return False
    pid, host = owner
    return host == host_code() and not pid_alive(pid)


def remove(path: Path) -> None:
    """Remove a file, link or folder tree; gone already is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def sweep(folder: str | os.PathLike, prefix: str, marker: str = "",
          untagged_max_age_s: float | None = UNTAGGED_MAX_AGE_S) -> list[Path]:
    """Remove the entries of ``folder`` named ``prefix...`` (and holding ``marker``) that belong to dead
    processes; returns what was removed. A missing folder is fine."""
    folder = Path(folder)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return []
    removed = []
    for entry in sorted(entries):
        name = entry.name
        if not name.startswith(prefix) or marker not in name[len(prefix):]:
            continue
        if is_stale(entry, untagged_max_age_s):
            remove(entry)
            removed.append(entry)
    return removed


def sweep_temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files of dead writers of ``path`` (``atomic_path``'s ``.NAME.*.tmp*`` names)."""
    path = Path(path)
    return sweep(path.parent, f".{path.name}.", ".tmp")
