"""hc_demo: the whole job on built-in synthetic hearts (the README's first command)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, run_cli, verbosity


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(prog="hc_demo", description="Create synthetic CT hearts, plan, preprocess, train the "
                         "cascade, predict the held-out scans and evaluate them.")
    p.add_argument("-o", "--output", type=Path, default=Path("demo_output"), help="folder for everything the demo writes")
    p.add_argument("-n", "--num-training", type=int, default=8, help="synthetic training cases (default 8)")
    p.add_argument("--num-test", type=int, default=3, help="held-out synthetic test cases (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--modality", type=str.lower, choices=("ct", "mr"), default="ct")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing worker processes")
    p.add_argument("--device", "-device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first instead of reusing it")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.workflows.demo import DemoSettings, run_demo  # deferred: torch, keeps --help instant

        run_demo(DemoSettings(output=args.output, num_training=args.num_training, num_test=args.num_test,
                              seed=args.seed, modality=args.modality, num_processes=args.num_processes,
                              fresh=args.fresh, device=args.device, progress=verbosity(args) > QUIET))
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
