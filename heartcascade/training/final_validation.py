"""End of training: predict the fold's validation cases with the real predictor and evaluate them.

The predictions go to ``<model folder>/validation/`` in the original image geometry, and
``heartcascade.evaluation.evaluate_folders`` compares them with the raw dataset's ``labelsTr`` (Dice,
Jaccard, ASSD, HD95 per case and structure, means) into ``validation/summary.json`` (+ .csv, .md).
The predictor is built from the just-written final checkpoint of the model folder, so the numbers are
those a user gets with ``hc_predict``. Without the raw images/labels the predictor runs on the
preprocessed cases (``Predictor.predict_preprocessed``, same networks and ROI rule) and the Dice is
computed against the preprocessed labels brought back to the original grid (``"method": "in-memory"``).

With the raw labels at hand the same predictions then choose the fold's connected-component
postprocessing (:func:`heartcascade.evaluation.postprocessing.determine_postprocessing`), written to
``<model folder>/postprocessing.json``; ``hc_predict`` applies it. The validation predictions themselves
are written without postprocessing (the choice is made on them).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from heartcascade.dataset.dataset_json import load_dataset
from heartcascade.dataset.image_io import Geometry, write_array
from heartcascade.evaluation.evaluate import evaluate_folders
from heartcascade.evaluation.postprocessing import determine_postprocessing
from heartcascade.inference.batch import predict_files
from heartcascade.inference.postprocessing import POSTPROCESSING_FILE
from heartcascade.inference.predictor import Predictor
from heartcascade.preprocessing.preprocess import restore_to_original
from heartcascade.preprocessing.storage import load_case
from heartcascade.training.validation import dice_per_class
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError

VALIDATION_FOLDER = "validation"


def raw_dataset_dir(raw_root: Path, dataset_name: str) -> Path | None:
    """The raw dataset folder when it holds the labels to evaluate against."""
    folder = raw_root / dataset_name
    return folder if (folder / "labelsTr").is_dir() else None


def _raw_files(raw: Path, ids: list[str]) -> list[list[Path]] | None:
    """Per case the raw image files, or None when one is missing (then the preprocessed cases are used)."""
    info = load_dataset(raw)
    files = []
    for cid in ids:
        paths = [raw / "imagesTr" / f"{cid}_{c:04d}{info.file_ending}" for c in range(info.num_channels)]
        if not all(p.is_file() for p in paths):
            return None
        files.append(paths)
    return files


def run_final_validation(model_folder: Path, predictor: Predictor, ids: list[str], raw: Path | None,
                         data_dir: Path, log: Callable[[str], None],
                         file_ending: str = ".nii.gz") -> tuple[dict[str, Any] | None, str | None]:
    """Predict ``ids`` into ``model_folder/validation`` and evaluate; returns (summary, method)."""
    out_dir = model_folder / VALIDATION_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    (model_folder / POSTPROCESSING_FILE).unlink(missing_ok=True)  # chosen for an earlier model
    for stale in out_dir.iterdir():  # predictions of an earlier run of this fold
        if stale.is_file():
            stale.unlink()
    if not ids:
        log("no validation cases: final validation skipped")
        return None, None
    t0 = time.perf_counter()
    files = _raw_files(raw, ids) if raw is not None else None
    if files is None:
        if raw is not None:
            log("raw validation images not found; validating on the preprocessed cases")
        summary = _evaluate_preprocessed(predictor, ids, data_dir, out_dir, file_ending)
        summary["method"] = "in-memory"
        atomic_write_json(out_dir / "summary.json", summary)
        log(f"final validation (in-memory, no raw labels found, {len(ids)} cases): mean Dice "
            f"{summary['mean']['dice']:.4f}")
        return summary, "in-memory"
    report = predict_files(predictor, files, out_dir, case_ids=ids, overwrite=True)
    if report.failed:
        first = sorted(report.failed.items())[0]
        raise HCError(f"validation prediction failed for {len(report.failed)} case(s), e.g. {first[0]}: {first[1]}")
    summary = evaluate_folders(raw / "labelsTr", out_dir, raw / "dataset.json",  # type: ignore[operator]
                               output_json=out_dir / "summary.json", progress=False)
    summary["method"] = "predictor"
    atomic_write_json(out_dir / "summary.json", summary)
    log(f"final validation (predictor, {len(ids)} cases, {time.perf_counter() - t0:.1f}s): "
        + _format_aggregate(summary.get("aggregate", {})))
    determine_postprocessing(out_dir, raw / "labelsTr", raw / "dataset.json",  # type: ignore[operator]
                             output_json=model_folder / POSTPROCESSING_FILE, log=log)
    return summary, "predictor"


def _format_aggregate(agg: dict[str, Any]) -> str:
    parts = []
    for name, stats in agg.items():
        dice = (stats.get("dice") or {}).get("mean") if isinstance(stats, dict) else None
        if dice is not None:
            parts.append(f"{name} {dice:.3f}")
    return "Dice " + ", ".join(parts) if parts else "(no aggregate)"


def _evaluate_preprocessed(predictor: Predictor, ids: list[str], data_dir: Path, out_dir: Path,
                           ending: str) -> dict[str, Any]:
    """Dice / Jaccard per case against the preprocessed labels on the original grid (no raw labels)."""
    ncls = predictor.num_classes
    names = predictor.plans.class_names
    cases = {}
    for cid in ids:
        pc = load_case(data_dir, cid, mmap=True)
        res = predictor.predict_preprocessed(np.array(pc.image, dtype=np.float32), pc.properties)
        write_array(predictor.apply_codes(res.labels).astype(np.uint8), Geometry.from_dict(pc.properties["geometry"]),
                    out_dir / f"{cid}{ending}")
        dice = dice_per_class(res.labels, restore_to_original(np.asarray(pc.seg), pc.properties), ncls)
        cases[cid] = {names[c]: {"dice": None if not np.isfinite(dice[c]) else float(dice[c]),
                                 "jaccard": None if not np.isfinite(dice[c]) else float(dice[c] / (2 - dice[c]))}
                      for c in range(1, len(dice))}
    values = [v["dice"] for case in cases.values() for v in case.values() if v["dice"] is not None]
    if not cases:
        raise HCError("no validation cases to evaluate")
    return {"cases": cases, "mean": {"dice": float(np.mean(values)) if values else float("nan")}}
