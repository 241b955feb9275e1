"""``hc_benchmark``: speed and memory of preprocessing, loading, training and prediction, as JSON lines."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, non_negative_int, positive_int, run_cli


def _list(allowed: Sequence[str], what: str):
    def parse(value: str) -> list[str]:
        items = [v.strip().lower() for v in value.split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    from heartcascade.benchmark.runner import CASE_NAMES, SECTION_NAMES

    p = HCArgumentParser(
        prog="hc_benchmark",
        description="Measure preprocessing seconds per case, loader batches/s, training step time, hc_predict "
                    "file-to-file seconds and peak memory (host RSS, GPU) on a full-size CT (512x512x239, synthesised "
                    "around a real MM-WHS label map) and an MS-CMRSeg MR case, with freshly initialised networks from "
                    "the real planner. Prints one JSON object per measurement. See documentation/benchmarks.md.")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--cases", type=_list(CASE_NAMES, "case"), default=list(CASE_NAMES),
                   help="comma separated: ct (512x512x239 CT), mr (MS-CMRSeg bSSFP) (default: ct,mr)")
    p.add_argument("--shared-data", type=Path, default=None,
                   help="folder with mmwhs_ct_labels/ and mscmrseg2019_bssfp/ (default: $HC_SHARED_DATA, else "
                        "../shared/data next to the repository)")
    p.add_argument("--work", type=Path, default=None,
                   help="working folder (datasets, preprocessed data, models, predictions); kept, and reused on "
                        "re-runs (default: a temporary folder, removed at the end)")
    p.add_argument("--preset", default=None,
                   help="planner preset, e.g. paper, cpu or demo (default: paper, the product configuration; demo "
                        "with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="small synthetic cases and the demo preset: a smoke test of the benchmark itself (seconds)")
    p.add_argument("--skip", type=_list(SECTION_NAMES, "section"), default=[],
                   help=f"comma separated sections to leave out: {', '.join(SECTION_NAMES)}")
    p.add_argument("--roi", choices=("reference", "net1", "both"), default=None,
                   help="prediction ROI: 'reference' pins Net2's region to the reference heart box + margin (what a "
                        "trained Net1 gives), 'net1' lets the untrained Net1 decide (~ the whole body crop: worst "
                        "case, runs the hc_predict console script unchanged), 'both' (default: reference; both with "
                        "--quick)")
    p.add_argument("--compare-nnunet", action="store_true",
                   help="also time nnU-Net v2 (optional extra 'nnunetv2') on the same volume; reported as skipped "
                        "when it is not importable")
    p.add_argument("--nnunet-python", default=None,
                   help="python interpreter that has nnunetv2 (e.g. a separate venv; default: this one)")
    p.add_argument("--train-iterations", type=positive_int, default=None,
                   help="timed training iterations per step after the warm-up (default 2; 1 with --quick)")
    p.add_argument("--train-warmup", type=non_negative_int, default=1, help="untimed warm-up iterations (default 1)")
    p.add_argument("--amp", choices=("plans", "bf16", "fp16", "none"), default="plans",
                   help="mixed precision of the timed training iterations on CUDA (the plans' amp is "
                        "overridden for the benchmark's trainer only; CPU iterations run in float32 whatever "
                        "this says; default: the plans' own setting)")
    p.add_argument("--compile", action="store_true",
                   help="time the training iterations with the networks wrapped in torch.compile, as "
                        "hc_train --compile does (the first iterations of each input shape compile: give "
                        "--train-warmup enough of them)")
    p.add_argument("--steps", type=_list(("1", "2", "3", "4"), "step"), default=None,
                   help="curriculum steps to time in the loader/training sections (default: all)")
    p.add_argument("--loader-batches", type=positive_int, default=None,
                   help="batches timed per loader (default 8; 2 with --quick)")
    p.add_argument("--repeats", type=positive_int, default=1, help="in-process predictions per case (default 1)")
    p.add_argument("--memory-check-max-gb", type=float, default=1.5,
                   help="CPU only: memory-model checks whose predicted peak is larger are run on shrunk shapes "
                        "(default 1.5)")
    p.add_argument("-np", "--num-processes", dest="num_processes", type=positive_int, default=None,
                   help="preprocessing worker processes (default 2; 1 with --quick)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="data-augmentation workers for the loader/training sections (default: as hc_train)")
    p.add_argument("--timeout", type=float, default=3 * 3600, help="seconds allowed per section (default 10800)")
    add_verbosity_arguments(p)  # its output is the JSON lines (the result), printed at every level
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.benchmark.runner import Options, Runner

        options = Options(device=args.device, cases=args.cases, shared_data=args.shared_data, work=args.work,
                          preset=args.preset, quick=args.quick, compare_nnunet=args.compare_nnunet,
                          nnunet_python=args.nnunet_python, skip=set(args.skip), roi=args.roi,
                          train_iterations=args.train_iterations, train_warmup=args.train_warmup,
                          amp=None if args.amp == "plans" else args.amp, compile=args.compile,
                          train_steps=args.steps, loader_batches=args.loader_batches, repeats=args.repeats,
                          memory_check_max_gb=args.memory_check_max_gb, num_processes=args.num_processes,
                          workers=args.workers, timeout_s=args.timeout)
        return Runner(options).run()

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
