"""User-facing errors.

An HCError is an *expected* problem (bad input, missing file, wrong option). Command-line entry points
print its one-line message instead of a traceback, so the message must name the file and the problem.
"""
from __future__ import annotations


class HCError(Exception):
    """A problem the user can fix; its message is shown as one line, without a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
