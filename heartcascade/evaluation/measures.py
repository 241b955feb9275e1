"""Clinical measures of cardiac segmentations: volumes, LV myocardial mass, EDV/ESV/SV/EF.

Definitions (documentation/measures.md):

* volume of a structure = its voxel count x voxel volume (product of the spacing, mm^3) / 1000, in mL;
* LV myocardial mass = myocardium volume x 1.05 g/mL (the density used in cardiac MR reporting);
* for an end-diastole (ED) / end-systole (ES) pair of the same patient and each of LV and RV (their
  blood pools): EDV, ESV, stroke volume SV = EDV - ESV and ejection fraction EF = SV / EDV x 100 %.

Which label is which structure comes from its name (``LV``, ``Myo``, ``RV`` and synonyms,
:func:`heartcascade.dataset.segments.structure_key`). ED/ES pairs come from a pairing file
(``patient,ed,es`` with case ids) or from the case names (:func:`pair_by_name`): ``<patient>_ED`` /
``<patient>_ES``, or two cases ``<patient>_frameNN`` of which the one with the larger LV volume is ED.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from heartcascade.dataset.segments import structure_key
from heartcascade.utils.errors import HCError

MYOCARDIUM_DENSITY_G_PER_ML = 1.05
#: Ventricles with EDV/ESV/SV/EF (their blood-pool labels).
VENTRICLES = ("lv", "rv")
_PHASE_RE = re.compile(r"^(?P<patient>.+?)[_-](?P<phase>ED|ES)$", re.IGNORECASE)
_FRAME_RE = re.compile(r"^(?P<patient>.+?)[_-]frame(?P<frame>\d+)$", re.IGNORECASE)


@dataclass
class CaseMeasures:
    """Measures of one segmentation."""

    case_id: str
    volumes_ml: dict[str, float]             # structure name -> mL (every named structure, 0 when absent)
    keys: dict[str, str] = field(default_factory=dict)  # "lv"/"myo"/"rv"... -> structure name

    def volume(self, key: str) -> float | None:
        name = self.keys.get(key)
        return self.volumes_ml.get(name) if name is not None else None

    @property
    def lv_mass_g(self) -> float | None:
        myo = self.volume("myo")
        return None if myo is None else myo * MYOCARDIUM_DENSITY_G_PER_ML


@dataclass
class PhasePair:
    """An ED/ES pair of one patient and its ventricular function."""

    patient: str
    ed: CaseMeasures
    es: CaseMeasures

    def function(self) -> dict[str, float | None]:
        """``lv_edv_ml, lv_esv_ml, lv_sv_ml, lv_ef_pct`` (and ``rv_*``), plus ``lv_mass_ed_g``."""
        out: dict[str, float | None] = {}
        for v in VENTRICLES:
            edv, esv = self.ed.volume(v), self.es.volume(v)
            out.update({f"{v}_edv_ml": edv, f"{v}_esv_ml": esv, **_stroke(v, edv, esv)})
        out["lv_mass_ed_g"] = self.ed.lv_mass_g
        return out


def _stroke(prefix: str, edv: float | None, esv: float | None) -> dict[str, float | None]:
    if edv is None or esv is None:
        return {f"{prefix}_sv_ml": None, f"{prefix}_ef_pct": None}
    sv = edv - esv
    return {f"{prefix}_sv_ml": sv, f"{prefix}_ef_pct": 100.0 * sv / edv if edv > 0 else None}


def structure_volumes_ml(labels: np.ndarray, spacing: Sequence[float], names: Mapping[int, str]) -> dict[str, float]:
    """Volume in mL of each named label value of ``labels`` (any axis order; ``spacing`` in mm)."""
    voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    count = dict(zip(values.tolist(), counts.tolist()))
    return {name: count.get(int(value), 0) * voxel_ml for value, name in names.items() if int(value) != 0}


def measure_case(case_id: str, labels: np.ndarray, spacing: Sequence[float], names: Mapping[int, str]) -> CaseMeasures:
    """Volumes of ``labels`` (file values, ``names``: value -> structure name) and which is LV/Myo/RV."""
    keys = {}
    for name in names.values():
        key = structure_key(name)
        if key is not None:
            keys.setdefault(key, name)
    return CaseMeasures(case_id, structure_volumes_ml(labels, spacing, names), keys)


def read_pairing_file(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """``(patient, ed case, es case)`` rows of a CSV with the header ``patient,ed,es``."""
    path = Path(path)
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig")))
        rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise HCError(f"{path}: cannot read the pairing file ({exc})") from None
    if not rows or not {"ed", "es"} <= set(rows[0]):
        raise HCError(f"{path}: expected a CSV with the header patient,ed,es (case ids of end-diastole and "
                      f"end-systole)")
    return [(r.get("patient") or r["ed"], r["ed"], r["es"]) for r in rows]


def pair_by_name(measures: Mapping[str, CaseMeasures]) -> list[tuple[str, str, str]]:
    """ED/ES pairs from case names: ``<patient>_ED`` + ``<patient>_ES``, or exactly two
    ``<patient>_frameNN`` cases (ED = the larger LV volume). Cases that fit neither rule stay unpaired."""
    phases: dict[str, dict[str, str]] = {}
    frames: dict[str, list[str]] = {}
    for case_id in sorted(measures):
        m = _PHASE_RE.match(case_id)
        if m:
            phases.setdefault(m["patient"], {})[m["phase"].upper()] = case_id
            continue
        m = _FRAME_RE.match(case_id)
        if m:
            frames.setdefault(m["patient"], []).append(case_id)
    pairs = [(p, d["ED"], d["ES"]) for p, d in sorted(phases.items()) if {"ED", "ES"} <= set(d)]
    for patient, ids in sorted(frames.items()):
        if len(ids) != 2:
            continue
        a, b = ids
        lv_a, lv_b = measures[a].volume("lv"), measures[b].volume("lv")
        if lv_a is None or lv_b is None:
            continue
        pairs.append((patient, a, b) if lv_a >= lv_b else (patient, b, a))
    return pairs


def make_pairs(measures: Mapping[str, CaseMeasures], pairing: Iterable[tuple[str, str, str]] | None = None) -> list[PhasePair]:
    """:class:`PhasePair` per pairing row (default: :func:`pair_by_name`); rows naming absent cases are skipped."""
    rows = pair_by_name(measures) if pairing is None else list(pairing)
    return [PhasePair(p, measures[ed], measures[es]) for p, ed, es in rows if ed in measures and es in measures]


# ---------------------------------------------------------------------------------------------------
# Tables

def _fmt(value: float | None, digits: int = 2) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _csv(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def case_table(measures: Sequence[CaseMeasures]) -> str:
    """``measures.csv``: one row per case, ``<structure>_ml`` columns and ``lv_mass_g``."""
    names: list[str] = []
    for m in measures:
        names += [n for n in m.volumes_ml if n not in names]
    header = ["case"] + [f"{n}_ml" for n in names] + ["lv_mass_g"]
    rows = [[m.case_id] + [_fmt(m.volumes_ml.get(n)) for n in names] + [_fmt(m.lv_mass_g)]
            for m in sorted(measures, key=lambda m: m.case_id)]
    return _csv(header, rows)


FUNCTION_COLUMNS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml",
                    "rv_ef_pct", "lv_mass_ed_g")


def function_table(pairs: Sequence[PhasePair]) -> str:
    """``cardiac_function.csv``: one row per ED/ES pair."""
    rows = []
    for pair in sorted(pairs, key=lambda p: p.patient):
        f = pair.function()
        rows.append([pair.patient, pair.ed.case_id, pair.es.case_id] + [_fmt(f[c]) for c in FUNCTION_COLUMNS])
    return _csv(["patient", "ed_case", "es_case", *FUNCTION_COLUMNS], rows)


# ---------------------------------------------------------------------------------------------------
# Reference against prediction

def match_key(case_id: str) -> str:
    """Case id used to match a reference to a prediction: a leading ``label_`` / ``image_`` / ``seg_``
    removed, so ``label_patient001_frame01`` matches ``image_patient001_frame01``."""
    return re.sub(r"^(label|labels|image|images|seg|pred)[_-]", "", case_id, flags=re.IGNORECASE)


def _mean_abs(pairs: Sequence[tuple[float | None, float | None]]) -> tuple[float | None, int]:
    diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
    return (float(np.mean(diffs)) if diffs else None), len(diffs)


def compare(reference: Mapping[str, CaseMeasures], prediction: Mapping[str, CaseMeasures],
            ref_pairs: Sequence[PhasePair]) -> dict[str, tuple[float | None, int]]:
    """Mean absolute error (and the number of cases / pairs it is over) of every structure volume (mL),
    the LV mass (g) and each ventricular function value, prediction against reference. The prediction's
    ED/ES pairs are the reference's (the same cases), so a phase is never judged against the other."""
    pred = {match_key(k): v for k, v in prediction.items()}
    matched = [(r, pred[match_key(k)]) for k, r in sorted(reference.items()) if match_key(k) in pred]
    if not matched:
        raise HCError("no case of the reference matches a case of the prediction (names differ)")
    out: dict[str, tuple[float | None, int]] = {}
    for name in matched[0][0].volumes_ml:
        out[f"{name}_ml"] = _mean_abs([(r.volumes_ml.get(name), p.volumes_ml.get(name)) for r, p in matched])
    out["lv_mass_g"] = _mean_abs([(r.lv_mass_g, p.lv_mass_g) for r, p in matched])
    paired = []
    for ref in ref_pairs:
        ed, es = pred.get(match_key(ref.ed.case_id)), pred.get(match_key(ref.es.case_id))
        if ed is not None and es is not None:
            paired.append((ref.function(), PhasePair(ref.patient, ed, es).function()))
    for column in FUNCTION_COLUMNS:
        out[column] = _mean_abs([(r[column], p[column]) for r, p in paired])
    return out


def comparison_table(errors: Mapping[str, tuple[float | None, int]]) -> str:
    return _csv(["measure", "mean_abs_error", "n"], [[k, _fmt(v, 3), str(n)] for k, (v, n) in errors.items()])
