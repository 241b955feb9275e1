"""Test-time brightening: a second pass for scans whose blood pool is darker than the training data's.

Percentile normalisation maps every MR scan's 0.5-99.5 % window to the same range, but where the bright
blood pool sits inside that window depends on the scanner and sequence: on another centre's cine MR the
worst volumes are the ones whose blood pool lies far lower than in any training scan (a few very bright
voxels, fat or a coil's hot spot, stretch the window), and the networks, which learnt "bright = blood", lose it.
The rule (the plans' ``inference.brightening``, planner rule 13):

1. predict as usual;
2. measure the reference class (the blood pool) where the first pass put it: its mean on the normalised
   image's window mapped to [0, 1] (the fingerprint's ``class_brightness`` measure, channel by channel);
3. where that mean ``m`` is below the channel's ``target`` t, scale the window fraction by ``f = t / m``
   (never above ``max_factor``; values pushed above the window's top stay at the top) and predict again.

The scaling is linear, so the ratio of blood to myocardium is kept: a gamma (the first version) lifted the
darker myocardium more than the blood, and end-systolic cavities grew into it (ejection fraction error 5 -> 11
points against 5 -> 7.7 with the scaling, same Dice gain; documentation/results.md). Scans at least as bright
as the target, or where the first pass finds fewer than ``min_voxels`` of the class, keep the first pass (and
cost nothing extra).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from heartcascade.planning.plans import BrighteningPlan
from heartcascade.preprocessing.normalization import class_window_means


def window_fraction(channel: np.ndarray, target_range: Sequence[float]) -> np.ndarray:
    """A normalised channel's values as fractions of its ``target_range`` ([0, 1]; float32)."""
    low, high = float(target_range[0]), float(target_range[1])
    return np.clip((channel.astype(np.float32, copy=False) - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def class_brightness(image: np.ndarray, labels: np.ndarray, label: int, target_ranges: Sequence[Sequence[float]],
                     min_voxels: int) -> list[float] | None:
    """Per channel, the mean of ``label``'s voxels on the [0, 1] window (the fingerprint's measure,
    :func:`~heartcascade.preprocessing.normalization.class_window_means`); None when fewer than ``min_voxels``."""
    if int(np.count_nonzero(labels == label)) < min_voxels:
        return None
    return [class_window_means(image[c], labels, float(r[0]), float(r[1]), label + 1)[label]
            for c, r in enumerate(target_ranges)]


def brightening_factors(brightness: Sequence[float] | None, rule: BrighteningPlan) -> list[float] | None:
    """Per channel, the factor that lifts the measured brightness to the target (1 where it is bright enough,
    never above ``max_factor``); None when no channel needs a change."""
    if brightness is None:
        return None
    factors = [1.0 if m >= t or m <= 0.0 else min(rule.max_factor, t / m) for m, t in zip(brightness, rule.targets)]
    return factors if any(f > 1.0 for f in factors) else None


def brighten(image: np.ndarray, factors: Sequence[float], target_ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """A new normalised (C, ...) image with each channel's window fraction scaled by its factor, capped at the
    window's top."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, (f, r) in enumerate(zip(factors, target_ranges)):
        low, high = float(r[0]), float(r[1])
        fraction = window_fraction(image[c], r)
        if f != 1.0:
            np.multiply(fraction, np.float32(f), out=fraction)
            np.minimum(fraction, np.float32(1.0), out=fraction)
        out[c] = fraction * np.float32(high - low) + np.float32(low)
    return out
