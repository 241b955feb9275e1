"""Many cases through one predictor: read ahead, predict, write in the background, report per case.

One case failing (unreadable input, a prediction error, a full disk while writing) never stops the
others; it is recorded in the :class:`~heartcascade.inference.results.PredictionReport`. Outputs of a
killed earlier run are cleaned up first; existing outputs are skipped unless ``overwrite``.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.inference.cases import InputCase, cases_from_file_lists, discover_cases, shard
from heartcascade.inference.io_pipeline import BackgroundWriter, prefetch
from heartcascade.inference.results import PredictionReport, one_line, probabilities_path, write_outputs
from heartcascade.utils.atomic import ensure_writable_dir, remove_temp_files_of

if TYPE_CHECKING:  # pragma: no cover
    from heartcascade.inference.predictor import Predictor


def predict_files(predictor: "Predictor", inputs: str | Path | Sequence[Sequence[str | Path]] | Sequence[InputCase],
                  output_dir: str | Path, overwrite: bool = False, save_probabilities: bool = False,
                  net1_only: bool = False, part_id: int = 0, num_parts: int = 1,
                  case_ids: Sequence[str] | None = None, apply_label_codes: bool = True,
                  background_io: bool = True, log: Callable[[str], None] | None = None) -> PredictionReport:
    """:meth:`Predictor.predict_files <heartcascade.inference.predictor.Predictor.predict_files>`."""
    if log is None:
        log = (lambda msg: print(msg, flush=True)) if predictor.verbose else (lambda msg: None)
    output_dir = Path(output_dir)
    if isinstance(inputs, (str, Path)):
        cases = discover_cases(inputs, predictor.num_channels, output_dir=output_dir)
    elif inputs and all(isinstance(c, InputCase) for c in inputs):
        cases = list(inputs)  # type: ignore[arg-type]
    else:
        cases = cases_from_file_lists(inputs, case_ids)  # type: ignore[arg-type]
    cases = shard(cases, part_id, num_parts)
    ensure_writable_dir(output_dir)
    report = PredictionReport()
    todo: list[InputCase] = []
    for case in cases:
        out = case.output_path(output_dir)
        wanted = [out, probabilities_path(out)] if save_probabilities else [out]
        for path in wanted:  # leftovers of a killed run of this case (this shard owns it)
            remove_temp_files_of(path)
        if case.error:
            report.failed[case.case_id] = case.error
            log(f"{case.case_id}: FAILED: {case.error}")
        elif all(p.exists() for p in wanted) and not overwrite:
            report.skipped.append(case.case_id)
            log(f"{case.case_id}: skipped, {out} exists (use --overwrite)")
        else:
            todo.append(case)

    def load(case: InputCase):
        images = [image_io.read_image(f) for f in case.files]
        geometry = Geometry.of(images[0])
        image, properties = predictor.preprocess(images, case.case_id)
        del images
        return image, properties, geometry

    writer = BackgroundWriter(max_pending=2, enabled=background_io)
    for loaded in prefetch(todo, load, ahead=1 if background_io else 0):
        case = loaded.item
        if loaded.error is not None:
            report.failed[case.case_id] = one_line(loaded.error)
            log(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
            continue
        image, properties, geometry = loaded.value
        loaded.value = None
        try:
            t = time.perf_counter()
            result = predictor.predict_preprocessed(image, properties, save_probabilities, net1_only)
            del image
            labels = predictor.apply_codes(result.labels) if apply_label_codes else result.labels
            out = case.output_path(output_dir)
            reference = case.files[0] if case.files[0].is_file() else None
            writer.submit(case.case_id, write_outputs, labels, geometry, out, reference,
                          result.probabilities if save_probabilities else None, predictor.num_classes)
            report.outputs[case.case_id] = out
            log(f"{case.case_id}: predicted in {time.perf_counter() - t:.1f} s -> {out}")
            del result, labels
        except Exception as exc:  # one case failing must not stop the others
            report.failed[case.case_id] = one_line(exc)
            log(f"{case.case_id}: FAILED: {report.failed[case.case_id]}")
    for case_id, exc in writer.close().items():
        report.failed[case_id] = one_line(exc)
        report.outputs.pop(case_id, None)
        log(f"{case_id}: FAILED while writing: {report.failed[case_id]}")
    report.written = sorted(report.outputs)
    return report
