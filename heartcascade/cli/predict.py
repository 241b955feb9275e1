"""``hc_predict``: segment new scans with a trained cascade (or baseline) model."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.utils.errors import HCError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hc_predict",
        description="Predict whole-heart label maps on each input's own voxel grid (size, spacing, origin and "
                    "direction copied from the input). See documentation/prediction.md.",
    )
    parser.add_argument("-i", dest="input", required=True,
                        help="input: a folder of CASE_0000.nii.gz-style files or plain image files, a single "
                             "image file, or a DICOM series folder")
    parser.add_argument("-o", dest="output", required=True, help="output folder (created if needed)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", dest="dataset", default=None,
                        help="dataset id (e.g. 1 or Dataset001_MMWHS): use HC_RESULTS/<dataset>/<configuration>")
    source.add_argument("-m", dest="model_dir", default=None,
                        help="model folder: a configuration folder holding fold_<f>/ or a single fold folder")
    parser.add_argument("-c", dest="configuration", default=None, choices=("cascade", "baseline"),
                        help="configuration (default cascade with -d; with -m it is read from the checkpoint)")
    parser.add_argument("-f", dest="folds", nargs="+", default=None,
                        help="folds to average, e.g. '-f 0 1 2' or '-f all' (the model trained on all cases); "
                             "default: every numbered fold present")
    parser.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                        help="which checkpoint of each fold (default final)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time mirroring (Net1/baseline: all axes, Net2: in-plane); slower, off by default")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write CASE.npz with the class probabilities inside the region of interest")
    parser.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    parser.add_argument("--part-id", type=int, default=0, help="this process's part (0-based) when sharding")
    parser.add_argument("--num-parts", type=int, default=1,
                        help="split the sorted case list into this many parts (part i gets cases i, i+n, ...)")
    parser.add_argument("--net1-only", action="store_true",
                        help="write Net1's upsampled prediction instead of the cascade's (for comparison)")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    return parser


def run(args: argparse.Namespace) -> int:
    from heartcascade.inference.predictor import Predictor, tune_host_allocator
    from heartcascade.utils.atomic import ensure_writable_dir

    tune_host_allocator()

    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise HCError(f"--part-id must be in 0..{args.num_parts - 1} and --num-parts >= 1 "
                      f"(got {args.part_id} and {args.num_parts})")
    ensure_writable_dir(args.output)  # a bad -o fails now, not after loading the model
    folds = args.folds
    if folds and "all" in folds and len(folds) > 1:
        raise HCError("-f all cannot be combined with numbered folds")
    common = dict(folds=folds, checkpoint=args.checkpoint, device=args.device, tta=args.tta, verbose=not args.quiet)
    if args.dataset is not None:
        predictor = Predictor.from_dataset(args.dataset, configuration=args.configuration or "cascade", **common)
    else:
        predictor = Predictor.from_model_dir(args.model_dir, configuration=args.configuration, **common)
    if args.net1_only and predictor.configuration != "cascade":
        raise HCError("--net1-only needs a cascade model")
    report = predictor.predict_files(args.input, args.output, overwrite=args.overwrite,
                                     save_probabilities=args.save_probabilities, net1_only=args.net1_only,
                                     part_id=args.part_id, num_parts=args.num_parts)
    for case_id, reason in sorted(report.failed.items()):
        print(f"error: {case_id}: {reason}", file=sys.stderr)
    line = f"hc_predict: {report.summary()}"
    print(line, file=sys.stderr if report.failed else sys.stdout)
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from heartcascade.cli.common import run_cli

    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
