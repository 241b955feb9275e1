"""Atomic writes: a reader (or a crash) never sees a half-written output file.

Everything is written to a temporary file in the destination folder, flushed to disk and then moved
over the destination with ``os.replace``, which is atomic on POSIX file systems.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from heartcascade.utils.errors import HCError
from heartcascade.utils.processes import owner_tag
from heartcascade.utils.stale_temps import is_stale, remove


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on failure it is removed.

    ``suffix`` defaults to the destination's full suffix (e.g. ``.nii.gz``) so that writers which pick a
    format from the file name (SimpleITK, numpy) behave as for the real name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(path.suffixes) if path.suffixes else ""
    # the owner tag (pid, host) lets a later run remove what a killed writer left (utils/stale_temps.py)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_path
        _fsync_file(tmp_path)
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        if is_disk_full(exc, path.parent):
            raise HCError(f"no space left on device: {path}") from None
        raise
    except Exception:
        if is_disk_full(None, path.parent):  # e.g. ITK's writer reports a short write as RuntimeError
            raise HCError(f"no space left on device: {path}") from None
        raise
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def is_disk_full(exc: BaseException | None, folder: Path) -> bool:
    """True when a failed write was (most likely) caused by a full disk or quota.

    numpy reports a short write as ``OSError: N requested and M written`` without an errno, and other
    writers only raise their own errors, so an empty file system counts as the cause too.
    """
    if isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT) or _SHORT_WRITE.search(str(exc))):
        return True
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail == 0


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """Leftover temporary files of :func:`atomic_path` for ``path`` (after a kill -9 or a crash)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}."
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefix) and ".tmp" in p.name[len(prefix):])


def remove_temp_files_of(path: str | os.PathLike) -> int:
    """Delete the leftovers of an interrupted write of ``path``; returns how many were removed.

    Only call this for outputs no other live process is writing (e.g. the cases of this command's shard).
    """
    removed = 0
    for tmp in temp_files_of(path):
        try:
            tmp.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def ensure_writable_dir(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and prove it takes files; one-line HCError otherwise.

    Why: commands call this before any computation, so a wrong ``-o`` (an existing file, a read-only
    file system, a parent that is a file) fails in a second instead of after an hour of work.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise HCError(f"{folder}: {what} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise HCError(f"{folder}: cannot create {what}: a part of the path is a file") from None
    except OSError as exc:
        raise HCError(f"{folder}: cannot create {what} ({exc.strerror or exc})") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".hc-write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if is_disk_full(exc, folder):
            raise HCError(f"no space left on device: {folder}") from None
        raise HCError(f"{folder}: {what} is not writable ({exc.strerror or exc})") from None
    return folder


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def replace_folder(new: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Put folder ``new`` in the place of ``dest`` (which may exist) so that a reader sees the old or
    the new folder whole, and a kill leaves one of them in place.

    Where the file system can swap two folders in one step that is done; elsewhere ``dest`` is first
    renamed to ``.NAME.old.<owner tag>`` (a kill between the two renames leaves it there, and
    :func:`restore_replaced_folders` puts it back). The old folder is removed afterwards.
    """
    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.replace(new, dest)
    elif _exchange(new, dest):
        shutil.rmtree(new)  # now holds the old folder
    else:
        old = dest.parent / f".{dest.name}.old.{owner_tag()}"
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old)
    _fsync_dir(dest.parent)


def restore_replaced_folders(folder: str | os.PathLike) -> list[Path]:
    """Undo what a killed :func:`replace_folder` left in ``folder``: an old folder whose replacement
    never arrived goes back under its name, one that was replaced is removed. Returns the names handled."""
    handled = []
    for old in sorted(Path(folder).glob(".*.old.hc*")):
        if not old.is_dir() or not is_stale(old, None):
            continue
        dest = old.parent / old.name[1:].split(".old.hc", 1)[0]
        if dest.exists():
            remove(old)
        else:
            os.replace(old, dest)
        handled.append(dest)
    return handled


def ensure_writable_file(path: str | os.PathLike, what: str = "output file", example: str = "out.json") -> Path:
    """An output file path that can be written: not a folder, its folder creatable and writable
    (one-line HCError otherwise); checked before any computation, like :func:`ensure_writable_dir`."""
    raw = os.fspath(path)
    path = Path(path)
    if path.is_dir():
        raise HCError(f"{path}: {what} is a folder; give a file name such as {example}")
    if raw.endswith(("/", os.sep)):
        raise HCError(f"{raw}: {what} must be a file name such as {example}, not a folder")
    ensure_writable_dir(path.parent, f"folder of the {what}")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """Let numpy scalars/arrays and paths pass through json.dumps.

    numpy is looked up, not imported: an object can only be a numpy one once numpy is loaded, and this
    lowest layer stays importable without it (the console commands' ``--help``)."""
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
