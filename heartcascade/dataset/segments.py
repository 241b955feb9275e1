"""What each label value of a segmentation is: name, display colour and standard (SNOMED-CT) codes.

Why one place: the overlays, the ITK-SNAP label file, the 3D Slicer ``.seg.nrrd`` and the DICOM-SEG all
describe the same structures; they take names from ``dataset.json`` ``labels`` and colours and codes from
the table below, so a structure looks and is coded the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

#: One colour (RGB 0..1) per MM-WHS structure, in the canonical label order LV, Myo, RV, LA, RA, AA, PA;
#: further labels cycle through them (overlays use the same colours).
STRUCTURE_COLOURS: tuple[tuple[float, float, float], ...] = (
    (0.90, 0.10, 0.10), (0.95, 0.75, 0.10), (0.15, 0.45, 0.95), (0.60, 0.20, 0.80),
    (0.10, 0.75, 0.75), (0.95, 0.45, 0.70), (0.30, 0.80, 0.25),
)

#: SNOMED-CT (scheme "SCT") code value and meaning per structure name (lower case, with common
#: synonyms). Category of every structure: 91723000 "Anatomical Structure". Codes as in pydicom's
#: ``pydicom.sr.codedict.codes.SCT`` (LeftVentricle, LeftVentricleMyocardium, RightVentricle, LeftAtrium,
#: RightAtrium, AscendingAorta, PulmonaryArtery, Heart).
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
_SNOMED: dict[str, tuple[str, str]] = {
    "lv": ("87878005", "Left ventricle"),
    "myo": ("49848007", "Left Ventricle Myocardium"),
    "rv": ("53085002", "Right ventricle"),
    "la": ("82471001", "Left atrium"),
    "ra": ("73829009", "Right atrium"),
    "aa": ("54247002", "Ascending aorta"),
    "pa": ("81040000", "Pulmonary artery"),
    "heart": ("80891009", "Heart"),
}
_SYNONYMS = {
    "lv": "lv", "left_ventricle": "lv", "lv_blood_pool": "lv", "lvbp": "lv", "lv_cavity": "lv",
    "myo": "myo", "myocardium": "myo", "lv_myocardium": "myo", "lvm": "myo",
    "rv": "rv", "right_ventricle": "rv", "rv_blood_pool": "rv", "rv_cavity": "rv",
    "la": "la", "left_atrium": "la", "ra": "ra", "right_atrium": "ra",
    "aa": "aa", "aorta": "aa", "ascending_aorta": "aa", "ao": "aa",
    "pa": "pa", "pulmonary_artery": "pa", "heart": "heart", "whole_heart": "heart",
}
_MMWHS_ORDER = ("lv", "myo", "rv", "la", "ra", "aa", "pa")


def structure_key(name: str) -> str | None:
    """``"LV"``, ``"left ventricle"``, ``"LV_blood_pool"`` -> ``"lv"``; None for an unknown structure."""
    return _SYNONYMS.get(name.strip().lower().replace(" ", "_").replace("-", "_"))


@dataclass(frozen=True)
class Segment:
    """One label value of a written segmentation."""

    value: int                              # voxel value in the written file
    name: str
    colour: tuple[float, float, float]      # RGB 0..1
    snomed: tuple[str, str] | None          # (code value, meaning) of the structure, None when unknown

    @property
    def colour_255(self) -> tuple[int, int, int]:
        return tuple(int(round(c * 255)) for c in self.colour)  # type: ignore[return-value]


def segments_from_labels(labels: Mapping[str, int], label_codes: Mapping[int, int] | None = None) -> list[Segment]:
    """Segments of ``dataset.json`` ``labels`` ({"background": 0, "LV": 1, ...}), written as ``label_codes``
    (training label -> file value) when given; sorted by training label. Known cardiac structures get their
    MM-WHS colour whatever their label number, others the colour of their position."""
    out = []
    for name, label in sorted(labels.items(), key=lambda kv: int(kv[1])):
        label = int(label)
        if label == 0:
            continue
        key = structure_key(name)
        index = _MMWHS_ORDER.index(key) if key in _MMWHS_ORDER else label - 1
        value = int(label_codes.get(label, label)) if label_codes else label
        out.append(Segment(value, name, STRUCTURE_COLOURS[index % len(STRUCTURE_COLOURS)],
                           _SNOMED.get(key) if key else None))
    return out
