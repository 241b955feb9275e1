"""hc_convert_mmwhs: convert the MM-WHS 2017 release into a raw dataset."""
from __future__ import annotations

import argparse
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_convert_mmwhs",
        description="Convert an MM-WHS 2017 folder (ct_train_1001_image.nii.gz / ct_train_1001_label.nii.gz, "
                    "test images ct_test_2001_image.nii.gz) into a raw dataset; label codes 205/420/500/550/600/820/850 "
                    "become 1..7 and dataset.json keeps them in label_codes.",
        epilog="example: hc_convert_mmwhs -i ~/data/MM-WHS -d 10 --modality ct",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="folder holding the MM-WHS files (searched recursively)")
    p.add_argument("-d", "--dataset", type=dataset_id, required=True, help="dataset id (1-999)")
    p.add_argument("--modality", type=str.lower, choices=("ct", "mr"), default=None,
                   help="which files to convert when DIR holds both (default: the one present)")
    p.add_argument("--name", default=None, help="dataset name (default: MMWHSCT / MMWHSMR)")
    p.add_argument("--unknown-to-background", action="store_true",
                   help="map label values other than the MM-WHS codes to background instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from heartcascade.dataset.importers import convert_mmwhs  # deferred: SimpleITK, keeps --help instant

        folder = convert_mmwhs(args.input, args.dataset, args.modality, args.unknown_to_background, args.overwrite,
                               args.name)
        print(f"wrote {folder}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
