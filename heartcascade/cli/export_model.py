"""``hc_export_model``: pack a trained model (weights, plans, dataset.json, postprocessing) into one zip."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import parse_json


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_export_model",
        description="Write a weights-only model archive (networks, plans, dataset.json, postprocessing.json, a "
                    "README with the training figures) that hc_install_model and hc_predict -m read.",
        epilog="example: hc_export_model -d 1 -c cascade -f 0 1 2 3 4 -o model.zip")
    p.add_argument("-d", "--dataset", type=dataset_id, required=True, help="dataset id (1, 001 or Dataset001_Name)")
    p.add_argument("-c", "--configuration", default="cascade", choices=("cascade", "baseline"),
                   help="configuration (default cascade)")
    p.add_argument("-f", "--folds", nargs="+", default=None,
                   help="folds to include, e.g. '-f 0 1 2 3 4' or '-f all' (default: every numbered fold present)")
    p.add_argument("--checkpoint", "-chk", default="final",
                   help="final, best, latest or a checkpoint file name in the fold folders (default final)")
    p.add_argument("-o", "--output", required=True, help="the .zip file to write")
    p.add_argument("--inference-settings", default=None, metavar="JSON",
                   help="fields of the plans' inference section the exported model gets instead of the trained "
                        "one's, e.g. '{\"tta\": false}' (checked as the plans are; the weights are unchanged; "
                        "listed in the archive's manifest)")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.inference.model_archive import export_model  # deferred: torch, keeps --help instant

        settings = None
        if args.inference_settings is not None:
            settings = parse_json(args.inference_settings, "--inference-settings")
            if not isinstance(settings, dict):
                raise HCError("--inference-settings must be a JSON object, e.g. '{\"tta\": false}'")
        path = export_model(args.dataset, args.configuration, args.output, args.folds, args.checkpoint, settings)
        print(f"hc_export_model: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
