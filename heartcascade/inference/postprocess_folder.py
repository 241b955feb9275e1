"""Apply a model's postprocessing to any folder of label maps (``hc_apply_postprocessing``).

Why: label maps made outside ``hc_predict`` -- an ``nnUNetv2_ensemble`` / ``hc_ensemble`` of several
models, ``--no-postprocessing`` runs, another tool's output of the same labels -- lose the
connected-component steps that ``hc_determine_postprocessing`` chose. This applies the one
implementation (:class:`~heartcascade.inference.postprocessing.Postprocessing`) to such files.

The steps name training labels (0..N-1). A map written with the dataset's own codes (``label_codes``,
e.g. 500 for the LV) is translated to training labels and back; a map whose values are neither is
refused, naming the file and the values. Outputs keep each input's grid, header and ending; inputs are
never modified.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from heartcascade.dataset.image_io import Geometry, is_image_file, label_array, read_image, write_array
from heartcascade.inference.postprocessing import Postprocessing
from heartcascade.utils.errors import HCError


@dataclass
class FolderReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _to_training(labels: np.ndarray, codes: Mapping[int, int] | None, num_classes: int,
                 path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(training labels, lookup back to the file's values or None when they already were training labels)."""
    present = {int(v) for v in np.unique(labels)}
    if present <= set(range(num_classes)):
        return labels, None
    if codes:
        inverse = {int(code): int(label) for label, code in codes.items()}
        if present <= set(inverse) | {0}:
            lut = np.zeros(max(present) + 1, dtype=np.int32)
            for code, label in inverse.items():
                if code < lut.size:
                    lut[code] = label
            back = np.zeros(num_classes, dtype=np.int64)
            for label, code in codes.items():
                back[int(label)] = int(code)
            return lut[labels], back
    expected = f"0..{num_classes - 1}" + (f" or the codes {sorted(codes.values())}" if codes else "")
    raise HCError(f"{path}: label values {sorted(present - set(range(num_classes)))[:6]} are not the model's "
                  f"labels ({expected}); was it made for another label set?")


def postprocess_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike, steps: Postprocessing,
                       num_classes: int, label_codes: Mapping[int, int] | None = None,
                       overwrite: bool = False) -> FolderReport:
    """Apply ``steps`` to every label map in ``input_dir`` and write the results to ``output_dir``."""
    src, dst = Path(input_dir), Path(output_dir)
    if not src.is_dir():
        raise HCError(f"{src}: folder of label maps not found")
    if dst.resolve() == src.resolve():
        raise HCError(f"{dst}: the output folder must differ from the input folder (inputs are never modified)")
    files = sorted(p for p in src.iterdir() if is_image_file(p))
    if not files:
        raise HCError(f"{src}: no label maps found")
    steps.check_labels(num_classes, "postprocessing")
    dst.mkdir(parents=True, exist_ok=True)
    report = FolderReport()
    for path in files:
        out = dst / path.name
        if out.exists() and not overwrite:
            report.failed[path.name] = f"{out}: exists (pass --overwrite)"
            continue
        try:
            image = read_image(path)
            labels, back = _to_training(label_array(image, path), label_codes, num_classes, path)
            result = steps.apply(labels.astype(np.uint8 if num_classes <= 256 else np.int32, copy=True))
            written = result if back is None else back[result]
            top = int(np.max(written, initial=0))
            dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.int32
            write_array(written.astype(dtype), Geometry.of(image), out, reference=path)
            report.written.append(out)
        except HCError as exc:
            report.failed[path.name] = str(exc)
    return report
