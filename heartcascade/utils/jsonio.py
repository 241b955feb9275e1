"""Reading JSON files with one-line errors that name the file."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from heartcascade.utils.errors import HCError


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise HCError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HCError(f"{path}: not valid JSON ({exc})") from None
