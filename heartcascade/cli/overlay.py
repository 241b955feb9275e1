"""``hc_overlay``: a PNG of a segmentation over its image (axial, coronal, sagittal through the heart)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, run_cli
from heartcascade.utils.errors import HCError


def _label_names(spec: str | None) -> dict[int, str] | None:
    """``--labels`` as a dataset.json path or '1:LV,2:RV'."""
    if spec is None:
        return None
    if spec.endswith(".json") or Path(spec).is_dir():
        from heartcascade.dataset.dataset_json import load_dataset  # deferred: SimpleITK, keeps --help instant

        info = load_dataset(Path(spec).parent if spec.endswith(".json") else Path(spec))
        codes = info.label_codes or {}
        return {int(codes.get(v, v)): k for k, v in info.labels.items() if v != 0}
    names = {}
    for item in spec.split(","):
        value, _, name = item.partition(":")
        if not value.strip().isdigit() or not name.strip():
            raise HCError(f"--labels: expected VALUE:NAME pairs such as 1:LV,2:RV, got {item!r}")
        names[int(value)] = name.strip()
    return names


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_overlay",
        description="Draw a label map over its image: axial, coronal and sagittal views through the centre of "
                    "the segmented heart, one colour per structure, with a legend; with -r a second row shows "
                    "the reference.",
        epilog="example: hc_overlay -i imagesTs/case_0000.nii.gz -s preds/case.nii.gz -r labelsTs/case.nii.gz "
               "-o case.png")
    p.add_argument("-i", "--image", required=True, help="the image (any format heartcascade reads, or a DICOM folder)")
    p.add_argument("-s", "--segmentation", required=True, help="the label map to show (e.g. a prediction)")
    p.add_argument("-r", "--reference", default=None, help="optional reference label map (shown in a second row)")
    p.add_argument("-o", "--output", required=True, help="the PNG file to write")
    p.add_argument("--labels", default=None,
                   help="structure names for the legend: a dataset.json or VALUE:NAME pairs, e.g. 1:LV,2:RV")
    p.add_argument("--title", default=None, help="title (default: the segmentation's file name)")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.evaluation.overlay import write_case_overlay  # deferred: SimpleITK, keeps --help instant

        title = args.title if args.title is not None else Path(args.segmentation).name
        path = write_case_overlay(args.image, args.segmentation, args.output, args.reference,
                                  label_names=_label_names(args.labels), title=title)
        print(f"hc_overlay: wrote {path}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
