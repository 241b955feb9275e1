"""Reading JSON with one-line errors that name the file, and with bounds on size and nesting.

Why: every JSON the project reads may come from elsewhere (a dataset.json, plans, a model archive's
manifest). Python's parser turns a deeply nested document into a RecursionError and reads a huge
one into memory; here both are a one-line HCError, and so is every decoding problem.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from heartcascade.utils.errors import HCError

#: Largest JSON document read (a dataset.json listing tens of thousands of files stays far below).
MAX_JSON_BYTES = 64 * 2**20
#: Deepest nesting of objects and lists (the plans nest 5 levels).
MAX_JSON_DEPTH = 32


def _depth(value: Any) -> int:
    """Nesting depth of lists and objects, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


def parse_json(data: str | bytes, source: str) -> Any:
    """Parse a JSON document read from ``source`` (named in the errors) within the size and depth bounds."""
    if len(data) > MAX_JSON_BYTES:
        raise HCError(f"{source}: JSON larger than {MAX_JSON_BYTES // 2**20} MiB ({len(data)} bytes)")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except RecursionError:
        raise HCError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HCError(f"{source}: not valid JSON ({exc})") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise HCError(f"{source}: not valid JSON ({' '.join(str(exc).split())[:160]})") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise HCError(f"{source}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise HCError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise HCError(f"{path}: JSON larger than {MAX_JSON_BYTES // 2**20} MiB ({size} bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise HCError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_json(data, str(path))
