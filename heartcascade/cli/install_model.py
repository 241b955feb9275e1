"""``hc_install_model``: unpack a model archive written by ``hc_export_model`` into HC_RESULTS."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_install_model",
        description="Unpack a model archive (from hc_export_model) into HC_RESULTS/DatasetXXX_Name/<configuration>/ "
                    "so that hc_predict -d finds it.")
    p.add_argument("archive", help="the model .zip")
    p.add_argument("--overwrite", action="store_true", help="replace folds that are already installed")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.inference.model_archive import install_model, read_manifest  # deferred: torch, keeps --help instant

        target = install_model(args.archive, overwrite=args.overwrite)
        manifest = read_manifest(args.archive)
        print(f"hc_install_model: installed {manifest['dataset']} {manifest['configuration']} fold(s) "
              f"{', '.join(manifest['folds'])} into {target}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
