"""Test-time brightening: a second pass for scans whose blood pool is darker than the training data's.

Percentile normalisation maps every MR scan's 0.5-99.5 % window to the same range, but where the bright
blood pool sits inside that window depends on the scanner and sequence: on another centre's cine MR the
worst volumes are the ones whose blood pool lies far lower than in any training scan, and the networks,
which learnt "bright = blood", lose it. The rule (the plans' ``inference.brightening``, planner rule 13):

1. predict as usual;
2. measure the reference class (the blood pool) where the first pass put it: its mean on the normalised
   image's window mapped to [0, 1] (the fingerprint's ``class_brightness`` measure, channel by channel);
3. where that mean ``m`` is below the channel's ``target`` t, raise the window by a gamma
   ``g = ln t / ln m`` (so ``m ** g = t``), never below ``gamma_min``, and predict again on the brightened image.

Scans at least as bright as the target, or where the first pass finds fewer than ``min_voxels`` of the class,
keep the first pass (and cost nothing extra). Measured effect: documentation/results.md.
"""
from __future__ import annotations

import math
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


def brightening_gammas(brightness: Sequence[float] | None, rule: BrighteningPlan) -> list[float] | None:
    """Per channel, the gamma that lifts the measured brightness to the target (1 where it is bright enough,
    never below ``gamma_min``); None when no channel needs a change."""
    if brightness is None:
        return None
    gammas = []
    for m, t in zip(brightness, rule.targets):
        g = 1.0 if m >= t or m <= 0.0 else max(rule.gamma_min, math.log(t) / math.log(m))
        gammas.append(min(1.0, g))
    return gammas if any(g < 1.0 for g in gammas) else None


def brighten(image: np.ndarray, gammas: Sequence[float], target_ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """A new normalised (C, ...) image with each channel's window fraction raised to its gamma."""
    out = np.empty(image.shape, dtype=np.float32)
    for c, (g, r) in enumerate(zip(gammas, target_ranges)):
        low, high = float(r[0]), float(r[1])
        fraction = window_fraction(image[c], r)
        if g != 1.0:
            np.power(fraction, np.float32(g), out=fraction)
        out[c] = fraction * np.float32(high - low) + np.float32(low)
    return out
