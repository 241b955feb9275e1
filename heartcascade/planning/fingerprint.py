"""Dataset fingerprint: what the planner needs to know about the raw training data.

Computed once per dataset (``dataset_fingerprint.json`` in the preprocessed dataset folder) and reused
until the raw files change. Per case it records geometry (spacing, size, slice axis, canonical spacing
and shape), the body crop and the cropped shape (Net1 sees cropped volumes, so its field of view is the
*cropped* extent), the foreground (label > 0) bounding box in voxels and mm, intensity statistics of the
foreground voxels per channel, voxel counts per class and each class's brightness: its mean intensity on
the case's own 0.5-99.5 percentile window of the body crop mapped to [0, 1] (the window MR normalisation
uses), which the planner's test-time brightening rule takes its target from. Dataset-level aggregates (medians, 95th
percentiles, pooled intensity percentiles) are computed from those.

Memory is bounded: each case contributes at most ``SAMPLES_PER_CASE`` foreground intensities per channel
to the pooled percentiles (all of them when it has fewer, which makes the statistics exact for small
datasets); mean and std are exact, accumulated in float64 over every foreground voxel.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from heartcascade.dataset import image_io, size_limits
from heartcascade.dataset.dataset_json import Case, DatasetInfo
from heartcascade.preprocessing import cropping, normalization
from heartcascade.preprocessing.preprocess import read_labels
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.errors import HCError
from heartcascade.utils.jsonio import load_json
from heartcascade.utils.progress import bars_enabled, progress_bar

FINGERPRINT_FILE = "dataset_fingerprint.json"
FINGERPRINT_VERSION = 2
SAMPLES_PER_CASE = 10_000
PERCENTILES = (0.5, 99.5)


def file_stamp(paths: Sequence[Path | None]) -> list[list]:
    """(name, size, mtime_ns) of input files: cheap change detection for re-runs."""
    out = []
    for p in paths:
        if p is None:
            continue
        st = Path(p).stat()
        out.append([str(Path(p).name), int(st.st_size), int(st.st_mtime_ns)])
    return out


def case_stamp(case: Case) -> list[list]:
    return file_stamp(list(case.images) + [case.label])


def fingerprint_case(case: Case, modality: str, num_classes: int, seed: int = 0,
                     margin_mm: float = cropping.DEFAULT_MARGIN_MM) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Fingerprint of one training case and its foreground intensity samples (one array per channel)."""
    if case.label is None:
        raise HCError(f"case {case.case_id}: no label file; the fingerprint needs labelled training cases")
    images = [image_io.read_image(p) for p in case.images]
    label_img = image_io.read_image(case.label)
    geometry = image_io.Geometry.of(images[0])
    for c, (path, img) in enumerate(zip(case.images, images)):
        diff = geometry.mismatch(image_io.Geometry.of(img))
        if diff:
            raise HCError(f"{path}: channel {c} is not on the grid of channel 0 ({diff})")
    diff = geometry.mismatch(image_io.Geometry.of(label_img))
    if diff:
        raise HCError(f"{case.label}: label is not on the image grid ({diff})")
    seg = read_labels(label_img, num_classes, str(case.label))
    spacing_xyz = image_io.working_spacing(geometry.spacing)
    slice_axis = image_io.choose_slice_axis(spacing_xyz, geometry.direction)
    spacing_zyx = tuple(reversed(spacing_xyz))
    first = sitk.GetArrayViewFromImage(images[0])
    bbox = cropping.body_bbox(first, spacing_zyx, modality, margin_mm)
    margin_vox = [int(math.ceil(margin_mm / s)) for s in spacing_zyx]
    fg_box = cropping.label_bbox(seg, margin_vox)
    bbox = cropping.union_bbox(bbox, fg_box)
    axes = image_io.canonical_axes(slice_axis)
    cropped_zyx = [b - a for a, b in bbox]
    cropped = [int(cropped_zyx[a]) for a in axes]
    spacing = image_io.canonical_spacing(spacing_xyz, slice_axis)

    fg_exact = cropping.label_bbox(seg)
    if fg_exact is None:
        fg_box_canon = None
        fg_extent_mm = [0.0, 0.0, 0.0]
    else:
        fg_box_canon = [list(fg_exact[a]) for a in axes]
        fg_extent_mm = [(b - a) * s for (a, b), s in zip(fg_box_canon, spacing)]

    counts = torch.bincount(torch.from_numpy(seg).ravel(), minlength=num_classes).numpy()
    mask = seg > 0
    rng = np.random.default_rng(seed)
    intensity, samples = [], []
    n_fg = int(counts[1:].sum())
    pick = None
    if n_fg > SAMPLES_PER_CASE:
        pick = np.sort(rng.choice(n_fg, SAMPLES_PER_CASE, replace=False))
    for img in images:
        values = sitk.GetArrayViewFromImage(img)[mask].astype(np.float64)
        if values.size == 0:
            intensity.append(None)
            samples.append(np.zeros(0, dtype=np.float32))
            continue
        sample = values if pick is None else values[pick]
        lo, hi = np.percentile(sample, PERCENTILES)
        intensity.append({"n": int(values.size), "sum": float(values.sum()), "sum_sq": float(np.square(values).sum()),
                          "mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
                          "max": float(values.max()), "percentile_00_5": float(lo), "percentile_99_5": float(hi)})
        samples.append(sample.astype(np.float32))
    crop = tuple(slice(a, b) for a, b in bbox)
    brightness = [class_brightness(sitk.GetArrayViewFromImage(img)[crop], seg[crop], num_classes) for img in images]
    record = {
        "case_id": case.case_id,
        "size_xyz": [int(n) for n in geometry.size],
        "spacing_xyz": list(spacing_xyz),
        "direction": [float(v) for v in geometry.direction],
        "slice_axis": int(slice_axis),
        "spacing": [float(s) for s in spacing],
        "shape": [int(n) for n in image_io.canonical_shape(geometry.size, slice_axis)],
        "crop_bbox_zyx": [[int(a), int(b)] for a, b in bbox],
        "cropped_shape": cropped,
        "cropped_extent_mm": [n * s for n, s in zip(cropped, spacing)],
        "foreground_bbox": fg_box_canon,
        "foreground_extent_mm": fg_extent_mm,
        "class_voxels": [int(n) for n in counts],
        "intensity": intensity,
        "class_brightness": brightness,
        "stamp": case_stamp(case),
    }
    return record, samples


def class_brightness(array: np.ndarray, seg: np.ndarray, num_classes: int) -> list[float | None]:
    """Mean of each class (None where absent) on the image's own 0.5-99.5 percentile window mapped to [0, 1]:
    how bright a structure is in the terms percentile normalisation leaves, comparable across scanners."""
    lo, hi = normalization.case_percentiles(array, *PERCENTILES)
    return normalization.class_window_means(array, seg, lo, hi, num_classes)


def _worker(args: tuple) -> tuple[str, Any, Any]:
    case, modality, num_classes, seed = args
    try:
        record, samples = fingerprint_case(case, modality, num_classes, seed)
        return case.case_id, record, samples
    except HCError as exc:
        return case.case_id, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - report any failure with the case name
        return case.case_id, None, f"{type(exc).__name__}: {exc}"


def excluded_cases(fingerprint: dict[str, Any], K: int) -> dict[str, str]:
    """Training cases the plan leaves out, with the reason: too small for any network, or (the planner's
    rule) fewer cropped slices than the plan's K."""
    out = dict(fingerprint.get("too_small_cases") or {})
    for rec in fingerprint.get("cases", []):
        if rec["case_id"] not in out:
            reason = size_limits.too_small(rec["cropped_shape"], min_slices=K)
            if reason:
                out[rec["case_id"]] = reason.replace("K needs", f"the plan's K = {K} needs")
    return out


def _pct(values: Sequence[Sequence[float]], q: float) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(values, dtype=float), q, axis=0)]


def aggregate(records: list[dict[str, Any]], samples: list[list[np.ndarray]], info: DatasetInfo) -> dict[str, Any]:
    """Dataset-level summary (all spatial quantities in canonical (D, H, W) order)."""
    spacing = [r["spacing"] for r in records]
    cropped = [r["cropped_shape"] for r in records]
    extent = [r["cropped_extent_mm"] for r in records]
    fg = [r["foreground_extent_mm"] for r in records]
    inplane = [s for r in records for s in r["spacing"][1:]]
    intensity = []
    for c in range(info.num_channels):
        stats = [r["intensity"][c] for r in records if r["intensity"][c] is not None]
        pooled = np.concatenate([s[c] for s in samples if s[c].size]) if stats else np.zeros(0)
        if not stats:
            intensity.append(None)
            continue
        n = sum(s["n"] for s in stats)
        mean = sum(s["sum"] for s in stats) / n
        var = max(0.0, sum(s["sum_sq"] for s in stats) / n - mean * mean)
        lo, hi = np.percentile(pooled.astype(np.float64), PERCENTILES)
        intensity.append({"n": int(n), "mean": float(mean), "std": float(math.sqrt(var)),
                          "min": float(min(s["min"] for s in stats)), "max": float(max(s["max"] for s in stats)),
                          "percentile_00_5": float(lo), "percentile_99_5": float(hi),
                          "num_samples": int(pooled.size)})
    voxel_mm3 = [float(np.prod(r["spacing"])) for r in records]
    class_volume = np.array([[n * v for n in r["class_voxels"]] for r, v in zip(records, voxel_mm3)])
    return {
        "num_cases": len(records),
        "spacing": {"median": _pct(spacing, 50), "min": [float(v) for v in np.min(spacing, 0)],
                    "max": [float(v) for v in np.max(spacing, 0)]},
        "inplane_spacing_ratio": float(max(inplane) / min(inplane)),
        "inplane_spacing_median": float(np.median(inplane)),
        "shape": {"median": _pct([r["shape"] for r in records], 50)},
        "cropped_shape": {"median": _pct(cropped, 50), "p95": _pct(cropped, 95),
                          "min": [int(v) for v in np.min(cropped, 0)], "max": [int(v) for v in np.max(cropped, 0)]},
        "fov_mm": {"median": _pct(extent, 50), "p95": _pct(extent, 95), "max": [float(v) for v in np.max(extent, 0)]},
        "foreground_extent_mm": {"median": _pct(fg, 50), "p95": _pct(fg, 95), "max": [float(v) for v in np.max(fg, 0)]},
        "min_slices": int(min(c[0] for c in cropped)),
        "intensity": intensity,
        "class_voxels_total": [int(v) for v in np.sum([r["class_voxels"] for r in records], 0)],
        "class_volume_mm3": {"median": [float(v) for v in np.median(class_volume, 0)],
                             "min": [float(v) for v in np.min(class_volume, 0)]},
        "class_brightness_median": [_median_brightness(records, c, info.num_classes) for c in range(info.num_channels)],
        "class_present_in_cases": [int(v) for v in np.sum(np.array([r["class_voxels"] for r in records]) > 0, 0)],
    }


def _median_brightness(records: list[dict[str, Any]], channel: int, num_classes: int) -> list[float | None]:
    """Per class, the median over cases of :func:`class_brightness` (None for a class no case has)."""
    out = []
    for c in range(num_classes):
        values = [r["class_brightness"][channel][c] for r in records if r["class_brightness"][channel][c] is not None]
        out.append(float(np.median(values)) if values else None)
    return out


def compute_fingerprint(info: DatasetInfo, num_processes: int = 1, progress: bool = True) -> dict[str, Any]:
    """Fingerprint every training case (in ``num_processes`` worker processes) and aggregate."""
    cases = info.training_cases()
    if not cases:
        raise HCError(f"{info.folder / 'imagesTr'}: no training cases found")
    missing = [c.case_id for c in cases if c.label is None]
    if missing:
        raise HCError(f"{info.folder / 'labelsTr'}: no label for case(s) {', '.join(missing[:5])}")
    for case in cases:
        for path in case.images:
            if not path.is_file():
                raise HCError(f"{path}: image file missing (dataset.json lists {info.num_channels} channel(s))")
    jobs = [(case, info.modality, info.num_classes, i) for i, case in enumerate(cases)]
    results = _map(_worker, jobs, num_processes, progress, "fingerprint")
    stamps = {c.case_id: case_stamp(c) for c in cases}
    failed = {cid: {"error": err, "stamp": stamps[cid]} for cid, rec, err in results if rec is None}
    # failed cases are reported (once, naming the file) by preprocessing, which refuses them too
    if len(failed) == len(results):
        first = next(iter(failed.items()))
        raise HCError(f"fingerprint failed for every case, e.g. {first[0]}: {first[1]['error']}")
    too_small = {}
    for cid, rec, _ in results:
        reason = size_limits.too_small(rec["cropped_shape"]) if rec is not None else None
        if reason:
            too_small[cid] = reason  # reported by preprocessing, which refuses the case
    usable = [(rec, smp) for cid, rec, smp in results if rec is not None and cid not in too_small]
    if not usable:
        first = next(iter(too_small.items()))
        raise HCError(f"every training case is too small for the network, e.g. {first[0]}: {first[1]}")
    records = [rec for rec, _ in usable]
    samples = [smp for _, smp in usable]
    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "dataset": info.folder.name,
        "modality": info.modality,
        "num_channels": info.num_channels,
        "num_classes": info.num_classes,
        "dataset_json_stamp": file_stamp([info.folder / "dataset.json"]),
        **aggregate(records, samples, info),
        "cases": records + [rec for cid, rec, _ in results if cid in too_small],
        "failed_cases": failed,
        "too_small_cases": too_small,
    }


def _map(fn, jobs: list, num_processes: int, progress: bool, desc: str) -> list:
    """Run ``fn`` over ``jobs`` in worker processes (spawned: safe with torch/OpenMP), keeping order."""
    bar = progress_bar(total=len(jobs), desc=desc, unit="case", leave=False) if bars_enabled(progress) else None
    out = []
    if num_processes <= 1 or len(jobs) <= 1 or _input_bytes(jobs) < _SMALL_INPUT_BYTES:
        for job in jobs:
            out.append(fn(job))
            if bar:
                bar.update()
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(num_processes, len(jobs)), initializer=_limit_threads, initargs=(1,)) as pool:
            for result in pool.imap(fn, jobs):
                out.append(result)
                if bar:
                    bar.update()
    if bar:
        bar.close()
    return out


_SMALL_INPUT_BYTES = 32 * 1024 ** 2  # below this, starting worker processes costs more than it saves


def _input_bytes(jobs: list) -> int:
    total = 0
    for job in jobs:
        case = job[0]
        for p in list(case.images) + [case.label]:
            if p is not None and Path(p).is_file():
                total += Path(p).stat().st_size
    return total


def _limit_threads(n: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def fingerprint_is_current(fingerprint: dict[str, Any], info: DatasetInfo) -> bool:
    """True when the stored fingerprint was made from exactly the current training files."""
    if fingerprint.get("fingerprint_version") != FINGERPRINT_VERSION:
        return False
    try:
        cases = info.training_cases()
        stamps = {c.case_id: case_stamp(c) for c in cases}
    except (HCError, OSError):
        return False
    stored = {r["case_id"]: r.get("stamp") for r in fingerprint.get("cases", [])}
    stored.update({cid: entry.get("stamp") for cid, entry in (fingerprint.get("failed_cases") or {}).items()})
    return stamps == stored and fingerprint.get("dataset_json_stamp") == file_stamp([info.folder / "dataset.json"])


def save_fingerprint(path: str | os.PathLike, fingerprint: dict[str, Any]) -> None:
    atomic_write_json(path, fingerprint)


def load_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    data = load_json(path)
    if data.get("fingerprint_version") != FINGERPRINT_VERSION:
        raise HCError(f"{path}: fingerprint version {data.get('fingerprint_version')} is not {FINGERPRINT_VERSION}; rerun with --overwrite")
    return data


def get_fingerprint(info: DatasetInfo, out_dir: Path, num_processes: int = 1, overwrite: bool = False,
                    progress: bool = True) -> dict[str, Any]:
    """Load ``out_dir/dataset_fingerprint.json`` when current, else compute and save it."""
    path = Path(out_dir) / FINGERPRINT_FILE
    if path.is_file() and not overwrite:
        try:
            fp = load_fingerprint(path)
            if fingerprint_is_current(fp, info):
                return fp
        except HCError:
            pass
    fp = compute_fingerprint(info, num_processes, progress)
    save_fingerprint(path, fp)
    return fp
