"""ITK-SNAP label description file (``Segmentation > Import Label Descriptions``) for NIfTI outputs.

Format, one line per label: ``IDX R G B A VIS MSH "LABEL"`` (colours 0..255, alpha 0..1, visibility and
mesh visibility 0/1); lines starting with ``#`` are comments.
"""
from __future__ import annotations

import os
from typing import Sequence

from heartcascade.dataset.segments import Segment
from heartcascade.utils.atomic import atomic_write_text

#: File name written once per output folder.
ITKSNAP_LABELS_FILE = "itksnap_labels.txt"


def itksnap_label_text(segments: Sequence[Segment]) -> str:
    lines = ["# ITK-SNAP Label Description File (written by heartcascade)",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL",
             '    0     0    0    0  0.00   0   0  "Clear Label"']
    for s in segments:
        r, g, b = s.colour_255
        name = s.name.replace('"', "'")
        lines.append(f'{s.value:5d} {r:5d}{g:5d}{b:5d}  1.00   1   1  "{name}"')
    return "\n".join(lines) + "\n"


def write_itksnap_labels(path: str | os.PathLike, segments: Sequence[Segment]) -> None:
    atomic_write_text(path, itksnap_label_text(segments))
