"""A PNG that lets a person see at a glance whether a segmentation is right.

:func:`save_overlay` (the demo's picture): a few slices along the case's slice axis, chosen through the
labelled heart, with the reference structures coloured on the left and the prediction on the right.
:func:`write_case_overlay` (``hc_overlay``, ``hc_predict --overlays``): axial, coronal and sagittal
views through the centre of the segmented heart, for any case, with or without a reference.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from heartcascade.dataset import segments
from heartcascade.dataset.image_io import read_image
from heartcascade.utils.atomic import atomic_write_bytes, ensure_writable_file
from heartcascade.utils.errors import HCError

# One colour per MM-WHS structure (label 1..7); further labels cycle (the colours every output format uses).
STRUCTURE_COLOURS = np.array(segments.STRUCTURE_COLOURS)


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


def _pyplot():
    """``(matplotlib.pyplot, Patch)`` with the file-only Agg backend, chosen before pyplot is first loaded."""
    import matplotlib  # deferred: matplotlib (~1.4 s), loaded only when a picture is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: matplotlib, after matplotlib.use("Agg")
    from matplotlib.patches import Patch  # deferred: matplotlib, after matplotlib.use("Agg")

    return plt, Patch


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
    plt, Patch = _pyplot()
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


# ---------------------------------------------------------------------------------------------------
# Three orthogonal views of any case (hc_overlay, hc_predict --overlays)

VIEWS = ("axial", "coronal", "sagittal")


def _lps_array(image, label: bool = False) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(array (k, j, i), spacing (k, j, i)) of an image reoriented so that i→patient left, j→posterior,
    k→superior (nearest axis-aligned orientation for oblique scans)."""
    oriented = sitk.DICOMOrient(image, "LPS")
    array = sitk.GetArrayFromImage(oriented)
    if not label:
        array = array.astype(np.float32)
    return array, tuple(float(s) for s in reversed(oriented.GetSpacing()))


def _centre(*label_volumes: np.ndarray | None) -> tuple[int, int, int]:
    """Voxel at the centre of the labelled region (the first volume with any label), else the middle."""
    for labels in label_volumes:
        if labels is not None and labels.any():
            coords = np.nonzero(labels)
            return tuple(int(round((int(c.min()) + int(c.max())) / 2)) for c in coords)  # type: ignore[return-value]
    shape = next(v for v in label_volumes if v is not None).shape
    return tuple(s // 2 for s in shape)  # type: ignore[return-value]


def orthogonal_views(volume: np.ndarray, centre: Sequence[int],
                     spacing: Sequence[float]) -> list[tuple[str, np.ndarray, float]]:
    """``[(view, 2D array, aspect)]`` through ``centre`` of an LPS-ordered volume (k, j, i): axial seen
    from the feet (patient's right on the left, anterior up), coronal and sagittal with superior up."""
    k, j, i = (int(c) for c in centre)
    sk, sj, si = spacing
    return [("axial", volume[k], sj / si),
            ("coronal", volume[:, j, :][::-1], sk / si),
            ("sagittal", volume[:, :, i][::-1], sk / sj)]


def write_case_overlay(image_path: str | os.PathLike, segmentation_path: str | os.PathLike,
                       output_png: str | os.PathLike, reference_path: str | os.PathLike | None = None,
                       label_names: dict[int, str] | None = None, title: str = "", dpi: int = 90) -> Path:
    """Axial, coronal and sagittal views through the heart of ``segmentation`` (and ``reference``, a
    second row) over the image, with a colour legend; written atomically as a PNG."""
    ensure_writable_file(output_png, "overlay output", "case.png")  # before any reading
    image_sitk = read_image(image_path)
    rows = []
    for name, path in (("reference", reference_path), ("prediction", segmentation_path)):
        if path is not None:
            labels = read_image(path)
            if labels.GetSize() != image_sitk.GetSize():
                raise HCError(f"{path}: size {labels.GetSize()} differs from the image's {image_sitk.GetSize()} "
                              f"({image_path})")
            rows.append((name, labels))
    return write_overlay_png(image_sitk, rows, output_png, label_names, title, dpi, str(image_path))


def write_overlay_png(image_sitk: sitk.Image, label_rows: Sequence[tuple[str, sitk.Image]],
                      output_png: str | os.PathLike, label_names: dict[int, str] | None = None, title: str = "",
                      dpi: int = 90, image_name: str = "image") -> Path:
    """:func:`write_case_overlay` of images already in memory (``hc_predict --overlays`` draws each
    prediction this way without reading anything back); ``label_rows``: (row title, label image)."""
    plt, Patch = _pyplot()
    image, spacing = _lps_array(image_sitk)
    rows: list[tuple[str, np.ndarray]] = []
    for name, labels_sitk in label_rows:
        if labels_sitk.GetSize() != image_sitk.GetSize():
            raise HCError(f"{name}: size {labels_sitk.GetSize()} differs from the image's {image_sitk.GetSize()} "
                          f"({image_name})")
        labels_sitk = sitk.Image(labels_sitk)
        labels_sitk.CopyInformation(image_sitk)  # same grid; tiny header differences must not reorient
        rows.append((name, _lps_array(labels_sitk, label=True)[0]))
    centre = _centre(*(labels for _, labels in reversed(rows)))
    image_views = orthogonal_views(image, centre, spacing)
    # panel widths in proportion to each view's physical width / height, so all panels are equally tall
    ratios = [view.shape[1] / (view.shape[0] * aspect) for _, view, aspect in image_views]
    panel = 3.2
    fig, axes = plt.subplots(len(rows), 3, figsize=(panel * sum(ratios) + 0.4, (panel + 0.35) * len(rows) + 1.0),
                             squeeze=False, gridspec_kw={"width_ratios": ratios})
    for r, (name, labels) in enumerate(rows):
        for c, ((view, grey, aspect), (_, lab, _)) in enumerate(zip(image_views, orthogonal_views(labels, centre, spacing))):
            ax = axes[r, c]
            ax.imshow(_colourise(grey, lab), interpolation="nearest", aspect=aspect)
            ax.set_title(f"{name}, {view}", fontsize=9)
            ax.axis("off")
    values = sorted({int(v) for _, labels in rows for v in np.unique(labels) if v != 0})
    names = label_names or {}
    handles = [Patch(color=STRUCTURE_COLOURS[(v - 1) % len(STRUCTURE_COLOURS)], label=names.get(v, str(v)))
               for v in values]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.03, hspace=0.35 / panel,
                        top=1 - (0.55 if title else 0.3) / height, bottom=(0.55 if handles else 0.1) / height)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(output_png, buffer.getvalue())
    return Path(output_png)
