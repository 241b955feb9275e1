"""A tiny synthetic dataset for the training tests (raw NIfTI files + preprocessed data + plans).

Cases are 48 x 48 x 24 voxels (x, y, z; spacing 2 mm) with three structures painted as
ellipsoids at jittered positions inside a "torso": a shell (label 1) around a nested one (label 2) and
one beside them (label 3), on a noisy background. Small enough to train all four steps on
two CPU cores in about a minute, yet each structure needs the image to be found.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import SimpleITK as sitk
import torch

LABELS = {"background": 0, "big": 1, "inner": 2, "side": 3}
SIZE_XYZ = (48, 48, 24)
SPACING_XYZ = (2.0, 2.0, 2.0)


def _ellipsoid(shape_zyx, spacing_zyx, centre_mm, radii_mm) -> np.ndarray:
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape_zyx, spacing_zyx)], indexing="ij")
    r = sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, centre_mm, radii_mm))
    return r <= 1.0


def make_case(index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, index])
    shape = tuple(reversed(SIZE_XYZ))  # (z, y, x)
    sp = tuple(reversed(SPACING_XYZ))
    ext = [n * s for n, s in zip(shape, sp)]  # 48 x 96 x 96 mm
    label = np.zeros(shape, dtype=np.uint8)
    torso = _ellipsoid(shape, sp, [e / 2 for e in ext], [e * 0.48 for e in ext])
    # Comparable volumes (about 3 : 1 : 2) so that the paper's inverse-count Dice weights stay balanced.
    c1 = np.array([24.0, 42.0, 40.0]) + rng.uniform(-4, 4, 3)
    big = _ellipsoid(shape, sp, c1, rng.uniform(11, 14, 3))
    inner = _ellipsoid(shape, sp, c1 + rng.uniform(-2, 2, 3), rng.uniform(7, 8.5, 3))
    # the third structure touches the first (like the RV beside the LV), so the whole "heart" is one blob
    direction = np.array([0.0, 0.6, 0.8]) + rng.uniform(-0.1, 0.1, 3)
    c3 = c1 + direction / np.linalg.norm(direction) * 20.0
    side = _ellipsoid(shape, sp, c3, rng.uniform(9, 11, 3))
    label[big] = 1
    label[inner] = 2
    label[side & ~big] = 3
    image = np.where(torso, 100.0, 0.0)
    image[label == 1] = 260.0
    image[label == 2] = 180.0
    image[label == 3] = 340.0
    image = image + rng.normal(0, 25.0, shape)
    return image.astype(np.float32), label


def make_dataset(raw_root: Path, num_cases: int = 5, seed: int = 0, dataset_id: int = 901,
                 preset: str = "demo") -> Path:
    """Write the raw dataset and run the real plan-and-preprocess step; returns the preprocessed folder."""
    from heartcascade.workflows.plan_and_preprocess import plan_and_preprocess

    name = f"Dataset{dataset_id:03d}_TinyTrain"
    raw = raw_root / name
    (raw / "imagesTr").mkdir(parents=True, exist_ok=True)
    (raw / "labelsTr").mkdir(parents=True, exist_ok=True)
    dataset_json = {"channel_names": {"0": "MR"}, "labels": dict(LABELS), "numTraining": num_cases,
                    "file_ending": ".nii.gz"}
    (raw / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    for i in range(num_cases):
        cid = f"tiny_{i:03d}"
        image, label = make_case(i, seed)
        img = sitk.GetImageFromArray(image)
        lab = sitk.GetImageFromArray(label)
        for obj in (img, lab):
            obj.SetSpacing(SPACING_XYZ)
            obj.SetOrigin((-10.0, 5.0, 30.0))
        sitk.WriteImage(img, str(raw / "imagesTr" / f"{cid}_0000.nii.gz"))
        sitk.WriteImage(lab, str(raw / "labelsTr" / f"{cid}.nii.gz"))
    result = plan_and_preprocess(dataset_id, preset=preset, num_processes=1, progress=False)
    if result.failed:
        raise RuntimeError(f"preprocessing failed: {result.failed}")
    return result.out_dir


@contextlib.contextmanager
def training_world(root: Path) -> Iterator[pytest.MonkeyPatch]:
    """HC_RAW / HC_PREPROCESSED / HC_RESULTS in ``root`` (raw/, pre/, res/), one torch thread and loaders in the
    main process: what module fixtures that train need to give the same numbers on every run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, var in (("raw", "HC_RAW"), ("pre", "HC_PREPROCESSED"), ("res", "HC_RESULTS")):
                (root / key).mkdir()
                mp.setenv(var, str(root / key))
            mp.setenv("HC_N_PROC_DA", "0")
            yield mp
    finally:
        torch.set_num_threads(threads)
