"""Clinical measures of a folder of label maps (``hc_measure``) and of a prediction run (``hc_predict``).

Writes ``measures.csv`` (one row per case) and ``cardiac_function.csv`` (one row per ED/ES pair); with a
reference folder also ``measures_comparison.csv`` (mean absolute errors of the folder against it).
"""
from __future__ import annotations

import csv
import io
import os
import re
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

from heartcascade.dataset.image_io import label_array, read_image
from heartcascade.dataset.importers import parse_codes
from heartcascade.dataset.segformats import format_of
from heartcascade.dataset.segformats.itksnap import ITKSNAP_LABELS_FILE
from heartcascade.dataset.segments import structure_key
from heartcascade.evaluation.evaluate import find_cases, labels_from_dataset
from heartcascade.evaluation.measures import (CaseMeasures, PhasePair, case_table, compare, comparison_table,
                                              function_table, make_pairs, measure_case, read_pairing_file)
from heartcascade.utils.atomic import atomic_write_text
from heartcascade.utils.errors import HCError
from heartcascade.utils.progress import progress_bar

MEASURES_FILE = "measures.csv"
FUNCTION_FILE = "cardiac_function.csv"
COMPARISON_FILE = "measures_comparison.csv"
_ITKSNAP_LINE = re.compile(r'^\s*(\d+)\s+\d+\s+\d+\s+\d+\s+[\d.]+\s+\d+\s+\d+\s+"(.*)"\s*$')


def label_names(folder: str | os.PathLike | None = None, codes: str | None = None,
                dataset_json: str | os.PathLike | None = None) -> dict[int, str]:
    """``{file value: structure name}`` from ``--labels 500:LV,...``, a ``dataset.json`` (its codes when it
    has ``label_codes``), or the ``itksnap_labels.txt`` hc_predict wrote into ``folder``."""
    if codes:
        return parse_codes(codes)
    if dataset_json:
        labels, label_codes = labels_from_dataset(dataset_json)
        return {int((label_codes or {}).get(v, v)): name for name, v in labels.items()}
    if folder is not None and (Path(folder) / ITKSNAP_LABELS_FILE).is_file():
        path = Path(folder) / ITKSNAP_LABELS_FILE
        names = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            m = _ITKSNAP_LINE.match(line)
            if m and int(m.group(1)) != 0:
                names[int(m.group(1))] = m.group(2)
        if names:
            return names
    raise HCError(f"{folder}: which label is which structure is unknown; give --labels (e.g. 200:Myo,500:LV,600:RV) "
                  f"or --dataset-json")


def measure_folder(folder: str | os.PathLike, names: Mapping[int, str], pattern: str | None = None,
                   progress: bool = False) -> dict[str, CaseMeasures]:
    """Measures of every label map in ``folder`` (only files matching the glob ``pattern`` when given)."""
    cases = {k: p for k, p in find_cases(folder).items() if format_of(p) != "dicom-seg"}  # see measures.md
    if pattern:
        cases = {k: p for k, p in cases.items() if p.match(pattern)}
    if not cases:
        raise HCError(f"{folder}: no label maps found{f' matching {pattern}' if pattern else ''} (DICOM-SEG files are "
                      f"not read: hc_predict's measures.csv beside them holds their measures)")
    out = {}
    for case_id, path in progress_bar(sorted(cases.items()), enabled=progress, desc="measuring", unit="case"):
        image = read_image(path)
        out[case_id] = measure_case(case_id, label_array(image, path), image.GetSpacing(), names)
    return out


def write_tables(output_dir: str | os.PathLike, measures: Mapping[str, CaseMeasures],
                 pairs: Sequence[PhasePair], suffix: str = "") -> list[Path]:
    """``measures{suffix}.csv`` and, when there are ED/ES pairs, ``cardiac_function{suffix}.csv``."""
    output_dir = Path(output_dir)
    written = [output_dir / MEASURES_FILE.replace(".csv", f"{suffix}.csv")]
    atomic_write_text(written[0], case_table(list(measures.values())))
    if pairs:
        written.append(output_dir / FUNCTION_FILE.replace(".csv", f"{suffix}.csv"))
        atomic_write_text(written[1], function_table(pairs))
    return written


def run_measures(folder: str | os.PathLike, output_dir: str | os.PathLike, names: Mapping[int, str],
                 pairing_file: str | os.PathLike | None = None, pattern: str | None = None,
                 reference: str | os.PathLike | None = None, reference_names: Mapping[int, str] | None = None,
                 reference_pattern: str | None = None, progress: bool = False) -> dict[str, Any]:
    """``hc_measure``: measure ``folder``, pair ED/ES, write the tables; with ``reference`` also compare."""
    pairing = read_pairing_file(pairing_file) if pairing_file else None
    measures = measure_folder(folder, names, pattern, progress)
    pairs = make_pairs(measures, pairing)
    result: dict[str, Any] = {"cases": len(measures), "pairs": len(pairs),
                              "files": write_tables(output_dir, measures, pairs)}
    if reference is not None:
        ref = measure_folder(reference, reference_names or names, reference_pattern, progress)
        ref_pairs = make_pairs(ref, pairing)
        errors = compare(ref, measures, ref_pairs)
        path = Path(output_dir) / COMPARISON_FILE
        atomic_write_text(path, comparison_table(errors))
        result.update(errors=errors, reference_pairs=len(ref_pairs))
        result["files"].append(path)
    return result


# ---------------------------------------------------------------------------------------------------
# hc_predict: measures of the cases of a run, kept in measures.csv across reruns

class RunMeasures:
    """A per-case hook for :func:`heartcascade.inference.batch.predict_cases` that measures each label map
    while it is in memory; :meth:`write` adds the cases an earlier run predicted (skipped now) from the
    earlier ``measures.csv``, or from their files where that has no row for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.measures: dict[str, CaseMeasures] = {}

    def __call__(self, written: Any) -> None:
        names = {s.value: s.name for s in written.segments}
        m = measure_case(written.case.case_id, written.labels, written.geometry.spacing, names)
        with self._lock:
            self.measures[m.case_id] = m

    def write(self, output_dir: str | os.PathLike, existing: Mapping[str, Path], names: Mapping[int, str],
              suffix: str = "") -> list[Path]:
        """Write ``measures{suffix}.csv`` (and ``cardiac_function.csv`` when unsharded) for the cases
        measured now and the ``existing`` outputs (case -> label map) of this run's skipped cases."""
        path = Path(output_dir) / MEASURES_FILE.replace(".csv", f"{suffix}.csv")
        earlier = read_case_table(path) if path.is_file() else {}
        merged = {k: v for k, v in earlier.items() if k in existing}
        for case_id, label_path in sorted(existing.items()):
            if case_id not in merged and format_of(label_path) != "dicom-seg":
                image = read_image(label_path)
                merged[case_id] = measure_case(case_id, label_array(image, label_path), image.GetSpacing(), names)
        merged.update(self.measures)
        if not merged:
            return []
        return write_tables(output_dir, merged, make_pairs(merged) if not suffix else [], suffix)


def read_case_table(path: str | os.PathLike) -> dict[str, CaseMeasures]:
    """The per-case measures of a ``measures.csv`` this module wrote (unreadable rows are dropped)."""
    try:
        rows = list(csv.DictReader(io.StringIO(Path(path).read_text(encoding="utf-8"))))
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    out = {}
    for row in rows:
        try:
            volumes = {k[:-3]: float(v) for k, v in row.items() if k and k.endswith("_ml") and v}
        except ValueError:
            continue
        keys: dict[str, str] = {}
        for name in volumes:
            key = structure_key(name)
            if key is not None:
                keys.setdefault(key, name)
        out[row["case"]] = CaseMeasures(row["case"], volumes, keys)
    return out
