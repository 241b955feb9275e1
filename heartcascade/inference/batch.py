"""Many cases through one predictor: the batch loop owns the case list and writes every output once.

:func:`predict_files` finds the cases (a folder, a file, a case list ``.txt`` / ``.csv``, or explicit
file lists; :mod:`heartcascade.inference.cases`), takes this process's shard, and
:func:`predict_cases` reads ahead, predicts, and writes in the background, per case: the label map in
the requested format (:mod:`heartcascade.dataset.segformats`), the probabilities in the requested
format (heartcascade's region of interest or nnU-Net's full volume), then the caller's per-case hooks
(overlays, measures) on what is already in memory, so nothing is read back from disk.

One case failing (unreadable input, a prediction error, a full disk while writing) never stops the
others; it is recorded in the :class:`~heartcascade.inference.results.PredictionReport` and, when
asked, in a ``failures.csv`` beside the outputs. Outputs of a killed earlier run are cleaned up first;
existing outputs are skipped unless ``overwrite``. Progress is ``[i/N]`` with the per-case time and an
ETA in the log, and a bar on a terminal.
"""
from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import SimpleITK as sitk

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.dataset.segformats import FORMAT_ENDINGS, format_of, write_segmentation
from heartcascade.dataset.segformats.itksnap import ITKSNAP_LABELS_FILE, write_itksnap_labels
from heartcascade.dataset.segments import Segment, segments_from_labels
from heartcascade.inference.cases import InputCase, cases_from_file_lists, discover_cases, shard
from heartcascade.inference.io_pipeline import BackgroundWriter, prefetch
from heartcascade.inference.nnunet_interop import write_nnunet_probability_files
from heartcascade.inference.results import (CaseResult, PredictionReport, RoiProbabilities, one_line,
                                            probabilities_path, save_roi_probabilities)
from heartcascade.utils.atomic import atomic_write_text, ensure_writable_dir, remove_temp_files_of
from heartcascade.utils.errors import HCError
from heartcascade.utils.progress import progress_bar

#: ``probabilities`` choices: heartcascade's ``CASE.npz`` (region of interest) or nnU-Net v2's
#: ``CASE.npz`` + ``CASE.pkl`` (full volume, for ``nnUNetv2_ensemble``).
PROBABILITY_FORMATS = ("roi", "nnunet")


class CasePredictor(Protocol):
    """What the batch loop needs of a predictor (:class:`~heartcascade.inference.predictor.Predictor`)."""

    num_channels: int
    num_classes: int
    verbose: bool
    plans: dict
    label_codes: dict | None

    def preprocess(self, images: Sequence[sitk.Image], case_id: str = ...) -> tuple[np.ndarray, dict]: ...

    def predict_preprocessed(self, image: np.ndarray, properties: dict, return_probabilities: bool = ...,
                             net1_only: bool = ...) -> CaseResult: ...

    def apply_codes(self, labels: np.ndarray) -> np.ndarray: ...


@dataclass
class WrittenCase:
    """One case whose label map is on disk, as the per-case hooks see it (in the writer thread)."""

    case: InputCase
    output: Path
    labels: np.ndarray                 # (z, y, x), the values written to ``output``
    geometry: Geometry
    segments: list[Segment]
    image: sitk.Image | None = None    # the first input channel, when ``keep_image``
    seconds: float = 0.0               # prediction time of this case


@dataclass
class BatchOptions:
    """What :func:`predict_cases` writes per case.

    Attributes:
        overwrite: predict cases whose output exists.
        probabilities: None, ``"roi"`` or ``"nnunet"`` (:data:`PROBABILITY_FORMATS`).
        output_format: a key of :data:`~heartcascade.dataset.segformats.FORMAT_ENDINGS`; None = the input's.
        net1_only: write Net1's upsampled prediction (cascade only).
        apply_label_codes: write the dataset's own label codes (e.g. 500) instead of training labels.
        background_io: read ahead and write in background threads.
        hooks: called with a :class:`WrittenCase` after each label map is written; an exception fails the case.
        keep_image: hand the first input image to the hooks (costs one image of memory per pending write).
        failures_file: name of the ``case,error`` CSV written beside the outputs when any case failed.
        label_descriptions: write ``itksnap_labels.txt`` beside NIfTI outputs (names and colours for ITK-SNAP).
        progress: a progress bar on a terminal (the ``[i/N]`` log lines come with ``predictor.verbose``).
    """

    overwrite: bool = False
    probabilities: str | None = None
    output_format: str | None = None
    net1_only: bool = False
    apply_label_codes: bool = True
    background_io: bool = True
    hooks: Sequence[Callable[[WrittenCase], None]] = ()
    keep_image: bool = False
    failures_file: str | None = None
    label_descriptions: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if self.probabilities not in (None,) + PROBABILITY_FORMATS:
            raise HCError(f"probabilities must be one of {', '.join(PROBABILITY_FORMATS)}, got {self.probabilities!r}")
        if self.output_format is not None and self.output_format not in FORMAT_ENDINGS:
            raise HCError(f"--output-format must be one of {', '.join(FORMAT_ENDINGS)}, got {self.output_format!r}")


def collect_cases(inputs: str | Path | Sequence[Sequence[str | Path]] | Sequence[InputCase], num_channels: int,
                  output_dir: str | Path, case_ids: Sequence[str] | None = None,
                  output_format: str | None = None) -> list[InputCase]:
    """The cases of ``inputs``: a folder / file / DICOM folder / case list (see
    :mod:`heartcascade.inference.cases`), a list of per-case file lists (``case_ids`` names them), or a
    list of :class:`InputCase`."""
    if isinstance(inputs, (str, Path)):
        ending = FORMAT_ENDINGS[output_format] if output_format else None
        return discover_cases(inputs, num_channels, output_dir=output_dir, output_ending=ending)
    if inputs and all(isinstance(c, InputCase) for c in inputs):
        return list(inputs)  # type: ignore[arg-type]
    return cases_from_file_lists(inputs, case_ids)  # type: ignore[arg-type]


def predict_files(predictor: CasePredictor, inputs: str | Path | Sequence[Sequence[str | Path]] | Sequence[InputCase],
                  output_dir: str | Path, part_id: int = 0, num_parts: int = 1,
                  case_ids: Sequence[str] | None = None, log: Callable[[str], None] | None = None,
                  **options: Any) -> PredictionReport:
    """Predict every case of ``inputs`` (this process's part of them) into ``output_dir``.

    ``options`` are :class:`BatchOptions` fields, e.g. ``overwrite=True, probabilities="roi"``.
    """
    batch_options = BatchOptions(**options)
    cases = collect_cases(inputs, predictor.num_channels, output_dir, case_ids, batch_options.output_format)
    return predict_cases(predictor, shard(cases, part_id, num_parts), output_dir, batch_options, log)


def _with_format(case: InputCase, output_format: str | None) -> InputCase:
    if output_format is None:
        return case
    case = replace(case, output_ending=FORMAT_ENDINGS[output_format])
    if output_format == "dicom-seg" and not case.error and not case.files[0].is_dir():
        case.error = f"{case.files[0]}: --output-format dicom-seg needs a DICOM series as input"
    return case


def _wanted_files(out: Path, probabilities: str | None) -> list[Path]:
    if probabilities is None:
        return [out]
    npz = probabilities_path(out)
    return [out, npz, npz.with_suffix(".pkl")] if probabilities == "nnunet" else [out, npz]


def write_case(labels: np.ndarray, geometry: Geometry, out: Path, reference: Path | None, segments: list[Segment],
               probabilities: RoiProbabilities | None, probability_format: str | None, num_classes: int) -> None:
    """Probabilities first, label map last: a label map on disk means the case is complete."""
    if probabilities is not None:
        npz = probabilities_path(out)
        if probability_format == "nnunet":
            write_nnunet_probability_files(probabilities, geometry, npz)
        else:
            save_roi_probabilities(probabilities, npz, num_classes)
    write_segmentation(labels, geometry, out, segments, reference)


class _Progress:
    """``[i/N]`` lines with per-case time and ETA for the log, and a bar on a terminal."""

    def __init__(self, total: int, log: Callable[[str], None], bar: bool) -> None:
        self.total, self.done, self.log = total, 0, log
        self.start = time.perf_counter()
        self.bar = progress_bar(total=total, enabled=bar, unit="case", desc="predicting") if total else None

    def step(self, message: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        remaining = elapsed / self.done * (self.total - self.done)
        eta = f", ETA {_clock(remaining)}" if self.done < self.total else f", total {_clock(elapsed)}"
        line = f"[{self.done}/{self.total}] {message}{eta}"
        if self.bar is not None and not self.bar.disable:
            with self.bar.external_write_mode():  # the line above the bar, not through it
                self.log(line)
            self.bar.update(1)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def failures_csv_text(failed: dict[str, str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "error"])
    for case_id, error in sorted(failed.items()):
        writer.writerow([case_id, error])
    return buffer.getvalue()


def predict_cases(predictor: CasePredictor, cases: Sequence[InputCase], output_dir: str | Path,
                  options: BatchOptions | None = None, log: Callable[[str], None] | None = None) -> PredictionReport:
    """Predict ``cases`` into ``output_dir`` (see the module docstring); one case failing never stops the others."""
    options = options or BatchOptions()
    if log is None:
        log = (lambda msg: print(msg, flush=True)) if predictor.verbose else (lambda msg: None)
    output_dir = Path(output_dir)
    ensure_writable_dir(output_dir)
    codes = predictor.label_codes if options.apply_label_codes else None
    segments = segments_from_labels(predictor.plans.labels, codes)
    report = PredictionReport()
    todo: list[InputCase] = []
    for case in (_with_format(c, options.output_format) for c in cases):
        out = case.output_path(output_dir)
        wanted = _wanted_files(out, options.probabilities)
        for path in wanted:  # leftovers of a killed run of this case (this shard owns it)
            remove_temp_files_of(path)
        if case.error:
            report.failed[case.case_id] = case.error
            log(f"{case.case_id}: FAILED: {case.error}")
        elif all(p.exists() for p in wanted) and not options.overwrite:
            report.skipped.append(case.case_id)
            report.existing[case.case_id] = out
            log(f"{case.case_id}: skipped, {out} exists (use --overwrite)")
        else:
            todo.append(case)

    def load(case: InputCase):
        images = [image_io.read_image(f) for f in case.files]
        geometry = Geometry.of(images[0])
        image, properties = predictor.preprocess(images, case.case_id)
        first = images[0] if options.keep_image else None
        del images
        return image, properties, geometry, first

    def finish(written: WrittenCase) -> None:
        for hook in options.hooks:
            hook(written)

    want_probs = options.probabilities is not None
    progress = _Progress(len(todo), log, options.progress)
    writer = BackgroundWriter(max_pending=2, enabled=options.background_io)
    for loaded in prefetch(todo, load, ahead=1 if options.background_io else 0):
        case = loaded.item
        if loaded.error is not None:
            report.failed[case.case_id] = one_line(loaded.error)
            progress.step(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
            continue
        image, properties, geometry, first = loaded.value
        loaded.value = None
        try:
            t = time.perf_counter()
            result = predictor.predict_preprocessed(image, properties, want_probs, options.net1_only)
            del image
            labels = predictor.apply_codes(result.labels) if options.apply_label_codes else result.labels
            out = case.output_path(output_dir)
            seconds = time.perf_counter() - t
            written = WrittenCase(case, out, labels, geometry, segments, first, seconds)
            writer.submit(case.case_id, _write_and_finish, written, result.probabilities if want_probs else None,
                          options.probabilities, predictor.num_classes, finish)
            report.outputs[case.case_id] = out
            report.seconds[case.case_id] = seconds
            brightened = "" if result.brightening is None else \
                f" (brightened x{', x'.join(f'{f:.2f}' for f in result.brightening)})"
            progress.step(f"{case.case_id}: predicted in {seconds:.1f} s{brightened} -> {out}")
            del result, labels, written, first
        except Exception as exc:  # one case failing must not stop the others
            report.failed[case.case_id] = one_line(exc)
            progress.step(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
    for case_id, exc in writer.close().items():
        report.failed[case_id] = one_line(exc)
        report.outputs.pop(case_id, None)
        report.seconds.pop(case_id, None)
        log(f"{case_id}: FAILED while writing: {report.failed[case_id]}")
    progress.close()
    report.written = sorted(report.outputs)
    _write_run_files(output_dir, options, segments, report, log)
    return report


def _write_run_files(output_dir: Path, options: BatchOptions, segments: list[Segment], report: PredictionReport,
                     log: Callable[[str], None]) -> None:
    """``itksnap_labels.txt`` once a NIfTI label map exists, ``failures.csv`` when a case failed. A failure
    here (a full disk) is reported, never raised: the cases themselves are done and reported."""
    jobs = []
    if options.label_descriptions and segments and any(format_of(p) == "nifti" for p in report.outputs.values()):
        jobs.append((output_dir / ITKSNAP_LABELS_FILE, lambda p: write_itksnap_labels(p, segments)))
    if options.failures_file:
        path = output_dir / options.failures_file
        if report.failed:
            jobs.append((path, lambda p: atomic_write_text(p, failures_csv_text(report.failed))))
        elif path.is_file():
            jobs.append((path, lambda p: p.unlink()))  # an earlier run's failures, now all done
    for path, job in jobs:
        try:
            job(path)
        except (OSError, HCError) as exc:
            report.notes.append(f"{path}: not written ({one_line(exc)})")
            log(report.notes[-1])


def _write_and_finish(written: WrittenCase, probabilities: RoiProbabilities | None, probability_format: str | None,
                      num_classes: int, finish: Callable[[WrittenCase], None]) -> None:
    case = written.case
    reference = case.files[0] if case.files[0].is_file() or written.output.name.endswith(".dcm") else None
    write_case(written.labels, written.geometry, written.output, reference, written.segments, probabilities,
               probability_format, num_classes)
    finish(written)
