"""``hc_ensemble``: average nnU-Net-format probability folders (heartcascade's and nnU-Net's) into label maps.

Example::

    hc_predict -i IN -o hc_out -d 1 --save_probabilities           # nnU-Net's files (CASE.npz + CASE.pkl)
    cp $HC_RESULTS/Dataset001_X/cascade/fold_0/dataset.json hc_out/
    nnUNetv2_predict -i IN -o nn_out -d 1 -c 3d_fullres --save_probabilities
    hc_ensemble -i hc_out nn_out -o ensembled
    hc_apply_postprocessing -i ensembled -o final -d 1              # the postprocessing ensembling drops

Unlike ``nnUNetv2_ensemble`` it checks that the folders' labels line up (each folder's dataset.json).
See documentation/coming_from_nnunet.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import QUIET, HCArgumentParser, add_verbosity_arguments, run_cli, verbosity


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(prog="hc_ensemble",
                         description="Average the CASE.npz probabilities (nnU-Net's format) of several prediction "
                                     "folders into CASE.nii.gz label maps, after checking from each folder's "
                                     "dataset.json that the channels mean the same structures (re-ordered when "
                                     "only their order differs).")
    p.add_argument("-i", dest="inputs", nargs="+", required=True,
                   help="two or more folders with CASE.npz + CASE.pkl and a dataset.json")
    p.add_argument("-o", dest="output", required=True, help="output folder of the label maps")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.inference.ensemble import ensemble_folders  # deferred: numpy, keeps --help instant

        report = ensemble_folders(args.inputs, args.output, overwrite=args.overwrite)
        for folder, order in report.reordered.items():
            print(f"note: {folder}: channels in the order {order}; re-ordered to match the first folder",
                  file=sys.stderr)
        if verbosity(args) > QUIET:
            print(f"hc_ensemble: {len(report.written)} label map(s) written to {args.output}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
