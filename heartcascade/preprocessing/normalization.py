"""Intensity normalisation to the plans' ``target_range`` ([-1, 1] as in the paper).

* ``ct_clip`` (CT in HU): HU values mean the same thing in every scan, so one clip window for the whole
  dataset is taken from the fingerprint -- the 0.5 / 99.5 percentiles of *foreground* (heart) voxels
  pooled over the training cases -- and mapped linearly to [-1, 1].
* ``percentile_clip`` (MR and other uncalibrated channels): intensities are arbitrary per scan, so the
  window is the case's own 0.5 / 99.5 percentiles (of the cropped image), mapped to [-1, 1].

The per-channel scheme, its parameters and its ``target_range`` live in the plans' ``normalization`` (a list,
one entry per input channel).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from heartcascade.utils.errors import HCError

# At most this many voxels are used to estimate a case's percentiles (exact enough, bounded time).
_PERCENTILE_SAMPLE = 2_000_000


def rescale_(out: np.ndarray, lo: float, hi: float, target: Sequence[float]) -> np.ndarray:
    """Clip a float32 array to [lo, hi] and map that window linearly to ``target`` (low, high), in place."""
    low, high = float(target[0]), float(target[1])
    if hi <= lo:  # constant image or degenerate window: everything maps to the centre
        out[...] = (low + high) / 2
        return out
    np.clip(out, lo, hi, out=out)
    out -= np.float32(lo)
    out *= np.float32((high - low) / (hi - lo))
    out += np.float32(low)
    return out


def case_percentiles(array: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """``low``/``high`` percentiles of one channel, from a strided sample when the volume is large."""
    flat = np.asarray(array).ravel()
    step = max(1, flat.size // _PERCENTILE_SAMPLE)
    lo, hi = np.percentile(flat[::step], [low, high])
    return float(lo), float(hi)


#: Slices per step of :func:`class_window_means` (bounded memory on CT).
_MEANS_SLAB = 16


def class_window_means(array: np.ndarray, seg: np.ndarray, lo: float, hi: float,
                       num_classes: int) -> list[float | None]:
    """Mean of each class (None where absent) on the window [lo, hi] mapped to [0, 1]: how bright a structure
    is within the window normalisation uses. Slab by slab in float32 (a CT volume's copy would be GBs); the
    fingerprint (raw image, the case's percentile window) and test-time brightening (normalised image, its
    target range) take this one measure."""
    scale = np.float32(1.0 / (hi - lo) if hi > lo else 0.0)
    sums = np.zeros(num_classes, dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    for z in range(0, array.shape[0], _MEANS_SLAB):
        values = np.clip((np.asarray(array[z:z + _MEANS_SLAB], dtype=np.float32) - np.float32(lo)) * scale, 0, 1)
        labels = np.asarray(seg[z:z + _MEANS_SLAB]).ravel()
        sums += np.bincount(labels, weights=values.ravel(), minlength=num_classes)[:num_classes]
        counts += np.bincount(labels, minlength=num_classes)[:num_classes]
    return [float(sums[c] / counts[c]) if counts[c] else None for c in range(num_classes)]


def channel_window(array: np.ndarray, scheme: dict[str, Any]) -> tuple[float, float]:
    """The clip window a plans normalisation entry gives for one channel of one case."""
    kind = scheme.get("scheme")
    if kind == "ct_clip":
        return float(scheme["clip_low"]), float(scheme["clip_high"])
    if kind == "percentile_clip":
        return case_percentiles(array, float(scheme["percentile_low"]), float(scheme["percentile_high"]))
    raise HCError(f"unknown normalisation scheme {kind!r} in plans (expected 'ct_clip' or 'percentile_clip')")


def normalize_image(image: np.ndarray, schemes: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Normalise every channel of a (C, ...) image into a new float32 array; returns it and the windows used.

    Works channel by channel in the output buffer, so peak memory is the input plus one float32 copy.
    """
    if len(schemes) != image.shape[0]:
        raise HCError(f"plans list {len(schemes)} normalisation entries but the image has {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    windows = []
    for c, scheme in enumerate(schemes):
        out[c] = image[c]
        lo, hi = channel_window(out[c], scheme)
        rescale_(out[c], lo, hi, scheme["target_range"])
        windows.append({"clip_low": lo, "clip_high": hi})
    return out, windows


def normalize_image_inplace(image: np.ndarray, schemes: list[dict[str, Any]]) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Like :func:`normalize_image` but overwrites a float32 (C, ...) array (no extra copy)."""
    if image.dtype != np.float32:
        raise HCError(f"normalize_image_inplace needs float32, got {image.dtype}")
    if len(schemes) != image.shape[0]:
        raise HCError(f"plans list {len(schemes)} normalisation entries but the image has {image.shape[0]} channels")
    windows = []
    for c, scheme in enumerate(schemes):
        lo, hi = channel_window(image[c], scheme)
        rescale_(image[c], lo, hi, scheme["target_range"])
        windows.append({"clip_low": lo, "clip_high": hi})
    return image, windows
