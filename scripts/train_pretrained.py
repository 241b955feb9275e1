#!/usr/bin/env python
"""Rebuild the pretrained cine-MR model shipped in heartcascade/pretrained/ (and its model card).

The product's own commands, end to end, so the shipped file can be reproduced by hand:

1. ``hc_import`` MS-CMRSeg bSSFP cases 1-25 (``../shared/data/mscmrseg2019_bssfp``; codes 200 Myo, 500 LV,
   600 RV, as scripts/mscmrseg_comparison.py imports them);
2. ``hc_plan_and_preprocess --preset default --machine cpu`` (plus ``--plans-override`` at training);
3. ``hc_train DATASET all --time-budget BUDGET`` (every case, no validation split);
4. ``hc_export_model -f all`` and a copy to ``heartcascade/pretrained/cine_mr_lv_myo_rv.zip``;
5. the model card ``cine_mr_lv_myo_rv.json`` updated with what this run measured:

   * ``--measure-heldout``: the same recipe trained once more on cases 1-20 only, scored on 21-25
     (unseen scans of the same centre); costs a second training of the same budget;
   * ``--cross-centre DIR`` (default ``../shared/data/acdc_crosscentre`` when present): the shipped model
     scored on another centre's scans. They are only predicted and evaluated, never trained on.

Usage (from the repository root, in the venv)::

    python scripts/train_pretrained.py --work pretrained_work                    # 60 minutes
    python scripts/train_pretrained.py --work w --budget 60m --measure-heldout --plans-override recipe.json
    python scripts/train_pretrained.py --work w --measure-heldout --together     # both trainings at once
    python scripts/train_pretrained.py --work w --dry-run                        # print the commands only

Re-running reuses the import and the preprocessing; ``--retrain`` trains again.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
NAME = "MSCMRSeg"
DATASET_ID = 30
HELDOUT = [f"{NAME}_{i:03d}" for i in range(21, 26)]
STRUCTURES = ("LV", "Myo", "RV")
MODEL_NAME = "cine_mr_lv_myo_rv"
PACKAGE_DIR = REPO / "heartcascade" / "pretrained"


def command(name: str) -> str:
    """A console script beside the running interpreter (this venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Runner:
    """Runs (or, dry, only prints) the commands, logging their output to ``WORK/commands.log``."""

    def __init__(self, work: Path, dry: bool) -> None:
        self.log, self.dry = work / "commands.log", dry

    def __call__(self, args: list[str]) -> float:
        return self.together([args])[0]

    def together(self, commands: list[list[str]]) -> list[float]:
        """Run the commands at the same time (one process each); their seconds, in order."""
        shown = [" ".join(str(a) for a in args) for args in commands]
        for line in shown:
            print(f"$ {line}", flush=True)
        if self.dry:
            return [0.0] * len(commands)
        started = time.perf_counter()
        # Several at once share the cores: one torch thread each, or their OpenMP threads spin against each
        # other (two 2-thread trainings on 2 cores ran step 1 at 1.0 s/it instead of 0.34 s/it).
        env = dict(os.environ, OMP_NUM_THREADS="1") if len(commands) > 1 else None
        procs = [subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=env) for args in commands]
        seconds = []
        for line, proc in zip(shown, procs):
            output, _ = proc.communicate()
            seconds.append(time.perf_counter() - started)
            with self.log.open("a", encoding="utf-8") as out:
                out.write(f"\n$ {line}\n{output}")
            if proc.returncode != 0:
                for other in procs:  # the others would go on running (and holding their folds) for nothing
                    if other.poll() is None:
                        other.terminate()
                sys.exit(f"error: '{line}' failed with exit code {proc.returncode}; see {self.log}")
            print(f"  ({seconds[-1]:.0f} s) {line}", flush=True)
        return seconds


def link(files: dict[str, Path], folder: Path) -> Path:
    """Symlink ``{name: source}`` into ``folder`` (inputs stay where they are, read-only)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = folder / name
        if not target.exists():
            target.symlink_to(source.resolve())
    return folder


def mean_dice(summary_path: Path) -> dict[str, float | None]:
    """Mean Dice per structure (and their mean) from an hc_evaluate summary.json."""
    aggregate = json.loads(summary_path.read_text())["aggregate"]
    dice = {s: (aggregate.get(s, {}).get("dice") or {}).get("mean") for s in STRUCTURES}
    values = [v for v in dice.values() if v is not None]
    dice["mean"] = sum(values) / len(values) if values else None
    return {k: None if v is None else round(float(v), 4) for k, v in dice.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DATA / "mscmrseg2019_bssfp", help="the mscmrseg2019_bssfp folder")
    parser.add_argument("--work", type=Path, default=Path("pretrained_work"), help="everything is written here")
    parser.add_argument("--budget", default="60m", help="hc_train --time-budget of the model (default 60m)")
    parser.add_argument("--plans-override", default=None, help="JSON (or a file) for hc_train --plans-override: "
                                                               "the recipe, recorded in the card")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--measure-heldout", action="store_true",
                        help="also train on cases 1-20 with the same recipe and score cases 21-25 (a second training)")
    parser.add_argument("--cross-centre", type=Path, default=DATA / "acdc_crosscentre",
                        help="other-centre scans to score the model on (never trained on); skipped when absent")
    parser.add_argument("--output-dir", type=Path, default=PACKAGE_DIR, help="where the zip and card go")
    parser.add_argument("--together", action="store_true",
                        help="with --measure-heldout: run both trainings at the same time (each gets half the "
                             "CPU of a 2-core machine; the card records it)")
    parser.add_argument("--retrain", action="store_true", help="train again even where a model exists")
    parser.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    args = parser.parse_args()
    if not args.dry_run and not (args.data / "image_1.nii.gz").is_file():
        sys.exit(f"error: {args.data}: MS-CMRSeg bSSFP files (image_N.nii.gz, label_N.nii.gz) not found")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var, sub in (("HC_RAW", "raw"), ("HC_PREPROCESSED", "preprocessed"), ("HC_RESULTS", "results")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(exist_ok=True)
    run = Runner(work, args.dry_run)
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"
    results = work / "results" / raw.name / "cascade"
    override = ["--plans-override", args.plans_override] if args.plans_override else []
    train_common = ["--time-budget", args.budget, "--device", args.device, "--quiet", *override]

    if not (raw / "dataset.json").is_file():
        run([command("hc_import"), "-i", args.data, "-d", DATASET_ID, "--images", "image_*.nii.gz", "--labels",
             "label_*.nii.gz", "--codes", "200:Myo,500:LV,600:RV", "--modality", "mr", "--name", NAME])
    run([command("hc_plan_and_preprocess"), "-d", DATASET_ID, "--preset", "default", "--machine", "cpu",
         "--no-progress"])

    trainings = {}  # fold -> hc_train command, for the folds still to train
    if args.retrain or not (results / "fold_all" / "checkpoint_final.pth").is_file():
        trainings["all"] = [command("hc_train"), DATASET_ID, "all", "--no-validation", *train_common]
    if args.measure_heldout:
        cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz")) or \
            [f"{NAME}_{i:03d}" for i in range(1, 26)]
        splits = work / "splits_heldout.json"
        splits.write_text(json.dumps([{"train": [c for c in cases if c not in HELDOUT], "val": []}]))
        if args.retrain or not (results / "fold_0" / "checkpoint_final.pth").is_file():
            trainings["0"] = [command("hc_train"), DATASET_ID, "0", "--splits", splits, "--no-validation", *train_common]
    if args.together:
        seconds = dict(zip(trainings, run.together(list(trainings.values()))))
    else:
        seconds = {fold: run(cmd) for fold, cmd in trainings.items()}
    archive = work / f"{MODEL_NAME}.zip"
    run([command("hc_export_model"), "-d", DATASET_ID, "-c", "cascade", "-f", "all", "-o", archive])

    train_seconds = seconds.get("all")
    measured: dict[str, object] = {"training_seconds": None if train_seconds is None else round(train_seconds),
                                   "budget": args.budget, "device": args.device, "cpus": os.cpu_count(),
                                   "trained_together": bool(args.together and len(trainings) > 1)}
    if args.measure_heldout:
        images = link({f"{c}_0000.nii.gz": raw / "imagesTr" / f"{c}_0000.nii.gz" for c in HELDOUT}, work / "heldout" / "images")
        labels = link({f"{c}.nii.gz": raw / "labelsTr" / f"{c}.nii.gz" for c in HELDOUT}, work / "heldout" / "labels")
        run([command("hc_predict"), "-i", images, "-o", work / "heldout" / "pred", "-d", DATASET_ID, "-f", "0",
             "--device", args.device, "--overwrite", "--quiet"])
        run([command("hc_evaluate"), "-ref", labels, "-pred", work / "heldout" / "pred", "-d", DATASET_ID,
             "-o", work / "heldout" / "summary.json", "--quiet"])
        if not args.dry_run:
            measured["dice_unseen_same_centre"] = {
                **mean_dice(work / "heldout" / "summary.json"),
                "cases": "MS-CMRSeg 21-25, model of the same recipe trained on 1-20 only"}
    if args.cross_centre.is_dir():
        found = sorted(args.cross_centre.glob("image_*.nii.gz"))
        images = link({p.name.replace(".nii.gz", "_0000.nii.gz"): p for p in found}, work / "cross" / "images")
        labels = link({p.name: p.with_name(p.name.replace("image_", "label_", 1)) for p in found},
                      work / "cross" / "labels")
        run([command("hc_predict"), "-i", images, "-o", work / "cross" / "pred", "-m", archive, "--device",
             args.device, "--overwrite", "--quiet"])
        run([command("hc_evaluate"), "-ref", labels, "-pred", work / "cross" / "pred", "-d", DATASET_ID,
             "-o", work / "cross" / "summary.json", "--quiet"])
        if not args.dry_run:
            measured["dice_other_centre"] = {**mean_dice(work / "cross" / "summary.json"),
                                             "cases": f"{len(found)} volumes of {args.cross_centre.name} (evaluated only)"}
    if args.dry_run:
        print(f"(dry run: would copy {archive} and update the card in {args.output_dir})")
        return 0

    args.output_dir.mkdir(parents=True, exist_ok=True)
    target = args.output_dir / f"{MODEL_NAME}.zip"
    shutil.copy2(archive, target)
    card_path = args.output_dir / f"{MODEL_NAME}.json"
    template = PACKAGE_DIR / f"{MODEL_NAME}.json"
    card = json.loads((card_path if card_path.is_file() else template).read_text())
    card["recipe"] = (f"scripts/train_pretrained.py --budget {args.budget}"
                      + (f" --plans-override {args.plans_override}" if args.plans_override else "")
                      + ": hc_import, hc_plan_and_preprocess --preset default --machine cpu, hc_train "
                        f"{DATASET_ID} all --time-budget {args.budget}, hc_export_model -f all")
    if not trainings:  # a re-export of models trained before: their training figures stay
        earlier = card.get("measured") or {}
        measured.update({k: earlier.get(k) for k in ("training_seconds", "trained_together", "budget", "cpus")})
    card["measured"] = {**measured, "how": f"scripts/train_pretrained.py on {time.strftime('%Y-%m-%d')}"}
    card["size_bytes"] = target.stat().st_size
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {target} ({target.stat().st_size / 2**20:.2f} MiB) and {card_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
