#!/usr/bin/env python
"""MS-CMRSeg bSSFP: 5-fold cross-validation of the default cascade, and what averaging the folds adds.

Cases 21-25 stay the held-out test set (as in ``mscmrseg_comparison.py``, whose import and
preprocessing this reuses); the 20 others are split into folds with the product's own seeded k-fold
rule. Each fold is trained with ``hc_train --time-budget``; then

* the cross-validation Dice: every case of 1-20 predicted by the fold that did not train on it (the
  folds' ``validation/`` outputs, pooled and scored with ``hc_evaluate``);
* ``hc_determine_postprocessing`` over the pooled validation predictions;
* the test cases predicted by each fold alone and by the average of all folds (``hc_predict -f 0 1 2
  3 4``), each scored with ``hc_evaluate``.

Not part of CI (minutes per fold). Usage, from the repository root in the venv::

    python scripts/mscmrseg_cv.py --work mscmrseg_work --budget-minutes 6

Writes ``WORK/cv_<tag>.md`` / ``.json`` and prints both tables.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mscmrseg_comparison import (DATASET_ID, DEFAULT_DATA, NAME, STRUCTURES, TEST_CASES, _fmt, command, run,
                                 s_metrics)

from heartcascade.training.splits import make_kfold_splits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the mscmrseg2019_bssfp folder")
    parser.add_argument("--work", type=Path, default=Path("mscmrseg_work"),
                        help="the comparison's work folder (import and preprocessing are reused)")
    parser.add_argument("--budget-minutes", type=float, default=6.0, help="training wall time of each fold")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--tag", default=None, help="name of the outputs (default: cv<budget>m)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    tag = args.tag or f"cv{args.budget_minutes:g}m"
    work = args.work.resolve()
    for var, sub in (("HC_RAW", "raw"), ("HC_PREPROCESSED", "preprocessed"), ("HC_RESULTS", f"results_{tag}")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(parents=True, exist_ok=True)
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"
    if not (raw / "dataset.json").is_file():
        sys.exit(f"error: {raw}: not imported; run scripts/mscmrseg_comparison.py --work {work} first")
    log = work / f"commands_{tag}.log"
    run([command("hc_plan_and_preprocess"), "-d", str(DATASET_ID), "--preset", "default", "--machine", "cpu",
         "--no-progress"], log)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    pool = [c for c in cases if c not in TEST_CASES]
    splits = work / f"splits_{tag}.json"
    splits.write_text(json.dumps(make_kfold_splits(pool, args.folds), indent=2))
    model = Path(os.environ["HC_RESULTS"]) / f"Dataset{DATASET_ID:03d}_{NAME}" / "cascade"
    folds = [str(f) for f in range(args.folds)]
    train_s: dict[str, float] = {}
    for fold in folds:
        if (model / f"fold_{fold}" / "checkpoint_final.pth").is_file():
            print(f"reusing fold {fold}")
            continue
        train_s[fold], _ = run([command("hc_train"), str(DATASET_ID), fold, "-c", "cascade", "--splits", str(splits),
                                "--time-budget", f"{args.budget_minutes * 60:.0f}s", "--device", args.device,
                                "--quiet"], log)

    # Cross-validation: each case of the pool as predicted by the fold that held it out.
    pooled = work / f"predictions_{tag}" / "cross_validation"
    pooled.mkdir(parents=True, exist_ok=True)
    for fold in folds:
        for pred in (model / f"fold_{fold}" / "validation").glob("*.nii.gz"):
            target = pooled / pred.name
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(pred)
    run([command("hc_determine_postprocessing"), "-d", str(DATASET_ID), "-c", "cascade", "--quiet"], log)
    evaluations = {"cross_validation": evaluate(work, tag, "cross_validation", pooled, raw / "labelsTr", log)}

    images, labels = work / "test" / "images", work / "test" / "labels"
    if not images.is_dir():
        sys.exit(f"error: {images}: no test images; run scripts/mscmrseg_comparison.py --work {work} first")
    for name, fold_args in [(f"fold_{f}", [f]) for f in folds] + [("ensemble", folds)]:
        pred = work / f"predictions_{tag}" / name
        run([command("hc_predict"), "-i", str(images), "-o", str(pred), "-d", str(DATASET_ID), "-c", "cascade",
             "-f", *fold_args, "--device", args.device, "--overwrite", "--quiet"], log)
        evaluations[name] = evaluate(work, tag, name, pred, labels, log)

    single = [evaluations[f"fold_{f}"] for f in folds]
    report = {"budget_minutes_per_fold": args.budget_minutes, "folds": args.folds, "train_seconds": train_s,
              "splits": str(splits), "test_cases": TEST_CASES,
              "metrics": {k: {s: s_metrics(v, s) for s in STRUCTURES + ["whole_heart"]} for k, v in evaluations.items()},
              "postprocessing": json.loads((model / "postprocessing.json").read_text())}
    rows = {"cross-validation (cases 1-20, each by its held-out fold)": evaluations["cross_validation"]}
    rows.update({f"test 21-25, fold {f} alone": evaluations[f"fold_{f}"] for f in folds})
    rows["test 21-25, average of the folds' Dice"] = _mean_summary(single)
    rows[f"test 21-25, {args.folds}-fold ensemble (hc_predict -f {' '.join(folds)})"] = evaluations["ensemble"]
    table = dice_table(rows)
    (work / f"cv_{tag}.json").write_text(json.dumps(report, indent=2))
    (work / f"cv_{tag}.md").write_text(table + "\n")
    print()
    print(table)
    return 0


def evaluate(work: Path, tag: str, name: str, pred: Path, labels: Path, log: Path) -> dict:
    """``hc_evaluate`` of one prediction folder; its summary."""
    out = work / f"evaluation_{tag}" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    run([command("hc_evaluate"), "-ref", str(labels), "-pred", str(pred), "-d", str(DATASET_ID), "-o", str(out),
         "--quiet"], log)
    return json.loads(out.read_text())


def _mean_summary(summaries: list[dict]) -> dict:
    """A summary whose per-structure means are the averages of several summaries' means."""
    agg: dict[str, dict] = {}
    for s in STRUCTURES + ["whole_heart"]:
        agg[s] = {}
        for metric in ("dice", "jaccard", "assd", "hd95"):
            values = [s_metrics(x, s)[metric] for x in summaries]
            values = [v for v in values if v is not None]
            agg[s][metric] = {"mean": sum(values) / len(values) if values else None}
    return {"aggregate": agg}


def dice_table(rows: dict[str, dict]) -> str:
    """Rows: what was predicted; columns: Dice per structure, their mean, mean HD95."""
    lines = ["| predictions | LV Dice | Myo Dice | RV Dice | mean Dice | mean HD95 (mm) |", "|---" * 6 + "|"]
    for label, summary in rows.items():
        m = {s: s_metrics(summary, s) for s in STRUCTURES}
        dice = [m[s]["dice"] for s in STRUCTURES]
        hd = [m[s]["hd95"] for s in STRUCTURES if m[s]["hd95"] is not None]
        mean = sum(dice) / len(dice) if None not in dice else None
        lines.append(f"| {label} | " + " | ".join([_fmt(d, 3) for d in dice] + [
            _fmt(mean, 3), _fmt(sum(hd) / len(hd) if hd else None, 1)]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
