"""hc_make_synthetic: write a raw dataset of synthetic whole-heart CT or MR cases."""
from __future__ import annotations

import argparse
from typing import Sequence

from heartcascade.cli.common import (QUIET, HCArgumentParser, add_verbosity_arguments, dataset_id, non_negative_int,
                                     positive_int, run_cli, verbosity)


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_make_synthetic",
        description="Generate a raw dataset (imagesTr/labelsTr, imagesTs/labelsTs) of synthetic hearts with the "
                    "seven MM-WHS structures inside a torso; deterministic per seed.",
        epilog="example: hc_make_synthetic -d 1 -n 20 --n-test 5 --modality ct --seed 0\n"
               "         hc_make_synthetic -d 2 -n 3 --from-labels ../shared/data/mmwhs_ct_labels",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", type=dataset_id, required=True, help="dataset id (1-999)")
    p.add_argument("-n", "--num-training", type=positive_int, required=True,
                   help="number of training cases (with --from-labels: at most this many label maps)")
    p.add_argument("--modality", type=str.lower, choices=("ct", "mr"), default="ct", help="image appearance (default: ct)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--size", choices=("small", "full"), default="small",
                   help="small: ~64-96 voxels in-plane for fast CPU training; full: MM-WHS scale (default: small)")
    p.add_argument("--n-test", type=non_negative_int, default=0, help="number of test cases (default: 0)")
    p.add_argument("--name", default=None, help="dataset name (default: SyntheticCT / SyntheticMR)")
    p.add_argument("--from-labels", metavar="DIR", default=None,
                   help="synthesise images around the MM-WHS-coded label maps in DIR instead of parametric hearts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from heartcascade.dataset.synthetic import make_synthetic_dataset  # deferred: scipy, keeps --help instant

        folder = make_synthetic_dataset(args.dataset, args.num_training, args.modality, args.seed, args.size,
                                        args.n_test, args.name, args.from_labels, args.overwrite,
                                        progress=verbosity(args) > QUIET)
        print(f"wrote {folder}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
