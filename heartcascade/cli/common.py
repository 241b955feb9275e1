"""Small helpers shared by the console commands (argument types, error handling).

Why: every command must turn an expected problem (``HCError``) into ``error: <message>`` on stderr
with exit code 1 and no traceback, and Ctrl-C into a short message; doing it in one place keeps the
commands thin and consistent.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from heartcascade.paths import parse_dataset_id
from heartcascade.utils.errors import HCError


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a command body; HCError → ``error: msg`` (exit 1), Ctrl-C → exit 130. Returns the exit code."""
    try:
        code = body()
    except HCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0 if code is None else int(code)


def dataset_id(value: str) -> int:
    """argparse type for ``-d``: ``1``, ``001`` or ``Dataset001_Name``; must be 1..999."""
    try:
        number = parse_dataset_id(value)
    except HCError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not 0 < number < 1000:
        raise argparse.ArgumentTypeError(f"dataset id must be between 1 and 999, got {number}")
    return number


def non_negative_int(value: str) -> int:
    """argparse type for counts that may be 0."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def positive_int(value: str) -> int:
    """argparse type for counts that must be at least 1."""
    number = non_negative_int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number
