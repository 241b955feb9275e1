#!/usr/bin/env python
"""Per-volume failure table of a trained model on labelled scans (e.g. another centre's cine MR).

For every image/label pair of an imported raw dataset (``hc_import``; labels as training labels) it
records ROI recall (fraction of the reference heart inside the ROI Net2 runs on), Net1's Dice, the
cascade's Dice, and how the image differs after preprocessing (field of view, heart size and position,
normalised intensities): :func:`heartcascade.evaluation.diagnostics.case_diagnostics`. Prints a markdown
table (worst volumes first) and a summary line, and writes the JSON beside it.

Usage (in the venv, HC_* roots set)::

    python scripts/crosscentre_report.py -m $HC_RESULTS/Dataset030_MSCMRSeg/cascade -f all \\
        --data $HC_RAW/Dataset040_ACDCcc -o acdc_report.json [--tta] [--cases 'ACDCcc_patient0*']

Not part of CI (it needs a trained model); results in documentation/results.md.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

from heartcascade.cli.common import run_cli
from heartcascade.dataset.dataset_json import load_dataset
from heartcascade.evaluation.diagnostics import case_diagnostics
from heartcascade.inference.predictor import Predictor
from heartcascade.inference.roi import HeartComponentRoi, WholeVolumeRoi
from heartcascade.utils.atomic import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", required=True, help="model folder (configuration folder or fold folder)")
    p.add_argument("-f", "--folds", nargs="+", default=None, help="folds to use (default: all available)")
    p.add_argument("--data", required=True, help="raw dataset folder (imagesTr/, labelsTr/, dataset.json)")
    p.add_argument("--cases", nargs="+", default=["*"], help="case-id wildcards (default: every case)")
    p.add_argument("--tta", action="store_true", default=None, help="mirroring test-time augmentation on")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="off (default: the model's plans)")
    p.add_argument("--quarter-turns", action="store_true",
                   help="with test-time augmentation, also the in-plane quarter turns (inference.tta_quarter_turns; "
                        "the model must have been trained rotated in-plane by >= 90 degrees)")
    p.add_argument("--roi-centre-sigma", type=float, default=None,
                   help="try the heart-component ROI rule with this position weight instead of the model's plans")
    p.add_argument("--roi-whole", action="store_true", help="try Net2 on the whole volume (ROI = everything)")
    p.add_argument("--roi-min-fraction", type=float, default=0.1,
                   help="with --roi-centre-sigma: keep components scoring at least this share of the best")
    p.add_argument("--inference-settings", type=json.loads, default=None, metavar="JSON",
                   help="fields of the plans' inference section to try instead of the model's, e.g. "
                        "'{\"brightening\": {\"label\": 1, \"targets\": [0.62], \"max_factor\": 2.0, \"min_voxels\": 50}}'")
    p.add_argument("-o", "--output", default=None, help="JSON file for the per-volume records")
    args = p.parse_args(argv)

    info = load_dataset(Path(args.data))
    structures = {k: v for k, v in info.labels.items() if v != 0}
    rule = None if args.roi_centre_sigma is None else \
        HeartComponentRoi(None, args.roi_min_fraction, centre_sigma=args.roi_centre_sigma)  # margin from the plans
    if args.roi_whole:
        rule = WholeVolumeRoi()
    # the model as it is (postprocessing included), with only the named inference settings changed
    settings = dict(args.inference_settings or {})
    if args.quarter_turns:
        settings["tta_quarter_turns"] = True
    predictor = Predictor.from_model_dir(args.model, args.folds, device="cpu",
                                         tta=True if args.quarter_turns else args.tta, roi_rule=rule,
                                         inference_settings=settings or None)
    cases = [c for c in info.training_cases() if any(fnmatch.fnmatch(c.case_id, w) for w in args.cases)]
    rows = []
    for case in tqdm(cases, desc="volumes", file=sys.stderr):
        rows.append(case_diagnostics(predictor, case.images[0], case.label, structures, case.case_id))
    rows.sort(key=lambda r: r["cascade_dice"]["mean"])
    names = list(structures)
    print("| volume | ROI recall | Net1 mean | cascade " + " | ".join(names) + " | cascade mean | FOV mm (D,H,W) "
          "| heart mL | heart centre (D,H,W) | bg / LV / Myo mean |")
    print("|---" * (7 + len(names)) + "|")
    for r in rows:
        im = r["image"]
        cells = [r["case"], f"{r['roi_recall']:.2f}", f"{r['net1_dice']['mean']:.3f}"]
        cells += [f"{r['cascade_dice'][n]:.3f}" for n in names]
        cells += [f"**{r['cascade_dice']['mean']:.3f}**", ",".join(f"{v:.0f}" for v in im["fov_mm"]),
                  f"{im['heart_ml']:.0f}", ",".join(f"{v:.2f}" for v in im.get("heart_centre_fraction", [])),
                  " / ".join("-" if im.get(k) is None else f"{im[k]:.2f}"
                             for k in ("background_mean", "LV_mean", "Myo_mean"))]
        print("| " + " | ".join(cells) + " |")
    means = {n: statistics.fmean(r["cascade_dice"][n] for r in rows) for n in names + ["mean"]}
    worst = rows[0]
    print(f"\nvolumes {len(rows)}: cascade mean Dice {means['mean']:.3f} ("
          + ", ".join(f"{n} {means[n]:.3f}" for n in names)
          + f"); Net1 mean {statistics.fmean(r['net1_dice']['mean'] for r in rows):.3f}; "
          f"lowest {worst['cascade_dice']['mean']:.3f} ({worst['case']}); "
          f"ROI recall min {min(r['roi_recall'] for r in rows):.3f}; "
          f"volumes below 0.5: {sum(r['cascade_dice']['mean'] < 0.5 for r in rows)}")
    if args.output:
        atomic_write_json(args.output, {"model": str(args.model), "tta": predictor.tta,
                                        "quarter_turns": args.quarter_turns,
                                        "inference_settings": args.inference_settings, "cases": rows}, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
