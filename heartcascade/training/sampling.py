"""Hierarchical class-balanced sampling of subvolume centres (paper §2.3).

One draw: a training case uniformly at random, then a class uniformly among the classes *present in
that case* (background included), then a voxel of that class uniformly among the class's voxels. The
voxel becomes the centre of the subvolume (or, for slice stacks, its slice becomes the centre slice).
Small structures are therefore seen as often as large ones, which is what lets the weighted Dice loss
learn them from small subvolumes.

Voxel lists come from the preprocessed ``class_locations`` (``{label: (n, 3) int array}`` in canonical
full-resolution (D, H, W) indices; preprocessing may store a random subset per class). Background is
often not listed (it is most of the volume); it is then sampled as a uniformly random voxel whose label
is 0 (a few rejection tries, falling back to any random voxel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np


@dataclass
class CaseLocations:
    """What the sampler needs of one case: its shape, its voxel lists and (optionally) its labels."""

    case_id: str
    shape: tuple[int, int, int]
    locations: dict[int, np.ndarray]
    seg: np.ndarray | None = None  # (D, H, W) labels, used only for background rejection sampling

    @property
    def classes(self) -> list[int]:
        present = [int(c) for c, v in self.locations.items() if len(v) > 0]
        if 0 not in present:
            present.append(0)
        return sorted(present)


def normalise_locations(class_locations: Mapping) -> dict[int, np.ndarray]:
    """Accept ``{label or "label": (n, 3) array-like}``; return int keys and (n, 3) int arrays."""
    out = {}
    for key, value in class_locations.items():
        arr = np.asarray(value, dtype=np.int64)
        if arr.size == 0:
            arr = arr.reshape(0, 3)
        out[int(key)] = arr.reshape(-1, arr.shape[-1])[:, -3:]
    return out


class ClassBalancedSampler:
    """Draw ``(case index, class, centre voxel)`` triples with the hierarchical scheme above.

    ``foreground_only`` leaves out background as a class (plans ``sampling.background_as_class: false``).
    """

    def __init__(self, cases: Sequence[CaseLocations], foreground_only: bool = False) -> None:
        if not cases:
            raise ValueError("sampler needs at least one case")
        self.cases = list(cases)
        self.foreground_only = foreground_only

    def draw_case(self, rng: np.random.Generator) -> int:
        return int(rng.integers(len(self.cases)))

    def draw_class(self, case: CaseLocations, rng: np.random.Generator) -> int:
        classes = case.classes
        if self.foreground_only and len(classes) > 1:
            classes = [c for c in classes if c != 0]
        return int(classes[int(rng.integers(len(classes)))])

    def draw_voxel(self, case: CaseLocations, cls: int, rng: np.random.Generator) -> np.ndarray:
        locs = case.locations.get(cls)
        if locs is not None and len(locs):
            return np.asarray(locs[int(rng.integers(len(locs)))], dtype=np.int64)
        shape = np.asarray(case.shape)
        voxel = np.zeros(3, dtype=np.int64)
        for _ in range(20):
            voxel = (rng.random(3) * shape).astype(np.int64)
            if case.seg is None or int(case.seg[tuple(voxel)]) == cls:
                break
        return voxel

    def draw(self, rng: np.random.Generator) -> tuple[int, int, np.ndarray]:
        index = self.draw_case(rng)
        case = self.cases[index]
        cls = self.draw_class(case, rng)
        return index, cls, self.draw_voxel(case, cls, rng)
