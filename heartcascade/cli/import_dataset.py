"""hc_import: import any folder of paired images and code-mapped label maps as a raw dataset."""
from __future__ import annotations

import argparse
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, dataset_id, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_import",
        description="Import image/label pairs matched by the text of the wildcards of two glob patterns. "
                    "MM-WHS structure names (LV, Myo, RV, LA, RA, AA, PA) get their canonical label order; "
                    "other names follow in the order given.",
        epilog="example (MS-CMRSeg bSSFP):\n"
               "  hc_import -i ../shared/data/mscmrseg2019_bssfp -d 20 --images 'image_*.nii.gz' "
               "--labels 'label_*.nii.gz' --codes 200:Myo,500:LV,600:RV --modality mr --name MSCMRSeg",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", "--input", required=True, metavar="DIR", help="folder holding the files")
    p.add_argument("-d", "--dataset", type=dataset_id, required=True, help="dataset id (1-999)")
    p.add_argument("--images", required=True, metavar="GLOB", help="image file pattern relative to DIR, e.g. 'image_*.nii.gz'")
    p.add_argument("--labels", required=True, metavar="GLOB", help="label file pattern relative to DIR, e.g. 'label_*.nii.gz'")
    p.add_argument("--codes", required=True, metavar="CODE:NAME,...", help="label codes and structure names, e.g. 200:Myo,500:LV,600:RV")
    p.add_argument("--modality", type=str.lower, choices=("ct", "mr"), default=None, help="default: guessed from the intensities")
    p.add_argument("--name", default=None, help="dataset name (default: the input folder's name)")
    p.add_argument("--unknown-to-background", action="store_true",
                   help="map label values not listed in --codes to background instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with this id")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        from heartcascade.dataset.importers import import_dataset  # deferred: SimpleITK, keeps --help instant

        folder = import_dataset(args.input, args.dataset, args.images, args.labels, args.codes, args.modality,
                                args.name, args.overwrite, args.unknown_to_background)
        print(f"wrote {folder}")

    return run_cli(body)


if __name__ == "__main__":
    raise SystemExit(main())
