"""Writing a predicted label map in the format a clinical tool reads best.

========== ============== ===============================================================
format     file ending    what it carries beyond the voxels
========== ============== ===============================================================
nifti      ``.nii.gz``    ``itksnap_labels.txt`` beside it (ITK-SNAP label descriptions)
nrrd       ``.nrrd``      nothing (plain label map)
seg.nrrd   ``.seg.nrrd``  3D Slicer segment names, colours, label values, SNOMED-CT tags
dicom-seg  ``.dcm``       DICOM Segmentation (highdicom) referencing the input series, SNOMED-CT coded
========== ============== ===============================================================

The format follows the output file's ending (:func:`format_of`), so one dispatcher,
:func:`write_segmentation`, serves every caller.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.dataset.segformats.seg_nrrd import write_seg_nrrd
from heartcascade.dataset.segments import Segment
from heartcascade.utils.errors import HCError

#: ``--output-format`` choices and the ending each writes.
FORMAT_ENDINGS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "seg.nrrd": ".seg.nrrd", "dicom-seg": ".dcm"}


def format_of(path: str | os.PathLike) -> str:
    """The format a path's ending asks for (``other`` for MHA and the like, written as a plain image)."""
    name = Path(path).name.lower()
    if name.endswith(".seg.nrrd"):
        return "seg.nrrd"
    if name.endswith(".dcm"):
        return "dicom-seg"
    if name.endswith((".nii.gz", ".nii")):
        return "nifti"
    if name.endswith(".nrrd"):
        return "nrrd"
    return "other"


def write_segmentation(labels: np.ndarray, geometry: Geometry, path: str | os.PathLike,
                       segments: Sequence[Segment], reference: str | os.PathLike | None = None) -> None:
    """Write ``labels`` (z, y, x, file values) to ``path`` in the format of its ending; atomic.

    ``reference``: the image file the geometry came from (NIfTI: its header is reused) or, for
    DICOM-SEG, the DICOM series folder the segmentation refers to.
    """
    fmt = format_of(path)
    if fmt == "seg.nrrd":
        write_seg_nrrd(labels, geometry, path, segments)
    elif fmt == "dicom-seg":
        if reference is None or not Path(reference).is_dir():
            raise HCError(f"{path}: DICOM-SEG output needs a DICOM series as input (got {reference})")
        from heartcascade.dataset.segformats.dicom_seg import write_dicom_seg  # deferred: highdicom, only for DICOM-SEG

        write_dicom_seg(labels, Path(reference), path, segments, geometry.spacing)
    else:
        image_io.write_array(labels, geometry, path,
                             reference=reference if reference is not None and Path(reference).is_file() else None)
