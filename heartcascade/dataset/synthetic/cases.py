"""Synthetic whole-heart CT/MR cases and datasets, deterministic per seed.

Two sources of anatomy:

* parametric (:func:`make_case`): a sampled heart (7 MM-WHS structures plus unlabelled walls, fat,
  great vessels) inside a torso (body, fat, muscle, lungs, liver, spine, ribs, sternum) with random
  pose, size, shape and spacing; see :mod:`heartcascade.dataset.synthetic.anatomy`;
* real label maps (:func:`make_case_from_labels`): the labelled heart of e.g. an MM-WHS label map,
  kept voxel for voxel with its geometry, with the torso fitted around it.

The class map is then rendered as contrast CT (HU) or bSSFP-like MR
(:mod:`heartcascade.dataset.synthetic.appearance`). Case ``index`` of ``seed`` draws from
``SeedSequence([seed, index])``, so cases are independent and byte-identical across runs.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS
from heartcascade.dataset.image_io import Geometry, is_image_file, label_array, read_image, strip_image_ending
from heartcascade.dataset.importers import remap_labels
from heartcascade.dataset.synthetic import anatomy as A
from heartcascade.dataset.synthetic import appearance
from heartcascade.dataset.writer import DatasetWriter
from heartcascade.utils.errors import HCError
from heartcascade.utils.progress import progress_bar

MODALITIES = ("ct", "mr")
SIZES = ("small", "full")
CHANNEL_NAMES = {"ct": "CT", "mr": "MR"}
# The directions of real scans: DICOM-like identity, or y flipped as in the MM-WHS CT NIfTI files.
DIRECTIONS = ((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


@dataclass
class SyntheticCase:
    """One generated case; arrays in SimpleITK order (z, y, x)."""

    image: np.ndarray        # int16: HU for CT, arbitrary units for MR
    label: np.ndarray        # uint8, 0..7 (MMWHS_LABELS)
    geometry: Geometry
    classes: np.ndarray | None = None  # tissue classes (synthetic_anatomy), kept only on request


@dataclass(frozen=True)
class Layout:
    """Where everything is: the voxel grid, the heart frame and the torso frame."""

    grid: A.Grid
    heart: A.Frame
    torso: A.Frame
    torso_shape: A.TorsoShape


def case_rng(seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise HCError(f"seed and case index must be >= 0, got seed {seed}, index {index}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def _check(modality: str, size: str = "small") -> None:
    if modality not in MODALITIES:
        raise HCError(f"modality must be one of {', '.join(MODALITIES)}, got {modality!r}")
    if size not in SIZES:
        raise HCError(f"size must be one of {', '.join(SIZES)}, got {size!r}")


def _waves(rng: np.random.Generator, scale: float) -> tuple[A.Wave, ...]:
    waves = []
    for _ in range(4):
        axis = int(rng.integers(3))
        source = int((axis + 1 + rng.integers(2)) % 3)
        waves.append(A.Wave(axis, source, float(rng.uniform(1.5, 3.5) * scale),
                            float(2 * np.pi / (rng.uniform(70, 150) * scale)), float(rng.uniform(0, 2 * np.pi))))
    return tuple(waves)


def _f32(value: float) -> float:
    return float(np.float32(value))


def sample_layout(rng: np.random.Generator, modality: str = "ct", size: str = "small") -> Layout:
    """Grid (size, spacing, direction, origin) and anatomy pose/scale for one case.

    ``small`` keeps CPU training fast: 64-96 voxels in-plane, about 32-64 slices (CT; thick-slice MR
    has 16-40) with the anatomy scaled so that the heart spans about half the field of view (the
    torso is cropped at the back). ``full`` is MM-WHS scale: CT 512x512x~200 at ~0.45x0.45x0.6 mm,
    MR ~256-320 in-plane at ~1.1 mm with ~1.6-2 mm slices, adult-sized anatomy.
    """
    _check(modality, size)
    if size == "small":
        if modality == "ct":
            n_xy = int(rng.integers(64, 97))
            s_xy = float(rng.uniform(1.5, 2.5))
            s_z = float(rng.uniform(max(s_xy, 1.6), 2.5))
            z_min, z_max = 32, 64
        else:
            n_xy = int(rng.integers(80, 97))
            s_xy = float(rng.uniform(1.25, 1.6))
            s_z = float(rng.uniform(3.0, 5.0))
            z_min, z_max = 16, 40
        scale = n_xy * s_xy / float(rng.uniform(195, 225))
        n_z = int(np.clip(round(150 * scale * rng.uniform(0.95, 1.1) / s_z), z_min, z_max))
    else:
        scale = float(rng.uniform(0.9, 1.1))
        if modality == "ct":
            n_xy = 512
            s_xy = float(rng.uniform(0.40, 0.50))
            s_z = float(rng.uniform(0.6, 0.7))
            n_z = int(round(140 * scale * rng.uniform(0.95, 1.05) / s_z))
        else:
            n_xy = int(rng.integers(256, 321))
            s_xy = float(rng.uniform(1.0, 1.25))
            s_z = float(rng.uniform(1.5, 2.0))
            n_z = int(round(170 * scale * rng.uniform(0.95, 1.05) / s_z))
    heart_c = np.array([rng.uniform(-20, 20), rng.uniform(-30, 10), rng.uniform(-200, -100)])
    heart_rot = A.rotation_xyz(rng.uniform(-10, 10, 3))
    body_rot = A.rotation_xyz((0.0, 0.0, rng.uniform(-4, 4)))
    torso_c = heart_c + scale * (A.TORSO_OFFSET + rng.uniform(-5, 5, 3) * np.array([1.0, 1.0, 0.0]))
    heart = A.Frame(tuple(heart_c), tuple(heart_rot.ravel()), scale, _waves(rng, scale))
    torso = A.Frame(tuple(torso_c), tuple(body_rot.ravel()), scale)
    # small: centred a little in front of the torso axis so chest wall, heart and vertebral body are in
    # view (the back is cropped) and the heart spans about half of the field of view
    fov_y = torso_c[1] - (rng.uniform(10, 25) if size == "small" else rng.uniform(-15, 5)) * scale
    fov_c = np.array([heart_c[0] + rng.uniform(-10, 10) * scale, fov_y, heart_c[2] + rng.uniform(-5, 10) * scale])
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    # round to values NIfTI (float32 header) stores exactly, so the written geometry equals this one
    spacing = tuple(_f32(round(v, 3)) for v in (s_xy, s_xy, s_z))
    size_xyz = np.array([n_xy, n_xy, n_z])
    dmat = np.asarray(direction).reshape(3, 3) * np.asarray(spacing)[None, :]
    origin = fov_c - dmat @ ((size_xyz - 1) / 2.0)
    grid = A.Grid((n_z, n_xy, n_xy), spacing, tuple(_f32(round(float(v), 2)) for v in origin), direction)
    return Layout(grid, heart, torso, A.TorsoShape.sample(rng))


def render_appearance(classes: np.ndarray, grid: A.Grid, modality: str, rng: np.random.Generator) -> np.ndarray:
    spacing_zyx = tuple(float(s) for s in grid.spacing[::-1])
    if modality == "ct":
        return appearance.render_ct(classes, spacing_zyx, rng)
    return appearance.render_mr(classes, spacing_zyx, rng)


def make_case(seed: int, index: int = 0, modality: str = "ct", size: str = "small",
              keep_classes: bool = False) -> SyntheticCase:
    """Parametric case ``index`` of ``seed``: same arguments → byte-identical arrays."""
    _check(modality, size)
    rng = case_rng(seed, index)
    layout = sample_layout(rng, modality, size)
    heart = A.heart_ops(rng, layout.heart)
    ops = A.torso_ops(rng, layout.torso, layout.torso_shape) + heart.ops + A.lung_vessel_ops(rng, layout.heart, heart.hila)
    classes = A.render(layout.grid, ops)
    A.remove_specks(classes)
    image = render_appearance(classes, layout.grid, modality, rng)
    return SyntheticCase(image, A.labels_from_classes(classes), layout.grid.geometry(), classes if keep_classes else None)


# ---------------------------------------------------------------------------------------------------
# From real label maps
# ---------------------------------------------------------------------------------------------------

def heart_frames_from_labels(label: np.ndarray, grid: A.Grid,
                             rng: np.random.Generator) -> tuple[A.Frame, A.Frame, A.TorsoShape, float]:
    """Heart frame, torso frame/shape and diaphragm level fitted to a real label map (labels 1..7).

    The heart centre is the centroid of the labelled voxels. The torso is placed so that the inner
    chest wall lies ~12 mm in front of the most anterior heart voxel, and made deep enough that the
    spine starts ~16 mm behind the most posterior LA voxel; the diaphragm follows the heart's lower
    border. Returns (heart, torso, shape, heart_z) for :func:`synthetic_anatomy.torso_ops`.
    """
    zyx = np.nonzero(label[::2, ::2, ::2])
    if zyx[0].size == 0:
        raise HCError("label map has no heart structures to build an image around")
    idx = np.stack([zyx[2], zyx[1], zyx[0]], axis=1).astype(float) * 2.0
    pts = grid.physical(idx)
    heart_c = pts.mean(axis=0)
    la = label[::2, ::2, ::2][zyx] == A.LA
    back = float(pts[la, 1].max()) if la.any() else float(pts[:, 1].max())
    front, bottom = float(pts[:, 1].min()), float(pts[:, 2].min())
    scale = float(rng.uniform(0.95, 1.1))
    shape = A.TorsoShape.sample(rng)
    depth = (back - front) / scale
    need = (depth + 28.0 + 2 * shape.t_fat + shape.t_mus + 62.0 + shape.r_vb) / 2.0
    if shape.by < need:
        shape = A.TorsoShape(shape.bx, need, shape.t_fat, shape.t_mus, shape.r_vb)
    torso_c = heart_c + scale * A.TORSO_OFFSET
    torso_c[1] = front - 12.0 * scale + shape.cavity_front * scale
    body_rot = A.rotation_xyz((0.0, 0.0, rng.uniform(-4, 4)))
    heart = A.Frame(tuple(heart_c), scale=scale)
    torso = A.Frame(tuple(torso_c), tuple(body_rot.ravel()), scale)
    heart_z = (bottom + 60.0 * scale - heart_c[2]) / scale
    return heart, torso, shape, heart_z


def structure_ellipsoids(label: np.ndarray, grid: A.Grid, step: int = 2) -> list[tuple[A.Frame, np.ndarray]]:
    """Moment ellipsoid (frame, radii) of each labelled structure: a smooth stand-in for its extent.

    A solid ellipsoid with semi-axis r has variance r^2/5 along that axis, so radii = sqrt(5 * eig).
    """
    sub = label[::step, ::step, ::step]
    out = []
    for value in range(1, int(sub.max(initial=0)) + 1):
        zyx = np.nonzero(sub == value)
        if zyx[0].size < 10:
            continue
        pts = grid.physical(np.stack([zyx[2], zyx[1], zyx[0]], axis=1).astype(float) * step)
        centre = pts.mean(axis=0)
        eig, vec = np.linalg.eigh(np.cov((pts - centre).T))
        if np.linalg.det(vec) < 0:
            vec[:, 0] = -vec[:, 0]
        radii = np.sqrt(5.0 * np.clip(eig, 1.0, None))
        out.append((A.Frame(tuple(centre), tuple(vec.ravel())), radii))
    return out


def _dilate_inplane_z(mask: np.ndarray, spacing_zyx: Sequence[float], mm: float) -> np.ndarray:
    out = mask
    n_xy = max(1, int(round(mm / min(spacing_zyx[1:]))))
    n_z = max(1, int(round(mm / spacing_zyx[0])))
    plane = np.zeros((1, 3, 3), bool)
    plane[0, 1, :] = plane[0, :, 1] = True
    line = np.zeros((3, 1, 1), bool)
    line[:, 0, 0] = True
    out = ndimage.binary_dilation(out, plane, iterations=n_xy)
    return ndimage.binary_dilation(out, line, iterations=n_z)


def classes_from_labels(label: np.ndarray, grid: A.Grid, rng: np.random.Generator) -> np.ndarray:
    """Tissue classes around a real heart: torso and lungs fitted, pericardial fat, unlabelled walls."""
    heart, torso, shape, heart_z = heart_frames_from_labels(label, grid, rng)
    ops = A.torso_ops(rng, torso, shape, heart_z)
    # pericardial fat hugging the heart: per structure, its moment ellipsoid grown by a margin
    for frame, radii in structure_ellipsoids(label, grid):
        grown = tuple(float(r) + 7.0 for r in radii)
        ops.append(A.Paint(A.EPIFAT, A.Ellipsoid(grown), frame, frozenset({A.SOFT, A.LUNG, A.MUSCLE, A.FAT})))
    # descending aorta behind the left atrium, and lung vessels from the hila
    la = np.nonzero(label[::2, ::2, ::2] == A.LA)
    if la[0].size:
        la_pts = grid.physical(np.stack([la[2], la[1], la[0]], axis=1).astype(float) * 2.0)
        desc = np.array([la_pts[:, 0].mean() + 22.0, la_pts[:, 1].max() + 14.0, 0.0])
    else:
        desc = np.asarray(heart.center) + np.array([20.0, 60.0, 0.0])
    r_desc = 11.0 * heart.scale
    ops.append(A.Paint(A.BLOOD, A.Cylinder(r_desc, r_desc), A.Frame((float(desc[0]), float(desc[1]), 0.0)),
                       frozenset({A.SOFT, A.LUNG, A.EPIFAT, A.MUSCLE})))
    hila = {"pa_l": np.array([60.0, 25.0, 25.0]), "pa_r": np.array([-60.0, 25.0, 25.0]),
            "pv_linf": np.array([55.0, 40.0, 0.0]), "pv_rinf": np.array([-60.0, 40.0, 0.0])}
    ops += A.lung_vessel_ops(rng, heart, hila)
    classes = A.render(grid, ops)
    # unlabelled chamber/vessel walls (~2.5 mm) around everything but the LV myocardium
    spacing_zyx = tuple(float(s) for s in grid.spacing[::-1])
    nz = np.nonzero(label[::2, ::2, ::2])
    box = tuple(slice(int(a.min()) * 2, int(a.max()) * 2 + 2) for a in nz)
    pad = [int(np.ceil(6.0 / s)) for s in spacing_zyx]
    crop = tuple(slice(max(0, b.start - p), min(n, b.stop + p)) for b, p, n in zip(box, pad, label.shape))
    sub = label[crop]
    chambers = (sub > 0) & (sub != A.MYO)
    wall = _dilate_inplane_z(chambers, spacing_zyx, 2.5) & (sub == 0)
    classes[crop][wall] = A.WALL
    heart_mask = label > 0
    classes[heart_mask] = label[heart_mask]
    return classes


def remap_mmwhs(array: np.ndarray, path: str | os.PathLike, unknown_to_background: bool = False) -> np.ndarray:
    """MM-WHS codes → training labels (shared with the MM-WHS importer)."""
    codes = {code: lab for lab, code in MMWHS_CODES.items()}
    return remap_labels(array, codes, path, stray={421: 4}, unknown_to_background=unknown_to_background)


def make_case_from_labels(label_path: str | os.PathLike, seed: int, index: int = 0, modality: str = "ct",
                          keep_classes: bool = False) -> SyntheticCase:
    """Image synthesised around a real MM-WHS-coded label map; label and geometry are the map's own."""
    _check(modality)
    label_path = Path(label_path)
    image = read_image(label_path)
    label = remap_mmwhs(label_array(image, label_path), label_path)
    if not label.any():
        raise HCError(f"{label_path}: label map has no heart structures to build an image around")
    return make_case_from_label_array(label, Geometry.of(image), seed, index, modality, keep_classes)


def make_case_from_label_array(label: np.ndarray, geometry: Geometry, seed: int, index: int = 0, modality: str = "ct",
                               keep_classes: bool = False) -> SyntheticCase:
    """As :func:`make_case_from_labels` for a training-label array (z, y, x) already in memory."""
    _check(modality)
    rng = case_rng(seed, index)
    grid = A.Grid.from_geometry(geometry)
    if tuple(label.shape) != grid.shape:
        raise HCError(f"label array of shape {label.shape} does not match geometry size {geometry.size}")
    label = label.astype(np.uint8)
    classes = classes_from_labels(label, grid, rng)
    image = render_appearance(classes, grid, modality, rng)
    return SyntheticCase(image, label, geometry, classes if keep_classes else None)


# ---------------------------------------------------------------------------------------------------
# Whole datasets
# ---------------------------------------------------------------------------------------------------

def label_map_files(folder: str | os.PathLike) -> list[Path]:
    """Label maps in a folder for --from-labels (every image file, sorted by name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HCError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if is_image_file(p))
    if not files:
        raise HCError(f"{folder}: no label map files (.nii.gz, .nii, .nrrd, .mha)")
    return files


def _case_id_from_file(path: Path) -> str:
    stem = re.sub(r"_label$", "", strip_image_ending(path.name), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9-]+", "_", stem).strip("_") or "case"


def make_synthetic_dataset(dataset_id: int, num_training: int, modality: str = "ct", seed: int = 0,
                           size: str = "small", num_test: int = 0, name: str | None = None,
                           from_labels: str | os.PathLike | None = None, overwrite: bool = False,
                           progress: bool = True) -> Path:
    """Write a raw dataset of synthetic cases (imagesTr/labelsTr and imagesTs/labelsTs); returns its folder.

    Parametric cases are ``case_000``... (training) followed by the test cases, case i drawn from
    ``SeedSequence([seed, i])``. With ``from_labels`` the first ``num_training`` label maps of that
    folder (sorted) become training cases and the next ``num_test`` test cases; ``size`` does not
    apply (the maps keep their geometry).
    """
    _check(modality, size)
    if num_training < 1:
        raise HCError(f"-n must be at least 1, got {num_training}")
    if num_test < 0:
        raise HCError(f"--n-test must be >= 0, got {num_test}")
    if from_labels is not None:
        files = label_map_files(from_labels)
        train_files = files[:num_training]
        test_files = files[num_training:num_training + num_test]
        if len(train_files) < num_training or len(test_files) < num_test:
            print(f"note: {from_labels} holds {len(files)} label map(s); using {len(train_files)} for training and "
                  f"{len(test_files)} for testing", file=sys.stderr)
        jobs = [(f, False) for f in train_files] + [(f, True) for f in test_files]
        name = name or f"SyntheticLabels{modality.upper()}"
        extra_source = {"from_labels": str(Path(from_labels).resolve())}
    else:
        jobs = [(i, i >= num_training) for i in range(num_training + num_test)]
        name = name or f"Synthetic{modality.upper()}"
        extra_source = {"size": size}
    protect = [Path(from_labels)] if from_labels is not None else []
    with DatasetWriter(dataset_id, name, overwrite, protect=protect) as out:
        seen: dict[str, object] = {}
        for index, (job, test) in enumerate(progress_bar(jobs, enabled=progress, desc="synthesising",
                                                         unit="case")):
            if isinstance(job, Path):
                case = make_case_from_labels(job, seed, index, modality)
                case_id = _case_id_from_file(job)
            else:
                case = make_case(seed, job, modality, size)
                case_id = f"case_{job:03d}"
            if case_id in seen:
                raise HCError(f"{job}: case id {case_id} clashes with {seen[case_id]}")
            seen[case_id] = job
            out.write_case(case_id, [case.image], case.label, case.geometry, test=test)
            del case
        extra = {"description": f"synthetic {modality.upper()} whole-heart dataset generated by heartcascade",
                 "synthetic": {"seed": int(seed), "modality": modality, **extra_source}}
        return out.commit({"0": CHANNEL_NAMES[modality]}, MMWHS_LABELS,
                          MMWHS_CODES if from_labels is not None else None, extra)
