"""``hc_determine_postprocessing``: choose connected-component postprocessing on cross-validation results.

Examples::

    hc_determine_postprocessing -d 1                      # cascade, every fold with validation/
    hc_determine_postprocessing -d 1 -c cascade -f 0 1 2 3 4

Pools the folds' ``fold_<f>/validation/`` predictions, compares them with the raw dataset's
``labelsTr`` and writes ``HC_RESULTS/DatasetXXX_Name/<configuration>/postprocessing.json``, which
``hc_predict`` uses when it averages folds. See documentation/prediction.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli, verbosity
from heartcascade.paths import raw_dataset_dir
from heartcascade.utils.errors import HCError


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(prog="hc_determine_postprocessing",
                                description="Keep-largest-component steps that raise mean Dice on the folds' "
                                            "validation predictions; written to the configuration folder.")
    p.add_argument("-d", dest="dataset", required=True, type=dataset_id,
                   help="dataset id (e.g. 1 or Dataset001_MMWHS)")
    p.add_argument("-c", dest="configuration", default="cascade", choices=("cascade", "baseline"),
                   help="configuration (default cascade)")
    p.add_argument("-f", dest="folds", nargs="+", default=None,
                   help="folds whose validation predictions are pooled (default: every numbered fold present)")
    p.add_argument("-o", dest="output", default=None,
                   help="output file (default: the configuration folder's postprocessing.json)")
    add_verbosity_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from heartcascade.evaluation.postprocessing import (  # deferred: scipy, keeps --help instant
        determine_postprocessing, postprocessing_path)
    from heartcascade.inference.model_loading import model_dir_for, resolve_fold_dirs  # deferred: torch, keeps --help instant
    from heartcascade.training.final_validation import VALIDATION_FOLDER  # deferred: torch, keeps --help instant

    model_dir = model_dir_for(args.dataset, args.configuration)
    raw = raw_dataset_dir(args.dataset)
    folds = resolve_fold_dirs(model_dir, args.folds)
    pred_dirs = []
    for name, folder in folds:
        pred = folder / VALIDATION_FOLDER
        if not pred.is_dir():
            raise HCError(f"{pred}: no validation predictions for fold {name} (train it without --no-validation)")
        pred_dirs.append(pred)
    out = Path(args.output) if args.output else postprocessing_path(model_dir)
    quiet = verbosity(args) <= QUIET
    determine_postprocessing(pred_dirs, raw / "labelsTr", raw / "dataset.json", output_json=out,
                             log=(lambda *_: None) if quiet else print)
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
