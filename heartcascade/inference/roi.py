"""The dynamic tile: the region of interest Net2 runs on, and the clamped index lists that read it.

Net1 sees the whole coarse volume; the bounding box of the heart it finds, mapped to the
full-resolution grid and grown by a safety margin, is the only region Net2 has to look at. Everything
outside is background. Which coarse voxels count as "the heart" is the plans' ``inference.roi_rule``
(:func:`make_roi_rule`): :class:`HeartComponentRoi` keeps the connected component(s) of Net1's
whole-heart probability that hold most of its mass, so stray detections far from the heart (arms,
liver on scans from other centres) do not stretch the ROI to the whole field of view;
:class:`AllForegroundRoi` is the earlier rule, the box of every Net1 foreground voxel. All boxes here are in the canonical full-resolution grid ``(D, H, W)`` (slice axis
first) and are half-open: ``((z0, z1), (y0, y1), (x0, x1))``.

Padding is expressed with *clamped index lists*: to read a window that extends past the volume we
gather with indices clamped to ``[0, size - 1]``, which is edge replication. One ``index_select`` per
axis therefore crops and pads at once, and the same index lists drive :func:`heartcascade.inference.upsampling.upsample_at`, so Net1's
upsampled output never has to exist at full resolution outside the window being processed.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import cc3d
import numpy as np
import torch
from scipy import ndimage

from heartcascade.inference.upsampling import take
from heartcascade.preprocessing.resampling import clamped_indices

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def full_box(shape: Sequence[int]) -> Box:
    return tuple((0, int(s)) for s in shape)  # type: ignore[return-value]


def box_shape(box: Box) -> tuple[int, int, int]:
    return tuple(int(b - a) for a, b in box)  # type: ignore[return-value]


def box_slices(box: Box) -> tuple[slice, slice, slice]:
    return tuple(slice(a, b) for a, b in box)  # type: ignore[return-value]


def foreground_box(mask: torch.Tensor | np.ndarray) -> Box | None:
    """Bounding box of the non-zero voxels of a 3D mask, or None when it is empty."""
    m = torch.as_tensor(mask) != 0
    if not bool(m.any()):
        return None
    box = []
    for axis in range(3):
        hi, lo = sorted((a for a in range(3) if a != axis), reverse=True)
        hits = torch.nonzero(m.any(dim=hi).any(dim=lo)).flatten()
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def coarse_box_to_full(box: Box, coarse_shape: Sequence[int], full_shape: Sequence[int]) -> Box:
    """Full-resolution voxels covered by a box of coarse voxels (grids aligned at their outer edges).

    With the pixel-centre convention of trilinear ``align_corners=False`` resampling, coarse voxel
    ``i`` covers full-resolution positions ``[i * s, (i + 1) * s)`` with ``s = full / coarse``.
    """
    out = []
    for (a, b), c, f in zip(box, coarse_shape, full_shape):
        s = f / c
        out.append((max(0, int(math.floor(a * s))), min(int(f), int(math.ceil(b * s)))))
    return tuple(out)  # type: ignore[return-value]


def grow_box(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box:
    """``box`` grown by ``margin`` voxels per axis on both sides, clipped to the volume."""
    return tuple((max(0, a - int(m)), min(int(s), b + int(m)))
                 for (a, b), m, s in zip(box, margin, shape))  # type: ignore[return-value]


def round_up_inside(box: Box, multiple: Sequence[int], shape: Sequence[int]) -> Box:
    """Grow each axis of ``box`` to a multiple of ``multiple`` where the volume allows, kept centred.

    Net2 needs in-plane sizes divisible by its divisor. Growing the ROI with real image voxels is
    better than padding; only when the whole axis is shorter than the rounded size does the window
    stay at the full axis (the caller pads by replication).
    """
    out = []
    for (a, b), m, s in zip(box, multiple, shape):
        m = max(1, int(m))
        want = int(math.ceil((b - a) / m) * m)
        if want >= s:
            out.append((0, int(s)))
            continue
        extra = want - (b - a)
        a2 = a - extra // 2
        a2 = min(max(0, a2), int(s) - want)
        out.append((a2, a2 + want))
    return tuple(out)  # type: ignore[return-value]


class RoiRule(Protocol):
    """Net1's mean softmax (1, C, d, h, w) on the coarse grid + case properties -> ROI on the full grid.

    A rule is passed to ``Predictor(roi_rule=...)``; the default is :func:`make_roi_rule` of the plans.
    A rule dataclass built with ``margin_mm=None`` is given the plans' ``inference.roi_margin_mm`` by the
    predictor (:func:`with_margin`).
    """

    def __call__(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> Box: ...


def margin_voxels(margin_mm: float, properties: Mapping[str, Any], coarse_shape: Sequence[int]) -> list[int]:
    """The ROI margin per axis in full-grid voxels: ``margin_mm``, and at least one coarse voxel (Net1's
    resolution, so a box edge that Net1 placed one coarse voxel short is still inside)."""
    shape = [int(n) for n in properties["shape"]]
    spacing = [float(s) for s in properties["spacing"]]
    return [max(math.ceil(margin_mm / s), math.ceil(n / max(int(c), 1))) for s, n, c in zip(spacing, shape, coarse_shape)]


def grow_roi(box: Box, margin_mm: float, properties: Mapping[str, Any], coarse_shape: Sequence[int]) -> Box:
    """A full-grid box grown by the ROI margin (:func:`margin_voxels`) and clipped to the volume."""
    shape = tuple(int(n) for n in properties["shape"])
    return grow_box(box, margin_voxels(margin_mm, properties, coarse_shape), shape)


def roi_from_coarse_mask(mask: np.ndarray | torch.Tensor, properties: Mapping[str, Any], margin_mm: float) -> Box:
    """Box of a coarse-grid mask on the full grid, grown by ``margin_mm`` (at least one coarse voxel)
    and clipped to the volume; the whole volume when the mask is empty."""
    shape = tuple(int(n) for n in properties["shape"])
    coarse_shape = tuple(int(n) for n in mask.shape)
    box = foreground_box(mask)
    if box is None:
        return full_box(shape)
    return grow_roi(coarse_box_to_full(box, coarse_shape, shape), margin_mm, properties, coarse_shape)


def with_margin(rule: RoiRule, margin_mm: float) -> RoiRule:
    """``rule`` with the plans' margin when it was built without one (``margin_mm=None``)."""
    if dataclasses.is_dataclass(rule) and getattr(rule, "margin_mm", 0.0) is None:
        return dataclasses.replace(rule, margin_mm=margin_mm)  # type: ignore[type-var]
    return rule


@dataclass(frozen=True)
class AllForegroundRoi:
    """Every coarse voxel whose argmax is not background (one stray detection widens the ROI)."""

    margin_mm: float

    def __call__(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> Box:
        fg = (mean_probs[0].argmax(dim=0) != 0).cpu()
        return roi_from_coarse_mask(fg, properties, self.margin_mm)


@dataclass(frozen=True)
class WholeVolumeRoi:
    """Net2 on every voxel: the ROI can never lose the heart. Net2 is fully convolutional in-plane, so
    this costs the whole slices' area instead of the box's (cheap for cine MR, 4-8x for a CT's ROI)."""

    margin_mm: float | None = 0.0

    def __call__(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> Box:
        return full_box([int(n) for n in properties["shape"]])


@dataclass(frozen=True)
class HeartComponentRoi:
    """The heart's connected component(s) of ``1 - p_background > threshold`` on the coarse grid.

    Components are weighted by their probability mass (sum of ``1 - p_background``), not their voxel
    count, so a large faint false detection loses to the confident heart. With ``centre_sigma`` > 0 the
    mass is also weighted by ``exp(-d^2 / (2 centre_sigma^2))``, ``d`` the in-plane distance of the
    component's centre of mass from the middle of the (body-cropped) field of view as a fraction of its
    size: cardiac scans are planned with the heart near the middle, and the false detections of scans from
    other centres are bright rings at the chest wall, near the edge. Kept: the best-scoring component,
    every component scoring at least ``min_component_fraction`` of it (a heart split in pieces across
    thick slices stays whole) and every component within ``join_distance_mm`` of it (0 = off).
    """

    margin_mm: float
    min_component_fraction: float = 0.1
    join_distance_mm: float = 0.0
    centre_sigma: float = 0.0
    threshold: float = 0.5
    connectivity: int = 26

    def heart_mask(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> np.ndarray:
        """Boolean coarse-grid mask of the kept components (all False when Net1 finds nothing)."""
        heart = 1.0 - mean_probs[0, 0].float().cpu().numpy()
        labels, n = cc3d.connected_components(heart > self.threshold, connectivity=self.connectivity,
                                              return_N=True)
        if n <= 1:
            return labels > 0
        mass = np.bincount(labels.ravel(), weights=heart.ravel(), minlength=n + 1)[1:]
        if self.centre_sigma > 0:
            centres = np.asarray(ndimage.center_of_mass(heart, labels, np.arange(1, n + 1)))[:, 1:]
            offset = centres / np.maximum(np.asarray(labels.shape[1:], dtype=float) - 1.0, 1.0) - 0.5
            mass = mass * np.exp(-(offset ** 2).sum(axis=1) / (2.0 * self.centre_sigma ** 2))
        main = int(np.argmax(mass)) + 1
        keep = mass >= self.min_component_fraction * mass[main - 1]
        if self.join_distance_mm > 0:
            dist = ndimage.distance_transform_edt(labels != main, sampling=_coarse_spacing(properties, labels.shape))
            nearest = ndimage.minimum(dist, labels, index=np.arange(1, n + 1))
            keep |= np.asarray(nearest) <= self.join_distance_mm
        keep[main - 1] = True
        return np.concatenate([[False], keep])[labels]

    def __call__(self, mean_probs: torch.Tensor, properties: Mapping[str, Any]) -> Box:
        return roi_from_coarse_mask(self.heart_mask(mean_probs, properties), properties, self.margin_mm)


def _coarse_spacing(properties: Mapping[str, Any], coarse_shape: Sequence[int]) -> tuple[float, ...]:
    """Spacing of Net1's grid in mm: the stored ``coarse_spacing`` or the extent over the coarse shape."""
    if properties.get("coarse_spacing") is not None:
        return tuple(float(s) for s in properties["coarse_spacing"])
    return tuple(float(s) * int(n) / int(c) for s, n, c in zip(properties["spacing"], properties["shape"], coarse_shape))


def make_roi_rule(rule: str, margin_mm: float, min_component_fraction: float = 0.1,
                  join_distance_mm: float = 0.0, centre_sigma: float = 0.0) -> RoiRule:
    """The ROI rule named by the plans' ``inference.roi_rule`` (validated by ``planning.plans.parse_plans``)."""
    if rule == "all_foreground":
        return AllForegroundRoi(margin_mm)
    if rule == "whole_volume":
        return WholeVolumeRoi(margin_mm)
    if rule == "heart_components":
        return HeartComponentRoi(margin_mm, min_component_fraction, join_distance_mm, centre_sigma)
    raise ValueError(f"unknown ROI rule {rule!r}")


def clamped_range(start: int, stop: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Indices ``start..stop-1`` clamped to ``[0, size - 1]`` (edge replication beyond the volume;
    :func:`heartcascade.preprocessing.resampling.clamped_indices` on the device)."""
    return torch.from_numpy(clamped_indices(start, stop, size)).to(device)


def padded_range(start: int, length: int, size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``length`` indices from ``start``, clamped: pads a window shorter than ``length`` by replication."""
    return clamped_range(start, start + length, size, device)


def gather(volume: torch.Tensor, indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``volume[..., iz, :, :][..., iy, :][..., ix]`` for a tensor (..., D, H, W) and three index lists."""
    out = volume
    for axis, idx in enumerate(indices):
        dim = out.dim() - 3 + axis
        if idx.numel() == out.shape[dim] and bool((idx == torch.arange(out.shape[dim], device=idx.device)).all()):
            continue
        out = take(out, dim, idx.to(out.device))
    return out


