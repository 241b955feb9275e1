"""A PNG that lets a person see at a glance whether a segmentation is right.

A few slices along the case's slice axis, chosen through the labelled heart, with the reference
structures coloured on the left and the prediction on the right.
"""
from __future__ import annotations

import io
import os

import numpy as np

from heartcascade.utils.atomic import atomic_write_bytes

# One colour per MM-WHS structure (label 1..7); further labels cycle.
STRUCTURE_COLOURS = np.array([
    [0.90, 0.10, 0.10], [0.95, 0.75, 0.10], [0.15, 0.45, 0.95], [0.60, 0.20, 0.80],
    [0.10, 0.75, 0.75], [0.95, 0.45, 0.70], [0.30, 0.80, 0.25],
])


def _colourise(image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * STRUCTURE_COLOURS[(int(value) - 1) % len(STRUCTURE_COLOURS)]
    return rgb


def choose_slices(reference: np.ndarray, count: int = 4) -> list[int]:
    """Evenly spaced slices (axis 0) through the labelled region."""
    occupied = np.flatnonzero(reference.reshape(reference.shape[0], -1).any(axis=1))
    if occupied.size == 0:
        occupied = np.arange(reference.shape[0])
    positions = np.linspace(occupied[0], occupied[-1], count + 2)[1:-1]
    return sorted({int(round(p)) for p in positions})


def save_overlay(path: str | os.PathLike, image: np.ndarray, reference: np.ndarray, prediction: np.ndarray,
                 label_names: dict[int, str] | None = None, title: str = "", count: int = 4) -> list[int]:
    """Write the overlay PNG atomically; arrays are (slices, rows, cols). Returns the slice indices shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    slices = choose_slices(reference, count)
    fig, axes = plt.subplots(len(slices), 2, figsize=(7, 3.3 * len(slices)), squeeze=False)
    for row, k in enumerate(slices):
        for col, (labels, name) in enumerate(((reference, "reference"), (prediction, "prediction"))):
            ax = axes[row, col]
            ax.imshow(_colourise(image[k], labels[k]), interpolation="nearest")
            ax.set_title(f"{name}, slice {k}", fontsize=9)
            ax.axis("off")
    values = sorted(int(v) for v in np.union1d(np.unique(reference), np.unique(prediction)) if v != 0)
    names = label_names or {}
    handles = [Patch(color=STRUCTURE_COLOURS[(v - 1) % len(STRUCTURE_COLOURS)], label=names.get(v, str(v))) for v in values]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return slices
