#!/usr/bin/env python
"""MS-CMRSeg bSSFP: every method trained for the same wall-clock budget on one fixed split, one table.

The product's own commands, so every number can be reproduced by hand: import -> plan and preprocess ->
``hc_train --time-budget`` -> ``hc_predict`` on the held-out cases -> ``hc_evaluate`` -> one table with
Dice, HD95 and ASSD per structure, and the training time. Not part of CI (it trains for tens of
minutes per method); results in documentation/results.md.

Split: cases 21-25 (``MSCMRSeg_021`` .. ``_025``) are the held-out test set and are never seen in
training or model selection; cases 19-20 are the validation cases the trainer monitors (keep-best,
postprocessing); 1-18 train. Methods (``--methods``, run one at a time, in this order):

* ``default``   -- the cascade with the default preset (what ``hc_plan_and_preprocess`` gives)
* ``net1``      -- Net1 alone, from the default run's ``checkpoint_after_step2.pth`` (Net1 after its own
  last step); costs no training of its own
* ``paper_cpu`` -- the paper preset (5x5x5 kernels, no normalisation, Dice only, lr 1e-4) at the CPU
  widths of the default preset
* ``baseline``  -- the 3D U-Net at the plans' baseline spacing
* ``nnunet_2d``, ``nnunet_3d_fullres`` -- nnU-Net v2's default trainer for the same budget
  (``scripts/nnunet_peer_train.py``, run with ``--nnunet-python``, a venv that has nnunetv2)

Usage (from the repository root, in the venv)::

    python scripts/mscmrseg_comparison.py --work mscmrseg_work --budget-minutes 15
    python scripts/mscmrseg_comparison.py --work mscmrseg_work --budget-minutes 60 --methods default --tag 60m
    python scripts/mscmrseg_comparison.py --work w --budget-minutes 15 --methods nnunet_2d --nnunet-python /venv/bin/python

Writes ``WORK/comparison_<tag>.md`` / ``.json`` and prints the table. Re-running reuses the import,
the preprocessing and finished models (``--retrain`` trains again).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

DATASET_ID = 20
PAPER_DATASET_ID = 21  # the same raw images, planned with the paper preset at CPU widths
NAME = "MSCMRSeg"
TEST_CASES = [f"{NAME}_{i:03d}" for i in range(21, 26)]
VAL_CASES = [f"{NAME}_{i:03d}" for i in (19, 20)]
STRUCTURES = ["LV", "Myo", "RV"]
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mscmrseg2019_bssfp"
METHODS = ("default", "net1", "paper_cpu", "baseline", "nnunet_2d", "nnunet_3d_fullres")
LABELS = {"default": "cascade, default preset", "net1": "Net1 alone (after step 2, default run)",
          "paper_cpu": "cascade, paper preset at CPU width", "baseline": "baseline 3D U-Net",
          "nnunet_2d": "nnU-Net v2 2d", "nnunet_3d_fullres": "nnU-Net v2 3d_fullres"}
#: The paper preset's method at the default preset's CPU widths (everything else is the paper's).
PAPER_AT_CPU_WIDTH = {"memory": {"target_gb": 4.0, "usable_fraction": 1.0, "reserve_gb": 0.0},
                      "net1": {"base_features": 8, "max_features": 32, "min_coarse_spacing_mm": 5.0,
                               "max_coarse_spacing_mm": 8.0},
                      "net2": {"base_features": 16, "max_features": 64, "recursions": 1, "k_max": 5},
                      "training": {"num_workers": 1}}


def command(name: str) -> str:
    """A console script of this venv (beside the running interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run one command, echo it, append its output to ``log``; returns (seconds, stdout). Stops on failure."""
    shown = " ".join(args)
    print(f"$ {shown}", flush=True)
    t = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seconds = time.perf_counter() - t
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {shown}\n{proc.stdout}")
    if proc.returncode != 0:
        sys.exit(f"error: '{shown}' failed with exit code {proc.returncode}; see {log}")
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds, proc.stdout


def link_cases(src: Path, dst: Path, suffix: str) -> None:
    """Symlink the test cases' files (read-only inputs stay where they are)."""
    dst.mkdir(parents=True, exist_ok=True)
    for case in TEST_CASES:
        target = dst / f"{case}{suffix}"
        if not target.exists():
            target.symlink_to(src / f"{case}{suffix}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the mscmrseg2019_bssfp folder")
    parser.add_argument("--work", type=Path, default=Path("mscmrseg_work"), help="everything is written here")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="training wall time of every method")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--tag", default=None, help="name of this comparison's outputs (default: the budget)")
    parser.add_argument("--nnunet-python", default=None, help="python of a venv with nnunetv2 (for nnunet_*)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--retrain", action="store_true", help="train again even where a model exists")
    parser.add_argument("--plans-override", default=None,
                        help="JSON passed to hc_train --plans-override for the cascade methods (an ablation; "
                             "give it its own --tag)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not (args.data / "image_1.nii.gz").is_file():
        sys.exit(f"error: {args.data}: MS-CMRSeg bSSFP files (image_N.nii.gz, label_N.nii.gz) not found")
    tag = args.tag or f"{args.budget_minutes:g}m"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var, sub in (("HC_RAW", "raw"), ("HC_PREPROCESSED", "preprocessed"), ("HC_RESULTS", f"results_{tag}")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(exist_ok=True)
    log = work / f"commands_{tag}.log"
    budget = f"{args.budget_minutes * 60:.0f}s"
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"
    results = Path(os.environ["HC_RESULTS"])
    seconds: dict[str, float] = {}

    if not (raw / "dataset.json").is_file():
        run([command("hc_import"), "-i", str(args.data), "-d", str(DATASET_ID), "--images", "image_*.nii.gz",
             "--labels", "label_*.nii.gz", "--codes", "200:Myo,500:LV,600:RV", "--modality", "mr", "--name", NAME], log)
    run([command("hc_plan_and_preprocess"), "-d", str(DATASET_ID), "--preset", "default", "--machine", "cpu",
         "--no-progress"], log)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    missing = sorted(set(TEST_CASES + VAL_CASES) - set(cases))
    if missing:
        sys.exit(f"error: {raw}: expected cases {', '.join(missing)} (25 MS-CMRSeg cases)")
    train = [c for c in cases if c not in TEST_CASES and c not in VAL_CASES]
    splits = work / "splits_heldout.json"
    splits.write_text(json.dumps([{"train": train, "val": VAL_CASES}], indent=2))
    images, labels = work / "test" / "images", work / "test" / "labels"
    link_cases(raw / "imagesTr", images, "_0000.nii.gz")
    link_cases(raw / "labelsTr", labels, ".nii.gz")

    def hc_train(dataset: int, config: str) -> None:
        final = results / f"Dataset{dataset:03d}_{NAME}" / config / "fold_0" / "checkpoint_final.pth"
        if final.is_file() and not args.retrain:
            print(f"reusing {final}")
            return
        override = ["--plans-override", args.plans_override] if args.plans_override and config == "cascade" else []
        seconds[f"train_{config}_{dataset}"], _ = run(
            [command("hc_train"), str(dataset), "0", "-c", config, "--splits", str(splits), "--time-budget", budget,
             "--device", args.device, "--quiet", *override], log)

    def hc_predict(key: str, dataset: int, config: str, extra: list[str]) -> Path:
        pred = work / f"predictions_{tag}" / key
        seconds[f"predict_{key}"], _ = run([command("hc_predict"), "-i", str(images), "-o", str(pred), "-d",
                                            str(dataset), "-c", config, "-f", "0", "--device", args.device,
                                            "--overwrite", "--quiet", *extra], log)
        return pred

    predictions: dict[str, Path] = {}
    for method in methods:
        if method in ("default", "net1"):
            hc_train(DATASET_ID, "cascade")
            extra = ["--net1-only", "-chk", "checkpoint_after_step2.pth"] if method == "net1" else []
            predictions[method] = hc_predict(method, DATASET_ID, "cascade", extra)
        elif method == "baseline":
            hc_train(DATASET_ID, "baseline")
            predictions[method] = hc_predict(method, DATASET_ID, "baseline", [])
        elif method == "paper_cpu":
            praw = work / "raw" / f"Dataset{PAPER_DATASET_ID:03d}_{NAME}"
            if not praw.exists():
                praw.symlink_to(raw, target_is_directory=True)
            preset = work / "paper_cpu.json"
            paper = json.loads((REPO / "plans" / "paper.json").read_text())
            preset.write_text(json.dumps(_merge(paper, {**PAPER_AT_CPU_WIDTH, "name": "paper_cpu"}), indent=2))
            run([command("hc_plan_and_preprocess"), "-d", str(PAPER_DATASET_ID), "--preset", str(preset),
                 "--machine", "cpu", "--no-progress"], log)
            hc_train(PAPER_DATASET_ID, "cascade")
            predictions[method] = hc_predict(method, PAPER_DATASET_ID, "cascade", [])
        else:
            if not args.nnunet_python:
                print(f"skipping {method}: no --nnunet-python")
                continue
            configuration = method[len("nnunet_"):]
            pred = work / f"predictions_{tag}" / method
            if (work / f"nnunet_{tag}" / f"{method}.json").is_file() and pred.is_dir() and not args.retrain:
                print(f"reusing {pred}")
                predictions[method] = pred
                continue
            _, stdout = run([args.nnunet_python, str(REPO / "scripts" / "nnunet_peer_train.py"), "--raw", str(work / "raw"),
                          "--preprocessed", str(work / "nnunet_preprocessed"), "--results", str(work / f"nnunet_{tag}"),
                          "-d", str(DATASET_ID), "-c", configuration, "--split", str(splits), "--budget-minutes",
                          f"{args.budget_minutes:g}", "--predict-input", str(images), "--predict-output", str(pred)], log)
            figures = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
            (work / f"nnunet_{tag}" / f"{method}.json").write_text(json.dumps(figures, indent=2))
            predictions[method] = pred

    summaries = {}
    for method, pred in predictions.items():
        out = work / f"evaluation_{tag}" / f"{method}.json"
        out.parent.mkdir(exist_ok=True)
        run([command("hc_evaluate"), "-ref", str(labels), "-pred", str(pred), "-d", str(DATASET_ID), "-o", str(out),
             "--quiet"], log)
        summaries[method] = json.loads(out.read_text())

    train_seconds = {m: _train_seconds(results, m, work / f"nnunet_{tag}") for m in summaries}
    table = comparison_table(summaries, train_seconds)
    report = {"budget_minutes": args.budget_minutes, "test_cases": TEST_CASES, "val_cases": VAL_CASES,
              "train_cases": train, "seconds": {k: v if isinstance(v, float) else str(v) for k, v in seconds.items()},
              "train_seconds": train_seconds,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "metrics": {m: {s: s_metrics(summaries[m], s) for s in STRUCTURES + ["whole_heart"]} for m in summaries}}
    (work / f"comparison_{tag}.json").write_text(json.dumps(report, indent=2))
    (work / f"comparison_{tag}.md").write_text(table + "\n")
    print()
    print(table)
    return 0


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _train_seconds(results: Path, method: str, nnunet_dir: Path) -> float | None:
    """Wall time of the training run from its log (first to last line), or nnU-Net's figures file."""
    if method.startswith("nnunet_"):
        figures = nnunet_dir / f"{method}.json"
        return json.loads(figures.read_text())["train_s"] if figures.is_file() else None
    folder = {"default": (DATASET_ID, "cascade"), "net1": (DATASET_ID, "cascade"), "baseline": (DATASET_ID, "baseline"),
              "paper_cpu": (PAPER_DATASET_ID, "cascade")}.get(method)
    if folder is None:
        return None
    log = results / f"Dataset{folder[0]:03d}_{NAME}" / folder[1] / "fold_0" / "training_log.txt"
    if not log.is_file():
        return None
    from datetime import datetime

    stamps = [line[:19] for line in log.read_text().splitlines() if line[:4].isdigit()]
    first, last = (datetime.strptime(s, "%Y-%m-%d %H:%M:%S") for s in (stamps[0], stamps[-1]))
    return (last - first).total_seconds()


def s_metrics(summary: dict, structure: str) -> dict[str, float | None]:
    agg = summary["aggregate"].get(structure, {})
    return {m: (agg.get(m) or {}).get("mean") for m in ("dice", "jaccard", "assd", "hd95")}


def comparison_table(summaries: dict[str, dict], train_seconds: dict[str, float | None]) -> str:
    """Rows: method; columns: Dice per structure and their mean, Myo/mean HD95, mean ASSD, training time."""
    head = ("| method | LV Dice | Myo Dice | RV Dice | mean Dice | mean HD95 (mm) | mean ASSD (mm) | "
            "whole-heart Dice | training (s) |")
    rows = [head, "|---" * 9 + "|"]
    for method, summary in summaries.items():
        m = {s: s_metrics(summary, s) for s in STRUCTURES + ["whole_heart"]}

        def mean(metric: str) -> float | None:
            values = [m[s][metric] for s in STRUCTURES if m[s][metric] is not None]
            return sum(values) / len(values) if values else None

        t = train_seconds.get(method)
        rows.append(f"| {LABELS.get(method, method)} | " + " | ".join(
            [_fmt(m[s]["dice"], 3) for s in STRUCTURES] + [_fmt(mean("dice"), 3), _fmt(mean("hd95"), 1),
                                                          _fmt(mean("assd"), 2), _fmt(m["whole_heart"]["dice"], 3),
                                                          "—" if t is None else f"{t:.0f}"]) + " |")
    return "\n".join(rows)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
