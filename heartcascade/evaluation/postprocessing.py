"""Choosing the connected-component postprocessing on validation predictions (nnU-Net's procedure).

Given predictions and their references, first decide whether keeping only the largest connected
component of the whole foreground raises the mean Dice over structures; then, on top of that
decision, for each structure whether keeping only its own largest component raises that structure's
mean Dice. A step is kept only where it strictly raises Dice: on one centre's scans the largest
component is not always the heart, and the data decide. The decision
(:class:`heartcascade.inference.postprocessing.Postprocessing` plus the Dice before and after, for
people) is written as ``postprocessing.json``; final validation does this per fold, and
``hc_determine_postprocessing`` on the pooled cross-validation predictions of several folds.

Dice follows the evaluation's empty-structure rule (both empty = 1, one empty = 0). Removing
components of one structure changes no other structure's mask, so every per-structure decision is
independent and all variants are scored in one pass over the cases, one case in memory at a time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from heartcascade.dataset.image_io import label_array, read_image
from heartcascade.evaluation.evaluate import _check_labels, check_geometry, find_cases, labels_from_dataset, \
    to_training_labels
from heartcascade.inference.postprocessing import POSTPROCESSING_FILE, Postprocessing, keep_largest_component
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError

FOREGROUND = "foreground"


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty (the evaluation's rule)."""
    n_ref, n_pred = int(np.count_nonzero(ref)), int(np.count_nonzero(pred))
    if n_ref + n_pred == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(ref & pred)) / (n_ref + n_pred)


def _variant_dice(ref: np.ndarray, pred: np.ndarray, labels: Sequence[int], connectivity: int) -> np.ndarray:
    """(2, 2, L) Dice: [raw | largest foreground component] x [as is | largest component of the label]."""
    union = (ref != 0) | (pred != 0)
    if union.any():
        box = ndimage.find_objects(union.astype(np.uint8))[0]
        ref, pred = ref[box], pred[box]
    out = np.zeros((2, 2, len(labels)))
    foreground = pred != 0
    bases = (pred, np.where(keep_largest_component(foreground, connectivity), pred, 0))
    for b, base in enumerate(bases):
        for j, label in enumerate(labels):
            r, m = ref == label, base == label
            out[b, 0, j] = dice(r, m)
            out[b, 1, j] = dice(r, keep_largest_component(m, connectivity))
    return out


def _pairs(pred_dirs: Sequence[Path], ref_dir: Path) -> list[tuple[str, Path, Path]]:
    refs = find_cases(ref_dir)
    pairs: dict[str, tuple[Path, Path]] = {}
    for folder in pred_dirs:
        for name, path in find_cases(folder).items():
            if name in pairs:
                raise HCError(f"{path}: case '{name}' is also predicted in {pairs[name][0].parent}")
            if name not in refs:
                raise HCError(f"{ref_dir}: no reference for prediction {path}")
            pairs[name] = (path, refs[name])
    if not pairs:
        raise HCError(f"{', '.join(str(d) for d in pred_dirs)}: no prediction files found")
    return [(name, *pairs[name]) for name in sorted(pairs)]


def determine_postprocessing(pred_dirs: str | os.PathLike | Sequence[str | os.PathLike],
                             ref_dir: str | os.PathLike, labels: Mapping[str, int] | str | os.PathLike,
                             label_codes: Mapping[int, int] | None = None,
                             output_json: str | os.PathLike | None = None, connectivity: int = 26,
                             log: Any = None) -> dict[str, Any]:
    """Choose the postprocessing on predictions (one folder or several, e.g. the folds' ``validation/``).

    ``labels``: ``{structure: training label}`` or a dataset.json (or its folder), which also gives the
    label codes. Returns the JSON-ready decision (``Postprocessing.to_dict()`` plus ``dice_before``,
    ``dice_after``, ``decisions``, ``num_cases``) and writes it to ``output_json`` when given.
    """
    folders = [Path(pred_dirs)] if isinstance(pred_dirs, (str, os.PathLike)) else [Path(d) for d in pred_dirs]
    ref_dir = Path(ref_dir)
    if isinstance(labels, (str, os.PathLike)):
        labels, json_codes = labels_from_dataset(labels)
        label_codes = json_codes if label_codes is None else label_codes
    labels = _check_labels(labels)
    names, values = list(labels), [int(v) for v in labels.values()]
    scores = []
    for case, pred_path, ref_path in _pairs(folders, ref_dir):
        ref_image, pred_image = read_image(ref_path), read_image(pred_path)
        check_geometry(ref_image, pred_image, ref_path, pred_path)
        ref = to_training_labels(label_array(ref_image, ref_path), values, label_codes, ref_path)
        pred = to_training_labels(label_array(pred_image, pred_path), values, label_codes, pred_path)
        scores.append(_variant_dice(ref, pred, values, connectivity))
    mean = np.mean(np.stack(scores), axis=0)  # (2, 2, L): mean over cases
    decisions: dict[str, Any] = {}
    use_fg = bool(mean[1, 0].mean() > mean[0, 0].mean())
    decisions[FOREGROUND] = {"dice_before": float(mean[0, 0].mean()), "dice_after": float(mean[1, 0].mean()),
                             "applied": use_fg}
    base = mean[int(use_fg)]
    chosen = []
    for j, (name, value) in enumerate(zip(names, values)):
        applied = bool(base[1, j] > base[0, j])
        decisions[name] = {"label": value, "dice_before": float(base[0, j]), "dice_after": float(base[1, j]),
                           "applied": applied}
        if applied:
            chosen.append(value)
    post = Postprocessing(use_fg, tuple(chosen), connectivity)
    final = np.where([v in chosen for v in values], base[1], base[0])
    result = {**post.to_dict(), "structures": dict(labels), "num_cases": len(scores),
              "dice_before": {**{n: float(mean[0, 0, j]) for j, n in enumerate(names)}, "mean": float(mean[0, 0].mean())},
              "dice_after": {**{n: float(final[j]) for j, n in enumerate(names)}, "mean": float(final.mean())},
              "decisions": decisions, "predictions": [str(f) for f in folders], "references": str(ref_dir)}
    if output_json is not None:
        atomic_write_json(output_json, result)
    if log is not None:
        steps = (["largest foreground component"] if use_fg else []) + \
                [f"largest {n} component" for n, v in zip(names, values) if v in chosen]
        log(f"postprocessing on {len(scores)} case(s): {', '.join(steps) or 'none'}; mean Dice "
            f"{result['dice_before']['mean']:.4f} -> {result['dice_after']['mean']:.4f}")
    return result


def postprocessing_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / POSTPROCESSING_FILE
