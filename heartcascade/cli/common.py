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

QUIET, NORMAL, VERBOSE = 0, 1, 2


class HCArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that never guesses what an option means.

    Why: argparse reads ``--dev`` as ``--device`` (prefix matching) and ``-device cpu`` as ``-d evice``
    plus a stray ``cpu`` (a short option glued to its value), so nnU-Net spellings misparsed silently.
    Here prefix matching is off, and a single-dash word that is not an option of the command
    (``-device`` where only ``-d`` exists) is an error; give values separately (``-d 1``).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        for token in argv:
            if not isinstance(token, str):
                continue
            if token == "--":
                break
            name = token.split("=", 1)[0]
            if (token.startswith("-") and not token.startswith("--") and len(name) > 2
                    and name not in self._option_string_actions and not _is_number(token)):
                self.error(f"unknown option {name} (write a short option and its value apart, e.g. "
                           f"'{name[:2]} {name[2:]}')")
        return super().parse_known_args(argv, namespace)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def add_verbosity_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` / ``--verbose``, the same in every command (see :func:`verbosity`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quiet", "-q", action="store_true",
                       help="only warnings, errors and the final result line; no progress bars")
    group.add_argument("--verbose", "-v", action="store_true", help="also print details (settings, timings, files)")


def verbosity(args: argparse.Namespace) -> int:
    """QUIET, NORMAL or VERBOSE from the parsed ``--quiet`` / ``--verbose`` flags."""
    if getattr(args, "quiet", False):
        return QUIET
    return VERBOSE if getattr(args, "verbose", False) else NORMAL


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars only when not ``--quiet`` and stderr is a terminal (a log file gets no bar redraws)."""
    return verbosity(args) > QUIET and sys.stderr.isatty()


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
