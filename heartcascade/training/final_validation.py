"""End of training: predict the fold's validation cases and evaluate them.

The predictions go to ``<fold folder>/validation/`` in the original image geometry, and
``heartcascade.evaluation.evaluate_folders`` compares them with the raw dataset's ``labelsTr`` (Dice,
Jaccard, ASSD, HD95 per case and structure, means) into ``validation/summary.json`` (+ .csv, .md).

Prediction uses the real predictor (:mod:`heartcascade.inference.predictor`) on the raw validation images
with the just-written final checkpoint, so the numbers are those a user gets with ``hc_predict``. When the
predictor (or the raw images) is unavailable, the validation cases are predicted in memory from the
preprocessed arrays with the trainer's own forward pass (:mod:`heartcascade.training.validation`) and
written back to the original geometry with ``preprocessing.preprocess.restore_to_original``; the
summary then records ``"method": "in-memory"``.

With the raw labels at hand the same predictions then choose the fold's connected-component
postprocessing (:func:`heartcascade.evaluation.postprocessing.determine_postprocessing`), written to
``<fold folder>/postprocessing.json``; ``hc_predict`` applies it. The validation predictions themselves
are written without postprocessing (the choice is made on them).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError

if TYPE_CHECKING:  # pragma: no cover
    from heartcascade.training.trainer import Trainer

VALIDATION_FOLDER = "validation"


def _raw_dir(trainer: "Trainer") -> Path | None:
    from heartcascade.paths import raw_root

    folder = raw_root() / trainer.pre_dir.name
    return folder if (folder / "labelsTr").is_dir() else None


def run_final_validation(trainer: "Trainer") -> tuple[dict[str, Any] | None, str | None]:
    from heartcascade.inference.postprocessing import POSTPROCESSING_FILE

    out_dir = trainer.output_folder / VALIDATION_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    (trainer.output_folder / POSTPROCESSING_FILE).unlink(missing_ok=True)  # chosen for an earlier model
    for stale in out_dir.iterdir():  # predictions of an earlier run of this fold
        if stale.is_file():
            stale.unlink()
    ids = list(trainer.val_ids)
    if not ids:
        trainer.logger.log("no validation cases: final validation skipped")
        trainer.logger.flush()
        return None, None
    raw = _raw_dir(trainer)
    t0 = time.perf_counter()
    method = None
    if raw is not None:
        try:
            method = predict_with_predictor(trainer, raw, ids, out_dir)
        except ImportError as exc:
            trainer.logger.log(f"predictor not usable ({exc}); validating with the in-memory forward pass")
    if method is None:
        predict_in_memory(trainer, ids, out_dir)
        method = "in-memory"
    summary = None
    if raw is not None:
        from heartcascade.evaluation.evaluate import evaluate_folders

        summary = evaluate_folders(raw / "labelsTr", out_dir, raw / "dataset.json",
                                   output_json=out_dir / "summary.json", progress=False)
        summary["method"] = method
        atomic_write_json(out_dir / "summary.json", summary)
        agg = summary.get("aggregate", {})
        trainer.logger.log(f"final validation ({method}, {len(ids)} cases, {time.perf_counter() - t0:.1f}s): "
                           + _format_aggregate(agg))
        from heartcascade.evaluation.postprocessing import determine_postprocessing

        determine_postprocessing(out_dir, raw / "labelsTr", raw / "dataset.json",
                                 output_json=trainer.output_folder / POSTPROCESSING_FILE, log=trainer.logger.log)
    else:
        summary = evaluate_in_memory(trainer, ids, out_dir)
        summary["method"] = method
        atomic_write_json(out_dir / "summary.json", summary)
        trainer.logger.log(f"final validation (in-memory, no raw labels found, {len(ids)} cases): mean Dice "
                           f"{summary['mean']['dice']:.4f}")
    trainer.logger.flush()
    return summary, method


def _format_aggregate(agg: dict[str, Any]) -> str:
    parts = []
    for name, stats in agg.items():
        dice = (stats.get("dice") or {}).get("mean") if isinstance(stats, dict) else None
        if dice is not None:
            parts.append(f"{name} {dice:.3f}")
    return "Dice " + ", ".join(parts) if parts else "(no aggregate)"


def predict_with_predictor(trainer: "Trainer", raw: Path, ids: list[str], out_dir: Path) -> str:
    """Run the real predictor (final checkpoint of this fold) on the raw validation images."""
    from heartcascade.dataset.dataset_json import load_dataset
    from heartcascade.inference.predictor import Predictor  # ImportError -> in-memory fallback

    info = load_dataset(raw)
    files = []
    for cid in ids:
        paths = [raw / "imagesTr" / f"{cid}_{c:04d}{info.file_ending}" for c in range(info.num_channels)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise ImportError(f"raw image {missing[0]} not found")
        files.append(paths)
    predictor = Predictor.from_model_dir(trainer.output_folder, checkpoint="final", device=str(trainer.device),
                                         configuration=trainer.configuration, postprocessing=None)
    report = predictor.predict_files(files, out_dir, overwrite=True, case_ids=ids)
    if report.failed:
        first = sorted(report.failed.items())[0]
        raise HCError(f"validation prediction failed for {len(report.failed)} case(s), e.g. {first[0]}: {first[1]}")
    return "predictor"


def _predict_case_canonical(trainer: "Trainer", case_id: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Label map of a preprocessed case on its preprocessed (canonical, full-resolution) grid."""
    from heartcascade.preprocessing.resampling import resample_labels
    from heartcascade.preprocessing.storage import load_case
    from heartcascade.training.validation import (net1_coarse_probs, predict_baseline, predict_cascade)

    pc = load_case(trainer.data_dir, case_id, mmap=True)
    props = pc.properties
    cfg = trainer.cfg
    if trainer.configuration == "cascade":
        for net in trainer.networks.values():
            net.eval()
        probs = net1_coarse_probs(trainer.cascade.net1, pc.coarse_image, trainer.device, cfg.amp)
        labels = predict_cascade(trainer.cascade, np.asarray(pc.image), probs, trainer.device, cfg.net2_chunk,
                                 cfg.amp)
    else:
        trainer.baseline.eval()
        case = trainer._to_baseline_grid(trainer_case(pc))
        patch = max(cfg.steps["baseline"].patch_shapes, key=lambda s: int(np.prod(s)))
        small = predict_baseline(trainer.baseline, np.asarray(case.image), patch, trainer.device,
                                 cfg.baseline_divisor, cfg.amp)
        labels = resample_labels(small, tuple(props["shape"]), cfg.num_classes)
    return np.asarray(labels, dtype=np.uint8), props


def trainer_case(pc: Any) -> Any:
    from heartcascade.training.dataloading import TrainCase

    props = pc.properties
    spacing = tuple(float(s) for s in props.get("spacing", (1, 1, 1)))
    seg = pc.seg if pc.seg is not None else np.zeros(pc.image.shape[1:], dtype=np.uint8)
    return TrainCase(case_id=pc.case_id, image=pc.image, seg=seg, spacing=spacing, locations={},
                     extra={"properties": props})


def predict_in_memory(trainer: "Trainer", ids: list[str], out_dir: Path) -> None:
    from heartcascade.dataset.image_io import Geometry, write_array
    from heartcascade.preprocessing.preprocess import restore_to_original

    ending = ".nii.gz"
    if trainer.dataset_json_path.is_file():
        from heartcascade.utils.jsonio import load_json

        ending = str(load_json(trainer.dataset_json_path).get("file_ending", ending))
    for cid in ids:
        labels, props = _predict_case_canonical(trainer, cid)
        zyx = restore_to_original(labels, props)
        write_array(zyx.astype(np.uint8), Geometry.from_dict(props["geometry"]), out_dir / f"{cid}{ending}")


def evaluate_in_memory(trainer: "Trainer", ids: list[str], out_dir: Path) -> dict[str, Any]:
    """Dice / Jaccard per case on the preprocessed grid (used only when no raw labels exist)."""
    from heartcascade.preprocessing.storage import load_case
    from heartcascade.training.validation import dice_per_class

    names = trainer.cfg.class_names
    cases = {}
    for cid in ids:
        labels, _ = _predict_case_canonical(trainer, cid)
        ref = np.asarray(load_case(trainer.data_dir, cid).seg)
        dice = dice_per_class(labels, ref, trainer.cfg.num_classes)
        cases[cid] = {names[c]: {"dice": None if not np.isfinite(dice[c]) else float(dice[c]),
                                 "jaccard": None if not np.isfinite(dice[c]) else float(dice[c] / (2 - dice[c]))}
                      for c in range(1, len(dice))}
    values = [v["dice"] for case in cases.values() for v in case.values() if v["dice"] is not None]
    if not cases:
        raise HCError("no validation cases to evaluate")
    return {"cases": cases, "mean": {"dice": float(np.mean(values)) if values else float("nan")}}
