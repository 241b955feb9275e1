"""``hc_evaluate``: score a folder of predictions against a folder of reference label maps."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, verbosity
from heartcascade.paths import raw_dataset_dir
from heartcascade.utils.errors import HCError


def parse_labels(text: str) -> tuple[dict[str, int], dict[int, int] | None]:
    """``"1:LV,2:Myo"`` or ``"1:LV:500,2:Myo:205"`` -> ({name: label}, {label: original code} or None)."""
    labels: dict[str, int] = {}
    codes: dict[int, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        fields = [f.strip() for f in item.split(":")]
        try:
            if len(fields) not in (2, 3) or not fields[1]:
                raise ValueError
            value = int(fields[0])
            if len(fields) == 3:
                codes[value] = int(fields[2])
        except ValueError:
            raise HCError(f"--labels: cannot parse {item!r} (expected LABEL:NAME or LABEL:NAME:CODE, e.g. 1:LV:500)") from None
        if fields[1] in labels:
            raise HCError(f"--labels: structure name {fields[1]!r} given twice")
        labels[fields[1]] = value
    if not labels:
        raise HCError("--labels: no structures given")
    if codes and len(codes) != len(labels):
        raise HCError("--labels: give an original code for every structure or for none")
    return labels, codes or None


def build_parser() -> argparse.ArgumentParser:
    parser = HCArgumentParser(
        prog="hc_evaluate",
        description="Dice, Jaccard, ASSD and HD95 per structure and whole heart; writes JSON, CSV and markdown.",
    )
    parser.add_argument("-ref", required=True, help="folder with the reference label maps")
    parser.add_argument("-pred", required=True, help="folder with the predicted label maps (same case names)")
    parser.add_argument("-o", dest="output", default=None,
                        help="summary JSON path (default PRED/summary.json); .csv and .md are written beside it")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("-d", dest="dataset", default=None,
                       help="raw dataset id (e.g. 1 or Dataset001_MMWHS): labels and label codes from its dataset.json")
    group.add_argument("--labels", default=None,
                       help="structures as LABEL:NAME[:CODE],... e.g. 1:LV,2:Myo or 1:LV:500,2:Myo:205")
    parser.add_argument("-np", dest="num_processes", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--no-whole-heart", action="store_true", help="do not add the union of all structures")
    parser.add_argument("--hd95", choices=("pooled", "max"), default="pooled",
                        help="pooled: 95th percentile of both directions' surface distances together (default); "
                             "max: the larger of the two directed 95th percentiles (MONAI, MedPy)")
    parser.add_argument("--both-empty", choices=("one", "nan"), default="one",
                        help="a structure absent from reference and prediction: one = Dice 1, distances 0 "
                             "(default); nan = undefined, left out of means (nnU-Net)")
    add_verbosity_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from heartcascade.evaluation.evaluate import (  # deferred: scipy, keeps --help instant
            evaluate_folders, labels_from_dataset, markdown_table)

        if args.num_processes < 1:
            raise HCError(f"-np must be at least 1, got {args.num_processes}")
        if args.dataset is not None:
            labels, codes = labels_from_dataset(raw_dataset_dir(args.dataset))
        else:
            labels, codes = parse_labels(args.labels)
        summary = evaluate_folders(
            args.ref, args.pred, labels, label_codes=codes, output_json=args.output,
            num_processes=args.num_processes, whole_heart=not args.no_whole_heart, progress=verbosity(args) > QUIET,
            hd95=args.hd95, both_empty=args.both_empty,
        )
    except HCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(markdown_table(summary), end="")  # the result itself, printed even with --quiet
    print(f"wrote {summary['files']['json']}, {summary['files']['csv']}, {summary['files']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
