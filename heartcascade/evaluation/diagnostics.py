"""Why a model fails on a scan: per-volume diagnostics of the cascade against a reference label map.

Made to find the causes of cross-centre failures (documentation/results.md, "Scans from other centres"):
for one labelled volume it records whether the ROI Net1 chose holds the heart (``roi_recall``, the
fraction of reference foreground inside it), the Dice of Net1 alone and of the cascade, and how the
image looks to the networks after preprocessing (field of view, heart size, where the heart sits, the
normalised intensities of background and structures). ``scripts/crosscentre_report.py`` runs it over a
folder and prints the table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from heartcascade.dataset.image_io import read_image
from heartcascade.evaluation.metrics import label_metrics, mean_over_structures
from heartcascade.inference.predictor import Predictor
from heartcascade.inference.roi import box_slices
from heartcascade.preprocessing.preprocess import prepare_arrays, read_labels, restore_to_original


def _dice_table(ref: np.ndarray, pred: np.ndarray, spacing: tuple[float, ...],
                structures: Mapping[str, int]) -> dict[str, float]:
    per = label_metrics(ref, pred, spacing, structures, whole_heart=True, hd95="pooled")
    out = {name: float(m.dice) for name, m in per.items()}
    out["mean"] = float(mean_over_structures({k: v for k, v in per.items() if k in structures})["dice"])
    return out


def image_statistics(image: np.ndarray, seg: np.ndarray, spacing: tuple[float, float, float],
                     structures: Mapping[str, int]) -> dict[str, Any]:
    """What the networks see of one preprocessed case: canonical (D, H, W) normalised image and labels."""
    fg = seg > 0
    stats: dict[str, Any] = {
        "shape": [int(n) for n in image.shape],
        "fov_mm": [round(float(n * s), 1) for n, s in zip(image.shape, spacing)],
        "heart_voxels": int(fg.sum()),
        "heart_ml": round(float(fg.sum() * np.prod(spacing)) / 1000.0, 1),
        "intensity_p01_p50_p99": [round(float(v), 3) for v in np.percentile(image, [1, 50, 99])],
        "background_mean": round(float(image[~fg].mean()), 3),
    }
    for name, value in structures.items():
        mask = seg == value
        stats[f"{name}_mean"] = round(float(image[mask].mean()), 3) if mask.any() else None
    if fg.any():  # heart centre as a fraction of the (cropped) volume per axis D, H, W (0.5 = centred)
        coords = np.argwhere(fg)
        centre = coords.mean(0) / np.asarray(image.shape)
        stats["heart_centre_fraction"] = [round(float(c), 2) for c in centre]
    return stats


def case_diagnostics(predictor: Predictor, image_path: str | Path, label_path: str | Path,
                     structures: Mapping[str, int], case_id: str | None = None) -> dict[str, Any]:
    """ROI recall, Net1 and cascade Dice and image statistics of one labelled volume.

    ``structures``: name -> training label (e.g. ``{"LV": 1, "Myo": 2, "RV": 3}``); the label file holds
    training labels (an imported raw dataset's ``labelsTr``).
    """
    case_id = case_id or Path(image_path).name
    image_sitk = read_image(image_path)
    label_sitk = read_image(label_path)
    num_classes = predictor.plans.num_classes
    ref = read_labels(label_sitk, num_classes, str(label_path))
    spacing_zyx = tuple(reversed(image_sitk.GetSpacing()))

    image, properties = predictor.preprocess([image_sitk], case_id)
    net1 = predictor.predict_preprocessed(image, properties, net1_only=True)
    cascade = predictor.predict_preprocessed(image, properties)
    roi = np.zeros(properties["shape"], dtype=np.uint8)
    roi[box_slices(cascade.roi_box)] = 1
    roi_zyx = restore_to_original(roi, properties).astype(bool)
    fg = ref > 0
    recall = float((fg & roi_zyx).sum() / max(int(fg.sum()), 1))

    # the labelled preprocessing (its crop also keeps the whole reference heart), for the image statistics
    norm_image, seg, prep_props = prepare_arrays([image_sitk], predictor.preprocess_settings, label_sitk, case_id)
    stats = image_statistics(norm_image[0], seg, tuple(prep_props["spacing"]), structures)
    return {
        "case": case_id,
        "roi_recall": round(recall, 4),
        "roi_fraction_of_volume": round(float(roi.mean()), 3),
        "net1_dice": _dice_table(ref, net1.labels.astype(np.uint8), spacing_zyx, structures),
        "cascade_dice": _dice_table(ref, cascade.labels.astype(np.uint8), spacing_zyx, structures),
        "brightening_factor": cascade.brightening,  # the cascade's second-pass factors (None: one pass)
        "image": stats,
    }
