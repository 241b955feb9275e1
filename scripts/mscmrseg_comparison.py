#!/usr/bin/env python
"""MS-CMRSeg bSSFP: the cascade (Net2) vs Net1 alone vs the baseline 3D U-Net on a fixed held-out split.

The paper's Table 2/3 comparison, run with the product's own commands so that every number can be
reproduced by hand: import -> plan and preprocess -> train the cascade and the baseline on the same
training cases -> predict the held-out cases three ways -> evaluate -> one table. Not part of CI
(it trains for tens of minutes); documented in documentation/results.md.

Split: cases 21-25 (``MSCMRSeg_021`` .. ``_025``) are the held-out test set and are never seen in
training; cases 19-20 are the validation cases the trainer monitors; 1-18 train. Every network uses
its *final* checkpoint, so the test cases influence nothing.

Usage (from the repository root, in the venv)::

    python scripts/mscmrseg_comparison.py --work mscmrseg_work
    python scripts/mscmrseg_comparison.py --work mscmrseg_work --budget quick   # a few minutes, smoke run

Writes ``WORK/comparison.md`` and ``WORK/comparison.json`` and prints the table. Re-running reuses
the import, the preprocessing and finished models.
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
NAME = "MSCMRSeg"
TEST_CASES = [f"{NAME}_{i:03d}" for i in range(21, 26)]
VAL_CASES = [f"{NAME}_{i:03d}" for i in (19, 20)]
STRUCTURES = ["LV", "Myo", "RV"]
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mscmrseg2019_bssfp"

#: Training schedules (plans overrides on top of the cpu preset): "cpu" is the documented run,
#: "quick" only checks that the script works end to end.
BUDGETS = {
    "cpu": {},
    "quick": {"training": {"steps": [{"step": s, "epochs": 1, "iterations_per_epoch": 3} for s in (1, 2, 3, 4)]},
              "baseline_unet": {"epochs": 1, "iterations_per_epoch": 3}},
}


def command(name: str) -> str:
    """A console script of this venv (beside the running interpreter), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def run(args: list[str], log: Path) -> float:
    """Run one command, echo it, append its output to ``log``; returns seconds. Stops on failure."""
    shown = " ".join(args)
    print(f"$ {shown}", flush=True)
    t = time.perf_counter()
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {shown}\n")
        out.flush()
        code = subprocess.call(args, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t
    if code != 0:
        sys.exit(f"error: '{shown}' failed with exit code {code}; see {log}")
    print(f"  ({seconds:.0f} s)", flush=True)
    return seconds


def link_cases(src: Path, dst: Path, suffixes: dict[str, str]) -> None:
    """Symlink the test cases' files (read-only inputs stay where they are)."""
    dst.mkdir(parents=True, exist_ok=True)
    for case in TEST_CASES:
        for suffix_in, suffix_out in suffixes.items():
            target = dst / f"{case}{suffix_out}"
            if not target.exists():
                target.symlink_to(src / f"{case}{suffix_in}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the mscmrseg2019_bssfp folder")
    parser.add_argument("--work", type=Path, default=Path("mscmrseg_work"), help="everything is written here")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--preset", default=str(REPO / "plans" / "cpu.json"), help="planner preset")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not (args.data / "image_1.nii.gz").is_file():
        sys.exit(f"error: {args.data}: MS-CMRSeg bSSFP files (image_N.nii.gz, label_N.nii.gz) not found")
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var, sub in (("HC_RAW", "raw"), ("HC_PREPROCESSED", "preprocessed"), ("HC_RESULTS", "results")):
        os.environ[var] = str(work / sub)
        (work / sub).mkdir(exist_ok=True)
    log = work / "commands.log"
    seconds: dict[str, float] = {}
    raw = work / "raw" / f"Dataset{DATASET_ID:03d}_{NAME}"

    if not (raw / "dataset.json").is_file():
        seconds["import"] = run([command("hc_import"), "-i", str(args.data), "-d", str(DATASET_ID),
                                 "--images", "image_*.nii.gz", "--labels", "label_*.nii.gz",
                                 "--codes", "200:Myo,500:LV,600:RV", "--modality", "mr", "--name", NAME], log)
    seconds["plan_and_preprocess"] = run([command("hc_plan_and_preprocess"), "-d", str(DATASET_ID),
                                          "--preset", args.preset, "--no-progress"], log)

    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    missing = sorted(set(TEST_CASES + VAL_CASES) - set(cases))
    if missing:
        sys.exit(f"error: {raw}: expected cases {', '.join(missing)} (25 MS-CMRSeg cases)")
    train = [c for c in cases if c not in TEST_CASES and c not in VAL_CASES]
    splits = work / "splits_heldout.json"
    splits.write_text(json.dumps([{"train": train, "val": VAL_CASES}], indent=2))
    override = work / f"override_{args.budget}.json"
    override.write_text(json.dumps(BUDGETS[args.budget]))

    results = work / "results" / f"Dataset{DATASET_ID:03d}_{NAME}"
    for config in ("cascade", "baseline"):
        final = results / config / "fold_0" / "checkpoint_final.pth"
        if final.is_file() and args.budget == "cpu":
            print(f"reusing {final}")
            continue
        seconds[f"train_{config}"] = run([command("hc_train"), str(DATASET_ID), "0", "-c", config, "--splits", str(splits),
                                          "--plans-override", str(override), "--device", args.device,
                                          "--no-validation", "--quiet"], log)

    images, labels = work / "test" / "images", work / "test" / "labels"
    link_cases(raw / "imagesTr", images, {"_0000.nii.gz": "_0000.nii.gz"})
    link_cases(raw / "labelsTr", labels, {".nii.gz": ".nii.gz"})
    methods = {"cascade (Net2)": ("cascade", []), "Net1 alone": ("cascade", ["--net1-only"]),
               "baseline 3D U-Net": ("baseline", [])}
    summaries = {}
    for method, (config, extra) in methods.items():
        key = method.split()[0].lower()
        pred = work / "predictions" / key
        seconds[f"predict_{key}"] = run([command("hc_predict"), "-i", str(images), "-o", str(pred), "-d", str(DATASET_ID),
                                         "-c", config, "-f", "0", "--device", args.device, "--overwrite", "--quiet",
                                         *extra], log)
        out = work / "evaluation" / f"{key}.json"
        run([command("hc_evaluate"), "-ref", str(labels), "-pred", str(pred), "-d", str(DATASET_ID), "-o", str(out),
             "--quiet"], log)
        summaries[method] = json.loads(out.read_text())

    table = comparison_table(summaries)
    report = {"budget": args.budget, "test_cases": TEST_CASES, "val_cases": VAL_CASES, "train_cases": train,
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "metrics": {m: {s: s_metrics(summaries[m], s) for s in STRUCTURES + ["whole_heart"]} for m in summaries}}
    (work / "comparison.json").write_text(json.dumps(report, indent=2))
    (work / "comparison.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nseconds: {report['seconds']}")
    return 0


def s_metrics(summary: dict, structure: str) -> dict[str, float | None]:
    agg = summary["aggregate"].get(structure, {})
    return {m: (agg.get(m) or {}).get("mean") for m in ("dice", "jaccard", "assd")}


def comparison_table(summaries: dict[str, dict]) -> str:
    """Rows: method; columns: Dice / Jaccard / ASSD (mm) per structure and the whole heart (means)."""
    names = STRUCTURES + ["whole_heart"]
    head = "| method | " + " | ".join(f"{n} Dice | {n} Jaccard | {n} ASSD" for n in names) + " |"
    rows = [head, "|---" * (1 + 3 * len(names)) + "|"]
    for method, summary in summaries.items():
        cells = []
        for n in names:
            m = s_metrics(summary, n)
            cells += [_fmt(m["dice"], 3), _fmt(m["jaccard"], 3), _fmt(m["assd"], 2)]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
