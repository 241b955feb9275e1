"""Label-driven shape augmentation: a contracted left ventricle (a heart in systole, or a thickened wall).

Scaling changes a heart's size but keeps its proportions: the myocardium-to-cavity ratio of the MS-CMRSeg
training labels is at most 1.6, while another centre's hypertrophic heart at end-systole reaches 8.3 (a 23 mL
cavity in 187 mL of myocardium, documentation/results.md) -- a shape no affine or elastic transform makes
out of the training cases. :class:`CavityContractionTransform` makes it: in every axial slice that shows
the cavity, a radial map about the cavity's centre shrinks the cavity by a drawn factor, moves the outer
wall inward only as far as keeps the wall's area, and fades back to the identity at twice the wall's radius,
so the neighbours (the right ventricle, the lungs) follow smoothly and nothing is torn. The map is monotone
along every ray, so the structures keep their order and topology. Image channels are resampled linearly,
labels by nearest neighbour, with the same map.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

MIN_CAVITY_PIXELS = 4  # a slice with fewer cavity pixels (apex, base) is left alone


def radial_source(r: np.ndarray, cavity: float, outer: float, factor: float) -> np.ndarray:
    """Source radius of each output radius ``r``: the cavity's radius ``cavity`` becomes ``factor * cavity``,
    the wall's outer radius ``outer`` becomes ``outer_after(...)``, and from ``2 * outer`` on nothing moves.

    Piecewise linear and increasing, so the map is one-to-one and keeps every structure's order.
    """
    far = 2.0 * outer
    knots_out = [0.0, factor * cavity, outer_after(cavity, outer, factor), far]
    knots_in = [0.0, cavity, outer, far]
    return np.where(r >= far, r, np.interp(r, knots_out, knots_in))


def outer_after(cavity: float, outer: float, factor: float) -> float:
    """The wall's outer radius once the cavity's radius is ``factor * cavity``, the wall's area unchanged
    (a myocardium thickens as the cavity empties; its tissue is not compressed)."""
    return math.sqrt((factor * cavity) ** 2 + outer ** 2 - cavity ** 2)


def slice_map(labels: np.ndarray, cavity_label: int, wall_label: int,
              factor: float) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Source (row, column) coordinates of the region a slice's contraction moves, and that region.

    None when the slice shows too little of the cavity. Radii are the equivalent circles' (area / pi),
    the centre is the cavity's centroid.
    """
    cavity = labels == cavity_label
    n_cavity = int(cavity.sum())
    if n_cavity < MIN_CAVITY_PIXELS:
        return None
    n_wall = int((labels == wall_label).sum())
    r_cavity = math.sqrt(n_cavity / math.pi)
    r_outer = max(math.sqrt((n_cavity + n_wall) / math.pi), 1.05 * r_cavity)
    centre = np.asarray(ndimage.center_of_mass(cavity))
    reach = 2.0 * r_outer
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, labels.shape)
    rows, cols = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
    dr, dc = rows - centre[0], cols - centre[1]
    r = np.hypot(dr, dc)
    scale = np.ones_like(r)
    moved = r > 0
    scale[moved] = radial_source(r[moved], r_cavity, r_outer, factor) / r[moved]
    source = np.stack([centre[0] + dr * scale, centre[1] + dc * scale])
    return source, (slice(int(lo[0]), int(hi[0])), slice(int(lo[1]), int(hi[1])))


class CavityContractionTransform:
    """A batch transform (batchgenerators' calling convention): each sample, with probability
    ``p_per_sample``, gets its cavity's radius multiplied by a factor drawn from ``factor_range``, in every
    axial slice (axis 0 of the (D, H, W) patch) that shows it; one factor per sample.

    Acts on every channel of ``data`` (linear; step 4's channels of source positions are positions, so
    resampling them linearly composes the two maps) and on ``seg`` (nearest). Draws from numpy's global
    generator, which the loaders reseed per batch.
    """

    def __init__(self, factor_range: tuple[float, float], labels: Sequence[int], p_per_sample: float) -> None:
        if len(labels) != 2:
            raise ValueError(f"cavity contraction needs the (cavity, wall) labels, got {labels}")
        self.factor_range = (float(factor_range[0]), float(factor_range[1]))
        self.cavity_label, self.wall_label = int(labels[0]), int(labels[1])
        self.p_per_sample = float(p_per_sample)

    def apply(self, data: np.ndarray, seg: np.ndarray, factor: float) -> None:
        """Contract one sample in place: ``data`` (C, D, H, W), ``seg`` (1, D, H, W)."""
        for k in range(seg.shape[1]):
            found = slice_map(seg[0, k], self.cavity_label, self.wall_label, factor)
            if found is None:
                continue
            source, region = found
            labels = seg[0, k]
            nearest = np.rint(source).astype(np.int64)
            np.clip(nearest[0], 0, labels.shape[0] - 1, out=nearest[0])
            np.clip(nearest[1], 0, labels.shape[1] - 1, out=nearest[1])
            moved_labels = labels[nearest[0], nearest[1]]
            for c in range(data.shape[0]):
                data[c, k][region] = ndimage.map_coordinates(data[c, k], source, order=1, mode="nearest",
                                                             prefilter=False)
            labels[region] = moved_labels

    def __call__(self, **data_dict: Any) -> dict[str, Any]:
        data, seg = data_dict["data"], data_dict.get("seg")
        if seg is None:
            raise ValueError("CavityContractionTransform needs the batch's label maps under 'seg'")
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            self.apply(data[b], seg[b], float(np.random.uniform(*self.factor_range)))
        return data_dict
