"""The benchmark's record format: one JSON object per line, mixed with whatever else a child printed."""
from __future__ import annotations

import json
from typing import Any


def json_records(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``text``'s lines; other lines (library output, a cut last line) are skipped."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records
