"""``hc_predict``: segment new scans with a trained cascade (or baseline) model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from heartcascade.cli.common import (QUIET, VERBOSE, HCArgumentParser, add_nnunet_flags, add_verbosity_arguments,
                                     run_cli, show_progress, verbosity)
from heartcascade.dataset.segments import segments_from_labels
from heartcascade.utils.atomic import ensure_writable_dir
from heartcascade.utils.errors import HCError

#: nnUNetv2_predict flags with nothing to do here (one value each), and why.
NNUNET_IGNORED = {
    "-npp": "one background reader preprocesses the next case while the current one is predicted",
    "-nps": "one background writer exports the label maps",
}
#: nnUNetv2_predict flags with no counterpart here, and what to do instead.
NNUNET_REFUSED = {
    "-tr": "heartcascade has no trainer classes; pick the model with -d/-c or -m",
    "-p": "there is one plans file per model; pick the model with -d/-c or -m",
    "-prev_stage_predictions": "the cascade runs both of its stages itself",
    "-num_gpus": "one process uses one device; shard with -num_parts/-part_id, one process per GPU",
    "-step_size": "Net2 segments whole slices of the region of interest, there is no sliding-window step",
    "--disable_progress_bar": "use --quiet",
}


def build_parser() -> argparse.ArgumentParser:
    parser = HCArgumentParser(
        prog="hc_predict",
        description="Predict whole-heart label maps on each input's own voxel grid (size, spacing, origin and "
                    "direction copied from the input). See documentation/prediction.md.",
    )
    parser.add_argument("-i", dest="input", required=True,
                        help="input: a folder of CASE_0000.nii.gz-style files or plain image files, a single "
                             "image file, a DICOM series folder, or a case list (list.txt: one image path per "
                             "line; cases.csv: header with 'image' or 'image_0000',... columns and optional "
                             "'case')")
    parser.add_argument("-o", dest="output", required=True, help="output folder (created if needed)")
    # --- model source (issue #22 item 1): neither -d nor -m = the shipped pretrained cine-MR model ---
    source = parser.add_mutually_exclusive_group(required=False)
    source.add_argument("-d", dest="dataset", default=None,
                        help="dataset id (e.g. 1 or Dataset001_MMWHS): use HC_RESULTS/<dataset>/<configuration>")
    source.add_argument("-m", dest="model_dir", default=None,
                        help="model: a configuration folder holding fold_<f>/, a single fold folder, or a "
                             "model .zip from hc_export_model. Without -d and -m: the pretrained cine-MR "
                             "model shipped with heartcascade (LV, Myo, RV; see documentation/prediction.md)")
    # --- end model source ---
    parser.add_argument("-c", dest="configuration", default=None, choices=("cascade", "baseline"),
                        help="configuration (default cascade with -d; with -m it is read from the checkpoint)")
    parser.add_argument("-f", dest="folds", nargs="+", default=None,
                        help="folds to average, e.g. '-f 0 1 2' or '-f all' (the model trained on all cases); "
                             "default: every numbered fold present")
    parser.add_argument("--checkpoint", "-chk", default=None,
                        help="which checkpoint of each fold: final, best, latest or a file name such as "
                             "checkpoint_final.pth (default final; for a .zip the one it holds)")
    parser.add_argument("--device", "-device", default="auto",
                        help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    tta = parser.add_mutually_exclusive_group()
    tta.add_argument("--tta", dest="tta", action="store_true", default=None,
                     help="test-time mirroring (Net1/baseline: the axes training mirrored, Net2: in-plane); slower; default: the "
                          "model's plans (inference.tta; on in the default preset)")
    tta.add_argument("--disable_tta", "--disable-tta", dest="tta", action="store_false",
                     help="no test-time mirroring (nnU-Net's spelling)")
    # --- probabilities (issue #22 item 6): nnU-Net's spelling --save_probabilities writes nnU-Net's files ---
    parser.add_argument("--save-probabilities", dest="save_probabilities", action="store_true",
                        help="also write CASE.npz with the class probabilities inside the region of interest "
                             "(heartcascade's compact format)")
    parser.add_argument("--nnunet-probabilities", "--save_probabilities", dest="nnunet_probabilities",
                        action="store_true",
                        help="write the probabilities as nnU-Net v2 does instead (full-volume CASE.npz + CASE.pkl), "
                             "so nnUNetv2_ensemble and hc_ensemble can combine them with nnU-Net's; implies "
                             "--save-probabilities (nnU-Net's spelling --save_probabilities means this)")
    # --- end probabilities ---
    parser.add_argument("--overwrite", action="store_true", help="predict cases whose output already exists")
    parser.add_argument("--continue_prediction", "--continue-prediction", action="store_true",
                        help="accepted for nnU-Net compatibility: existing outputs are always skipped unless "
                             "--overwrite")
    parser.add_argument("--part-id", "-part_id", dest="part_id", type=int, default=0,
                        help="this process's part (0-based) when sharding")
    parser.add_argument("--num-parts", "-num_parts", dest="num_parts", type=int, default=1,
                        help="split the sorted case list into this many parts (part i gets cases i, i+n, ...)")
    parser.add_argument("--net1-only", action="store_true",
                        help="write Net1's upsampled prediction instead of the cascade's (for comparison)")
    parser.add_argument("--no-postprocessing", action="store_true",
                        help="do not apply the model's postprocessing.json (connected components)")
    parser.add_argument("--overlays", action="store_true",
                        help="also write overlays/CASE.png (axial, coronal and sagittal views through the heart)")
    _add_output_format_argument(parser)
    add_verbosity_arguments(parser)
    # --- nnU-Net flags without a counterpart (issue #22 item 6) ---
    add_nnunet_flags(parser, refused=NNUNET_REFUSED, ignored=NNUNET_IGNORED)
    # --- end nnU-Net flags ---
    return parser


def run(args: argparse.Namespace, roi_rule: Any = None) -> int:
    """``roi_rule``: an ROI rule instead of the plans' (the benchmark's reference box)."""
    # --- model resolution (issue #22 item 1): the default model, after checking the input fits it ---
    if args.dataset is None and args.model_dir is None:
        args.model_dir = str(_default_model(args))
    # --- end model resolution ---
    if args.model_dir is not None and str(args.model_dir).endswith(".zip") and Path(args.model_dir).is_file():
        from heartcascade.inference.model_archive import extracted_model  # deferred: torch, keeps --help instant

        with extracted_model(args.model_dir) as (folder, manifest):
            return _predict(args, folder, args.checkpoint or manifest["checkpoint"], roi_rule)
    return _predict(args, None, args.checkpoint or "final", roi_rule)


def _default_model(args: argparse.Namespace) -> Path:
    """The shipped (or ``$HC_DEFAULT_MODEL``) model zip, announced on stderr; every input must be what the
    model was made for (modality, channels, enough slices), else one line says what it is for."""
    from heartcascade.inference.cases import discover_cases  # deferred: SimpleITK, keeps --help instant
    from heartcascade.inference.input_check import check_inputs  # deferred: numpy, keeps --help instant
    from heartcascade.inference.pretrained import default_model, describe  # deferred: torch, keeps --help instant

    path, card = default_model()
    if args.configuration not in (None, card.get("configuration", "cascade")):
        raise HCError(f"-c {args.configuration}: the default model is a {card.get('configuration', 'cascade')} "
                      "model; pass -d or -m for another")
    print(f"hc_predict: no -d/-m given, using the default model {path.name} ({describe(card)})", file=sys.stderr)
    channels = int((card.get("input") or {}).get("channels") or 1)
    check_inputs(discover_cases(args.input, channels, args.output), card, "the default model")
    return path


def _predict(args: argparse.Namespace, model_dir: Path | None, checkpoint: str, roi_rule: Any = None) -> int:
    from heartcascade.inference.predictor import Predictor, tune_host_allocator  # deferred: torch, keeps --help instant

    tune_host_allocator()
    if args.num_parts < 1 or not 0 <= args.part_id < args.num_parts:
        raise HCError(f"--part-id must be in 0..{args.num_parts - 1} and --num-parts >= 1 "
                      f"(got {args.part_id} and {args.num_parts})")
    ensure_writable_dir(args.output)  # a bad -o fails now, not after loading the model
    folds = args.folds
    if folds and "all" in folds and len(folds) > 1:
        raise HCError("-f all cannot be combined with numbered folds")
    level = verbosity(args)
    common = dict(folds=folds, checkpoint=checkpoint, device=args.device, tta=args.tta, verbose=level > QUIET,
                  postprocessing=None if args.no_postprocessing else "auto", roi_rule=roi_rule)
    if args.dataset is not None:
        predictor = Predictor.from_dataset(args.dataset, configuration=args.configuration or "cascade", **common)
    else:
        predictor = Predictor.from_model_dir(model_dir or args.model_dir, configuration=args.configuration,
                                             **common)
    if args.net1_only and predictor.configuration != "cascade":
        raise HCError("--net1-only needs a cascade model")
    if level == VERBOSE:
        print(f"hc_predict: {predictor.configuration} model, fold(s) {', '.join(predictor.fold_names)}, "
              f"checkpoint {checkpoint}, device {predictor.device}, tta {'on' if predictor.tta else 'off'}")
    report = _predict_cohort(args, predictor, level)
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    for case_id, reason in sorted(report.failed.items()):
        print(f"error: {case_id}: {reason}", file=sys.stderr)
    line = f"hc_predict: {report.summary()}"
    if report.failed and (Path(args.output) / _failures_file(args)).is_file():
        line += f" (list in {Path(args.output) / _failures_file(args)})"
    print(line, file=sys.stderr if report.failed else sys.stdout)
    return 0 if report.ok else 1


# --- output formats, cohort runs and per-case extras (issue #22 items 3-5) -------------------------------

OUTPUT_FORMATS = ("nifti", "nrrd", "seg.nrrd", "dicom-seg")  # heartcascade.dataset.segformats.FORMAT_ENDINGS


def _add_output_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-format", "--output_format", dest="output_format", default=None,
                        choices=OUTPUT_FORMATS,
                        help="label map format: nifti (with itksnap_labels.txt), nrrd, seg.nrrd (3D Slicer, named "
                             "coloured segments) or dicom-seg (DICOM series input only); default: the input's "
                             "format (NIfTI for DICOM series)")


def _failures_file(args: argparse.Namespace) -> str:
    return "failures.csv" if args.num_parts == 1 else f"failures_part{args.part_id}.csv"


def _predict_cohort(args: argparse.Namespace, predictor: Any, level: int):
    """Every case of ``-i`` (this part of them) through the batch loop, which writes each output once:
    label map in the chosen format, probabilities in the chosen format, overlays and measures from memory;
    then ``measures.csv`` / ``cardiac_function.csv`` beside the predictions."""
    from heartcascade.evaluation.measure_folders import RunMeasures  # deferred: numpy/SimpleITK, keeps --help instant
    from heartcascade.inference.batch import predict_files  # deferred: SimpleITK, keeps --help instant

    probabilities = "nnunet" if args.nnunet_probabilities else "roi" if args.save_probabilities else None
    measures = RunMeasures()
    hooks: list[Any] = [measures]
    if args.overlays:
        hooks.append(_overlay_hook(Path(args.output) / "overlays"))
    report = predict_files(predictor, args.input, args.output, part_id=args.part_id, num_parts=args.num_parts,
                           overwrite=args.overwrite, probabilities=probabilities, output_format=args.output_format,
                           net1_only=args.net1_only, hooks=hooks, keep_image=args.overlays,
                           failures_file=_failures_file(args), label_descriptions=True,
                           progress=show_progress(args))
    _write_measures(args, predictor, measures, report, level)
    return report


def _write_measures(args: argparse.Namespace, predictor: Any, measures: Any, report: Any, level: int) -> None:
    """measures.csv (and cardiac_function.csv) beside the predictions; with sharding measures_part<i>.csv
    (pair the parts with hc_measure afterwards). A failure here is reported, the predictions stand."""
    from heartcascade.inference.results import one_line  # deferred: numpy, keeps --help instant

    suffix = "" if args.num_parts == 1 else f"_part{args.part_id}"
    names = {s.value: s.name for s in segments_from_labels(predictor.plans.labels, predictor.label_codes)}
    try:
        files = measures.write(args.output, report.existing, names, suffix=suffix)
    except Exception as exc:  # a full disk or an unreadable earlier output must not hide the run's result
        print(f"warning: measures not written: {one_line(exc)}", file=sys.stderr)
        return
    if level == VERBOSE and files:
        print(f"hc_predict: measures in {', '.join(str(f) for f in files)}")


def _overlay_hook(folder: Path):
    """Per-case hook: overlays/CASE.png of the input image and the label map just written (both in memory)."""
    def draw(written: Any) -> None:
        import SimpleITK as sitk  # deferred: only with --overlays

        from heartcascade.evaluation.overlay import write_overlay_png  # deferred: matplotlib, only with --overlays

        labels = sitk.GetImageFromArray(written.labels)
        labels.CopyInformation(written.image)
        names = {s.value: s.name for s in written.segments}
        write_overlay_png(written.image, [("prediction", labels)], folder / f"{written.case.case_id}.png",
                          label_names=names, title=written.case.case_id, image_name=str(written.case.files[0]))
    return draw


def main(argv: Sequence[str] | None = None, roi_rule: Any = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args, roi_rule))


if __name__ == "__main__":
    sys.exit(main())
