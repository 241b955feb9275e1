"""Preprocessed cases as the loaders see them (:class:`TrainCase`), for the cascade and the baseline grid."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from heartcascade.preprocessing.preprocess import sample_class_locations
from heartcascade.preprocessing.resampling import resample_image, resample_labels, shape_for_spacing
from heartcascade.preprocessing.storage import load_case
from heartcascade.training.dataloading import TrainCase


def load_train_case(data_dir: Path, case_id: str) -> TrainCase:
    """A preprocessed case, memory-mapped (full-resolution and coarse grids, class locations)."""
    pc = load_case(data_dir, case_id, mmap=True)
    props = pc.properties
    spacing = tuple(float(s) for s in props.get("spacing", (1.0, 1.0, 1.0)))
    return TrainCase(case_id=case_id, image=pc.image, seg=pc.seg, spacing=spacing,  # type: ignore[arg-type]
                     locations={int(k): v for k, v in pc.class_locations.items()},
                     coarse_image=pc.coarse_image, coarse_seg=pc.coarse_seg,
                     coarse_spacing=tuple(float(s) for s in props.get("coarse_spacing", spacing)),  # type: ignore[arg-type]
                     factors=tuple(float(f) for f in props.get("coarse_scale_factors", (1, 1, 1))),  # type: ignore[arg-type]
                     properties=props,
                     coarse_locations={int(k): v for k, v in pc.coarse_class_locations.items()})


def baseline_grid_case(case: TrainCase, spacing: tuple[float, float, float], num_classes: int) -> TrainCase:
    """The case resampled to the baseline's spacing (computed once, kept in memory).

    The class locations are sampled with a seed from the case id, so every run (and resume) samples the
    same subvolumes.
    """
    shape = shape_for_spacing(case.shape, case.spacing, spacing)
    image = resample_image(np.array(case.image, dtype=np.float32), shape, mode="auto")
    seg = resample_labels(np.array(case.seg), shape, num_classes)
    new_spacing = tuple(s * n / m for s, n, m in zip(case.spacing, case.shape, shape))
    locs = sample_class_locations(seg, num_classes, seed=zlib.crc32(case.case_id.encode("utf-8")))
    return TrainCase(case_id=case.case_id, image=image, seg=seg, spacing=new_spacing,  # type: ignore[arg-type]
                     locations={int(k): v for k, v in locs.items()}, properties=case.properties)
