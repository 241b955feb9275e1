"""``hc_apply_postprocessing``: apply a model's connected-component postprocessing to a folder of label maps.

Examples::

    hc_apply_postprocessing -i ensembled/ -o final/ -d 1              # the cascade's postprocessing.json
    hc_apply_postprocessing -i ensembled/ -o final/ -m model.zip
    hc_apply_postprocessing -i ensembled/ -o final/ -pp postprocessing.json -plans plans.json

nnU-Net's ``nnUNetv2_apply_postprocessing -i IN -o OUT -pp_pkl_file ...``; see documentation/prediction.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli, verbosity
from heartcascade.utils.errors import HCError


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(prog="hc_apply_postprocessing",
                         description="Apply a model's postprocessing (keep-largest-component steps chosen by "
                                     "hc_determine_postprocessing) to every label map of a folder, e.g. after "
                                     "ensembling; outputs keep each input's grid and file format.")
    p.add_argument("-i", dest="input", required=True, help="folder of label maps")
    p.add_argument("-o", dest="output", required=True, help="output folder (must differ from -i)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", dest="dataset", type=dataset_id, default=None,
                        help="dataset id: the postprocessing.json of HC_RESULTS/<dataset>/<configuration>")
    source.add_argument("-m", dest="model", default=None,
                        help="model: a configuration or fold folder, or a model .zip from hc_export_model")
    source.add_argument("-pp", "--postprocessing", dest="postprocessing", default=None,
                        help="a postprocessing.json (then -plans names the labels)")
    p.add_argument("-plans", "--plans", dest="plans", default=None,
                   help="with -pp: the model's plans.json (classes and label codes)")
    p.add_argument("-c", dest="configuration", default="cascade", choices=("cascade", "baseline"),
                   help="with -d: the configuration (default cascade)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_verbosity_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from heartcascade.inference.postprocess_folder import postprocess_folder  # deferred: numpy, keeps --help instant
    from heartcascade.inference.postprocessing import load_postprocessing  # deferred: scipy, keeps --help instant
    from heartcascade.inference.label_codes import label_codes_from  # deferred: numpy, keeps --help instant
    from heartcascade.planning.plans import Plans, load_plans  # deferred: keeps --help instant

    def finish(pp_path: Path, plans: Plans) -> int:
        steps = load_postprocessing(pp_path)
        report = postprocess_folder(args.input, args.output, steps, plans.num_classes,
                                    label_codes_from(plans.label_codes), overwrite=args.overwrite)
        for name, reason in sorted(report.failed.items()):
            print(f"error: {name}: {reason}", file=sys.stderr)
        if verbosity(args) > QUIET or report.failed:
            print(f"hc_apply_postprocessing: {len(report.written)} written to {args.output} with {pp_path} "
                  f"({len(report.failed)} failed)", file=sys.stderr if report.failed else sys.stdout)
        return 0 if not report.failed else 1

    if args.postprocessing is not None:
        if args.plans is None:
            raise HCError("-pp needs -plans PLANS.json (the model's classes and label codes)")
        return finish(Path(args.postprocessing), load_plans(args.plans))
    if args.plans is not None:
        raise HCError("-plans goes with -pp; with -d/-m the model's own plans are used")

    def from_model(model_dir: Path) -> int:
        from heartcascade.inference.model_loading import resolve_fold_dirs  # deferred: torch, keeps --help instant
        from heartcascade.inference.postprocessing import find_postprocessing  # deferred: scipy, keeps --help instant

        folds = resolve_fold_dirs(model_dir)
        pp_path = find_postprocessing(model_dir, [f for _, f in folds])
        if pp_path is None:
            raise HCError(f"{model_dir}: the model has no postprocessing.json (run hc_determine_postprocessing)")
        plans_path = folds[0][1] / "plans.json"
        if not plans_path.is_file():
            raise HCError(f"{plans_path}: not found (the model folder lacks its plans)")
        return finish(pp_path, load_plans(plans_path))

    if args.dataset is not None:
        from heartcascade.inference.model_loading import model_dir_for  # deferred: torch, keeps --help instant

        return from_model(model_dir_for(args.dataset, args.configuration))
    model = Path(args.model)
    if model.is_file() and model.suffix == ".zip":
        from heartcascade.inference.model_archive import extracted_model  # deferred: torch, keeps --help instant

        with extracted_model(model) as (folder, _manifest):
            return from_model(folder)
    return from_model(model)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
