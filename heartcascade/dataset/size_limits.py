"""The smallest case the networks can learn from, shared by verification, fingerprint and planner.

Why: one 4x4x2 training case used to set K = 1 for the whole plan. A case is unusable when it has
fewer slices than Net2's smallest slice stack (``MIN_SLICES`` = the presets' ``k_min``) or fewer
in-plane voxels than ``MIN_INPLANE_VOXELS`` (a cell of Net1's third level; smaller scans are padded up
to its patch and carry next to no training signal). Such a
case is reported by ``hc_verify_dataset``, left out of the fingerprint's statistics, and refused by
preprocessing with a message; it never changes the plan for the other cases.
"""
from __future__ import annotations

from typing import Sequence

MIN_SLICES = 3
MIN_INPLANE_VOXELS = 8


def too_small(shape: Sequence[int], min_slices: int = MIN_SLICES) -> str | None:
    """Why a case of canonical ``shape`` (slices, H, W) is too small for the networks, else None."""
    d, h, w = (int(v) for v in shape)
    if d < min_slices:
        return f"too small for the network: {d} slice(s), K needs at least {min_slices}"
    if min(h, w) < MIN_INPLANE_VOXELS:
        return (f"too small for the network: {h}x{w} voxels in-plane, the networks need at least "
                f"{MIN_INPLANE_VOXELS}x{MIN_INPLANE_VOXELS}")
    return None
