"""Training labels to the dataset's own codes for written files (e.g. 1 -> 500): the plans' ``label_codes``
or dataset.json's, and the lookup table that applies them.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from heartcascade.utils.errors import HCError


def label_codes_from(plans_codes: Mapping[str, int] | None,
                     dataset_json: Mapping[str, Any] | None = None) -> dict[int, int] | None:
    """Training label -> the dataset's own code (e.g. 1 -> 500): the plans' ``label_codes``, else dataset.json's."""
    for codes in (plans_codes, (dataset_json or {}).get("label_codes")):
        if codes:
            return {int(k): int(v) for k, v in codes.items()}
    return None


def code_lookup(label_codes: Mapping[int, int] | None, num_classes: int) -> np.ndarray | None:
    """Lookup table training label -> code in the smallest integer type that holds every code."""
    if not label_codes:
        return None
    values = [0] + [int(label_codes.get(c, c)) for c in range(1, num_classes)]
    lo, hi = min(values), max(values)
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            break
    else:
        raise HCError(f"label codes {lo}..{hi} do not fit a 32-bit integer")
    return np.asarray(values, dtype=dtype)
