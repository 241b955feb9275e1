"""Progress bars that appear only where a person watches them.

Why: redirected to a log file, a tqdm bar becomes dozens of carriage-return redraws glued to the log
lines. Every bar of heartcascade is made here, shown only when wanted (not ``--quiet``) *and* stderr is
a terminal.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from tqdm import tqdm


def bars_enabled(wanted: bool = True) -> bool:
    """True when a bar was asked for and stderr is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(wanted) and bool(isatty and isatty())


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool = True, **kwargs: Any):
    """``tqdm`` on stderr, disabled unless :func:`bars_enabled` (``enabled`` is the caller's wish)."""
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=not bars_enabled(enabled), **kwargs)
