"""``hc_measure``: clinical measures of a folder of label maps (volumes, LV mass, EDV/ESV/SV/EF)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from heartcascade.cli.common import HCArgumentParser, add_verbosity_arguments, run_cli, show_progress
from heartcascade.utils.atomic import ensure_writable_dir


def build_parser() -> argparse.ArgumentParser:
    p = HCArgumentParser(
        prog="hc_measure",
        description="Per case and structure volume (mL) and LV myocardial mass (1.05 g/mL) -> measures.csv; for "
                    "ED/ES pairs of a patient EDV, ESV, stroke volume and ejection fraction of LV and RV -> "
                    "cardiac_function.csv. With -r, the mean absolute errors against a reference folder -> "
                    "measures_comparison.csv. See documentation/measures.md.",
        epilog="example: hc_measure -i preds -r labelsTs --labels 200:Myo,500:LV,600:RV -o measures/")
    p.add_argument("-i", dest="input", required=True, help="folder of label maps (e.g. hc_predict's output)")
    p.add_argument("-o", dest="output", default=None, help="folder for the CSV files (default: the input folder)")
    p.add_argument("-r", "--reference", default=None,
                   help="reference folder: also report mean absolute volume, mass and EF errors of -i against it "
                        "(cases matched by name, a leading label_/image_ ignored)")
    p.add_argument("--labels", default=None,
                   help="which value is which structure, CODE:NAME,... e.g. 200:Myo,500:LV,600:RV (default: "
                        "the itksnap_labels.txt hc_predict wrote into the folder)")
    p.add_argument("--dataset-json", default=None, help="take the structure names (and codes) from this dataset.json")
    p.add_argument("--pairs", default=None,
                   help="CSV with the header patient,ed,es naming the end-diastole and end-systole case of each "
                        "patient (default: by name, <patient>_ED/_ES or two <patient>_frameNN with ED = larger LV)")
    p.add_argument("--pattern", default=None, help="only files matching this glob, e.g. 'label_*.nii.gz'")
    p.add_argument("--reference-pattern", default=None, help="only reference files matching this glob")
    add_verbosity_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        from heartcascade.evaluation.measure_folders import label_names, run_measures  # deferred: SimpleITK, keeps --help instant

        output = ensure_writable_dir(args.output or args.input)
        names = label_names(args.input, args.labels, args.dataset_json)
        ref_names = label_names(args.reference, args.labels, args.dataset_json) if args.reference else None
        result = run_measures(args.input, output, names, args.pairs, args.pattern, args.reference, ref_names,
                              args.reference_pattern, progress=show_progress(args))
        print(f"hc_measure: {result['cases']} cases, {result['pairs']} ED/ES pairs -> "
              f"{', '.join(str(Path(f).name) for f in result['files'])} in {output}")
        for measure, (error, n) in result.get("errors", {}).items():
            if error is not None:
                print(f"  mean absolute error {measure}: {error:.2f} (n={n})")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
