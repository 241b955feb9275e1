"""``hc_plan_and_preprocess``: fingerprint a raw dataset, write its plans and preprocess its training cases."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, run_cli, verbosity
from heartcascade.cli.common import dataset_id as _dataset_id_type
from heartcascade.cli.common import positive_int as _positive_int
from heartcascade.paths import raw_dataset_dir
from heartcascade.planning.presets import DEFAULT_PRESET, available_presets


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = HCArgumentParser(
        prog="hc_plan_and_preprocess",
        description="Fingerprint the raw dataset HC_RAW/DatasetXXX_Name, write plans.json for the memory target "
                    "and preprocess the training cases into HC_PREPROCESSED/DatasetXXX_Name.")
    parser.add_argument("-d", "--dataset", required=True, type=_dataset_id_type,
                        help="dataset id (1, 001 or Dataset001_Name)")
    parser.add_argument("--gpu-memory-gb", type=_positive_float, default=None,
                        help="GPU memory to plan for (default: the preset's, else the detected CUDA GPU, else 12)")
    parser.add_argument("--preset", default=None,
                        help=f"planner preset: {', '.join(available_presets()) or 'none found'} "
                             "(documentation/plans.md) or the path of a JSON file "
                             f"(default: {DEFAULT_PRESET}, or the one of an existing plans.json)")
    parser.add_argument("--machine", choices=("cpu", "cuda"), default=None,
                        help="plan for this kind of machine (the preset's machine section): default cuda when a "
                             "CUDA GPU is detected or --gpu-memory-gb is given, else cpu")
    parser.add_argument("-np", "--num-processes", type=_positive_int, default=None,
                        help="worker processes (default: min(CPUs, 4)); each needs ~2 GB for a 512x512x239 CT")
    parser.add_argument("--plan-only", action="store_true", help="write fingerprint and plans, do not preprocess")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute fingerprint and plans and preprocess every case again")
    parser.add_argument("--verify_dataset_integrity", "--verify", dest="verify", action="store_true",
                        help="first check the raw dataset as hc_verify_dataset does and stop if it finds problems")
    parser.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # older spelling
    add_verbosity_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = verbosity(args) > QUIET and not args.no_progress

    def body() -> int:
        from heartcascade.planning.plans import plans_summary  # deferred: torch, keeps --help instant
        from heartcascade.workflows.plan_and_preprocess import plan_and_preprocess  # deferred: torch, keeps --help instant

        if args.verify:
            from heartcascade.dataset.verify import verify_dataset  # deferred: SimpleITK, keeps --help instant

            report = verify_dataset(raw_dataset_dir(args.dataset), progress=progress)
            if not report.ok:
                for line in report.problems:
                    print(f"error: {line}", file=sys.stderr)
                print(report.summary(), file=sys.stderr)
                return 1

        result = plan_and_preprocess(args.dataset, gpu_memory_gb=args.gpu_memory_gb, preset=args.preset,
                                     num_processes=args.num_processes, plan_only=args.plan_only,
                                     overwrite=args.overwrite, progress=progress, machine=args.machine)
        print(f"plans: {result.out_dir / 'plans.json'} ({plans_summary(result.plans)})")
        if not args.plan_only:
            print(f"preprocessed: {len(result.processed)} case(s), skipped (up to date): {len(result.skipped)}, "
                  f"failed: {len(result.failed)}")
        if result.failed:
            print(f"error: {len(result.failed)} case(s) failed: {', '.join(sorted(result.failed))}", file=sys.stderr)
        return result.exit_code

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
