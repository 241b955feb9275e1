"""DICOM Segmentation (DICOM-SEG) of a prediction on a DICOM series, encoded by highdicom.

Why highdicom: the DICOM-SEG information object (per-frame functional groups, references to the source
instances, coded segment descriptions) is a standard that a PACS checks strictly; it is not written by
hand here. Each structure is one segment with its ``dataset.json`` name, its SNOMED-CT category
("Anatomical Structure") and type (e.g. "Left ventricle"), and the recommended display colour.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.sr.coding import Code
from pydicom.sr.codedict import codes

from heartcascade.dataset.segments import ANATOMICAL_STRUCTURE, Segment
from heartcascade.utils.atomic import atomic_path
from heartcascade.utils.errors import HCError

def _version() -> str:
    try:
        return version("heartcascade")
    except PackageNotFoundError:
        return "unknown"


#: Segmented property type of a structure without a known code: SCT 85756007 "Tissue".
_UNKNOWN_TYPE = ("85756007", "Tissue")


def series_files(folder: Path) -> list[str]:
    """The series' files in the order SimpleITK stacks them (the label map's z index)."""
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise HCError(f"{folder}: expected one DICOM series, found {len(ids)}")
    return list(reader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def segment_descriptions(segments: Sequence[Segment]) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(name="heartcascade", version=_version(),
                                                   family=codes.cid7162.ArtificialIntelligence)
    out = []
    for number, s in enumerate(segments, start=1):
        type_code, type_meaning = s.snomed or _UNKNOWN_TYPE
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=s.name,
            segmented_property_category=Code(ANATOMICAL_STRUCTURE[0], "SCT", ANATOMICAL_STRUCTURE[1]),
            segmented_property_type=Code(type_code, "SCT", type_meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*s.colour_255))
        out.append(description)
    return out


def write_dicom_seg(labels: np.ndarray, series_folder: Path, path: str | os.PathLike,
                    segments: Sequence[Segment], spacing: Sequence[float]) -> None:
    """Write ``labels`` (z, y, x, file values; the grid SimpleITK read from ``series_folder``, whose
    spacing (x, y, z) is ``spacing``) as a binary DICOM-SEG with one segment per structure, referencing
    the series' instances. Pixel measures are given explicitly (a series without SliceThickness works)."""
    files = series_files(series_folder)
    if len(files) != labels.shape[0]:
        raise HCError(f"{series_folder}: {len(files)} DICOM files but the label map has {labels.shape[0]} slices")
    sources = [pydicom.dcmread(f) for f in files]
    numbered = np.zeros(labels.shape, dtype=np.uint8)
    for number, s in enumerate(segments, start=1):
        numbered[labels == s.value] = number
    first = sources[0]
    thickness = float(getattr(first, "SliceThickness", None) or spacing[2])
    for ds in sources:  # highdicom reads it from every source; an in-memory copy, the files stay untouched
        if not getattr(ds, "SliceThickness", None):
            ds.SliceThickness = thickness
    measures = hd.PixelMeasuresSequence(pixel_spacing=(float(spacing[1]), float(spacing[0])),
                                        slice_thickness=thickness, spacing_between_slices=float(spacing[2]))
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=numbered, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(segments), series_instance_uid=hd.UID(),
        series_number=int(getattr(first, "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="heartcascade", manufacturer_model_name="heartcascade",
        software_versions=_version(), device_serial_number="none", series_description="heartcascade segmentation",
        pixel_measures=measures)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
