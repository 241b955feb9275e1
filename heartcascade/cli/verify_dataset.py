"""hc_verify_dataset: check every case of a raw dataset and list all problems."""
from __future__ import annotations

import argparse
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli, verbosity
from heartcascade.paths import raw_dataset_dir


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_verify_dataset",
        description="Check image/label pairing, 3D shape, geometry agreement, label values, NaN/Inf and channel "
                    "count for every case; prints one line per problem and a summary; exit code 1 on any problem.",
        epilog="example: hc_verify_dataset -d 1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", type=dataset_id, required=True, help="dataset id (1-999)")
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # older spelling
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.dataset.verify import verify_dataset  # deferred: SimpleITK, keeps --help instant

        report = verify_dataset(raw_dataset_dir(args.dataset),
                                progress=verbosity(args) > QUIET and not args.no_progress)
        for line in report.problems:
            print(line)
        print(report.summary())
        return 0 if report.ok else 1

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
