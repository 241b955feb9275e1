"""Small helpers shared by the console commands (argument types, error handling).

Why: every command must turn an expected problem (``HCError``) into ``error: <message>`` on stderr
with exit code 1 and no traceback, and Ctrl-C into a short message; doing it in one place keeps the
commands thin and consistent.
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import Callable, Mapping

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

    def __init__(self, *args, argv_check: Callable[[list[str]], str | None] | None = None, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        #: A command's own look at the whole command line before parsing (a message = an error), for
        #: mistakes argparse would report misleadingly (``hc_train 1 3d_fullres 0``).
        self.argv_check = argv_check

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
                self.error(f"unknown option {name}{self._hint(name)}")
        problem = self.argv_check([t for t in argv if isinstance(t, str)]) if self.argv_check else None
        if problem:
            self.error(problem)
        return super().parse_known_args(argv, namespace)

    def _hint(self, name: str) -> str:
        """What a mistyped option probably meant: the closest options of this command (nnU-Net's
        ``-gpu_memory_target`` -> ``--gpu-memory-gb``), or a short option glued to its value (``-d1``)
        when that short option exists; nothing when neither is likely."""
        close = self.close_options(name)
        if close:
            return f" (did you mean {' or '.join(close)}?)"
        if name[:2] in self._option_string_actions and self._option_string_actions[name[:2]].nargs != 0:
            return f" (write a short option and its value apart, e.g. '{name[:2]} {name[2:]}')"
        return ""

    def close_options(self, name: str) -> list[str]:
        """Options of this command spelled like ``name`` (dashes and underscores ignored)."""
        def key(option: str) -> str:
            return option.lstrip("-").replace("_", "-").lower()

        options = {key(o): o for o in self._option_string_actions if o.startswith("--") or len(o) > 2}
        wanted = key(name)
        if len(wanted) < 3:
            return []
        return [options[k] for k in difflib.get_close_matches(wanted, list(options), n=2, cutoff=0.75)]

    def error(self, message: str):  # type: ignore[override]
        """argparse's errors, with the closest real option for each unrecognised one."""
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            hints = [f"{token} -> {' or '.join(close)}" for token in message[len(prefix):].split()
                     if token.startswith("-") and (close := self.close_options(token.split("=", 1)[0]))]
            if hints:
                message += f" (did you mean: {'; '.join(hints)}?)"
        super().error(message)


def add_nnunet_flags(parser: argparse.ArgumentParser, refused: Mapping[str, str] | None = None,
                     ignored: Mapping[str, str] | None = None) -> None:
    """nnU-Net spellings that have no counterpart here: ``refused`` ones stop with their message (what to
    do instead), ``ignored`` ones take one value and are accepted with their note on stderr (why nothing
    needs doing). Why: an nnU-Net command line pasted here should say what maps to what, not fail with
    'unrecognized arguments' or be silently misread."""
    for flag, why in (refused or {}).items():
        parser.add_argument(flag, nargs="?", action=_Refused, help=argparse.SUPPRESS, why=why)
    for flag, why in (ignored or {}).items():
        parser.add_argument(flag, action=_Ignored, help=argparse.SUPPRESS, why=why)


class _Refused(argparse.Action):
    def __init__(self, option_strings, dest, why: str = "", **kwargs) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(f"{option_string} (nnU-Net) is not supported: {self.why}")


class _Ignored(argparse.Action):
    def __init__(self, option_strings, dest, why: str = "", **kwargs) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, **kwargs)
        self.why = why

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"note: {option_string} {values} (nnU-Net) is accepted and ignored: {self.why}", file=sys.stderr)


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
