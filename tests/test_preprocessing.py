"""Preprocessing: crop/transpose round trip, normalisation, resampling, storage, the driver."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from heartcascade.dataset.dataset_json import DatasetInfo, write_dataset_json
from heartcascade.dataset.image_io import Geometry, choose_slice_axis, write_array
from heartcascade.preprocessing import cropping, normalization, resampling, storage
from heartcascade.preprocessing.preprocess import (
    PreprocessSettings,
    coarse_shape,
    preprocess_case,
    preprocess_images,
    restore_to_original,
    sample_class_locations,
)
from heartcascade.utils.errors import HCError

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _oblique_direction() -> tuple[float, ...]:
    """A rotation about an oblique axis (columns = index axes in physical space)."""
    a, b = math.radians(25), math.radians(-15)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def make_volume(size_xyz=(40, 36, 20), spacing=(1.0, 1.0, 2.0), modality="ct", seed=0, table=True,
                thin_class: int | None = None):
    """A CT/MR-like (z, y, x) image and labels 0..3: body ellipse, three ellipsoid 'heart' blobs, a table."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    # physical coordinates relative to the centre, mm
    px, py, pz = (x - nx / 2) * spacing[0], (y - ny / 2) * spacing[1], (z - nz / 2) * spacing[2]
    extent = np.array([nx * spacing[0], ny * spacing[1], nz * spacing[2]])
    body = (px / (0.38 * extent[0])) ** 2 + (py / (0.33 * extent[1])) ** 2 <= 1.0
    label = np.zeros((nz, ny, nx), np.uint8)
    r = 0.16 * extent

    def blob(cx, cy, cz, sx, sy, sz):
        return ((px - cx) / sx) ** 2 + ((py - cy) / sy) ** 2 + ((pz - cz) / sz) ** 2 <= 1.0

    label[blob(0, 0, 0, r[0], r[1], r[2])] = 1
    label[blob(0.9 * r[0], 0.2 * r[1], 0, 0.6 * r[0], 0.6 * r[1], 0.7 * r[2])] = 2
    label[blob(-0.8 * r[0], -0.5 * r[1], 0.1 * r[2], 0.45 * r[0], 0.45 * r[1], 0.5 * r[2])] = 3
    if thin_class is not None:  # a one-voxel-thin plate: vanishes under plain downsampling
        label[:, ny // 2, nx // 4: 3 * nx // 4] = thin_class
    label[~body] = 0
    if modality == "ct":
        image = np.full(label.shape, -1000.0, np.float32)
        image[body] = 40.0
        for c, hu in ((1, 350.0), (2, 150.0), (3, 250.0)):
            image[label == c] = hu
        if table:
            image[:, int(0.93 * ny):, int(0.1 * nx): int(0.9 * nx)] = 200.0
        image += rng.normal(0, 20, image.shape).astype(np.float32)
    else:
        image = rng.normal(5, 3, label.shape).astype(np.float32).clip(0)
        image[body] += 200.0
        for c, v in ((1, 600.0), (2, 150.0), (3, 450.0)):
            image[label == c] = v + rng.normal(0, 20, int((label == c).sum()))
    return image, label


def make_raw_dataset(raw_root: Path, dataset_id: int = 1, name: str = "Tiny", n_cases: int = 3, modality: str = "ct",
                     spacing=(1.0, 1.0, 2.0), direction=IDENTITY, size_xyz=(40, 36, 20), bad_case: str | None = None,
                     seed: int = 0) -> DatasetInfo:
    """A tiny raw dataset in the nnU-Net layout; ``bad_case`` adds a case whose label has an invalid value."""
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    ids = [f"case_{i:03d}" for i in range(n_cases)] + ([bad_case] if bad_case else [])
    for i, cid in enumerate(ids):
        geom = Geometry(tuple(size_xyz), tuple(float(s) for s in spacing), (10.0 * i, -5.0, 3.0), tuple(direction))
        image, label = make_volume(size_xyz, spacing, modality, seed=seed + i)
        if cid == bad_case:
            label[label == 3] = 9
        write_array(image.astype(np.int16) if modality == "ct" else image, geom, folder / "imagesTr" / f"{cid}_0000.nii.gz")
        write_array(label, geom, folder / "labelsTr" / f"{cid}.nii.gz")
    info = DatasetInfo(folder=folder, channel_names={"0": "CT" if modality == "ct" else "MR"},
                       labels={"background": 0, "LV": 1, "Myo": 2, "RV": 3}, num_training=len(ids),
                       file_ending=".nii.gz")
    write_dataset_json(info)
    return info


def simple_settings(modality="ct", coarse_spacing=(4.0, 4.0, 4.0), inplane=None, num_classes=4) -> PreprocessSettings:
    """The plans fields preprocessing reads (the planner is tested in test_planning.py)."""
    norm = ({"scheme": "ct_clip", "clip_low": -100.0, "clip_high": 400.0} if modality == "ct"
            else {"scheme": "percentile_clip", "percentile_low": 0.5, "percentile_high": 99.5})
    norm["target_range"] = [-1.0, 1.0]
    return PreprocessSettings(modality=modality, num_input_channels=1, num_classes=num_classes, normalization=(norm,),
                              margin_mm=4.0, inplane_spacing=None if inplane is None else tuple(inplane),
                              coarse_spacing=tuple(coarse_spacing), max_locations_per_class=500)


def _images(image, label, spacing, direction=IDENTITY):
    geom = Geometry(tuple(int(n) for n in image.shape[::-1]), tuple(spacing), (1.0, 2.0, 3.0), tuple(direction))
    img = geom.apply_to(sitk.GetImageFromArray(image))
    lab = geom.apply_to(sitk.GetImageFromArray(label))
    return img, lab, geom


# ---------------------------------------------------------------------------------------------------
# Round trip, crop, canonical order
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing,direction,expected_axis", [
    ((1.0, 1.0, 2.0), IDENTITY, 2),
    ((3.0, 0.8, 0.9), _oblique_direction(), 0),  # thick x: slice axis x, not z
])
def test_restore_to_original_roundtrip(spacing, direction, expected_axis):
    image, label = make_volume((40, 36, 20), spacing)
    img, lab, geom = _images(image, label, spacing, direction)
    case = preprocess_case([img], simple_settings(), lab, "rt")
    props = case.properties
    assert props["slice_axis"] == expected_axis == choose_slice_axis(spacing, direction)
    assert case.image.dtype == np.float32 and case.image.ndim == 4
    # canonical: first spatial axis is the slice axis, in the cropped grid
    assert case.image.shape[1] == props["cropped_shape"][0]
    assert props["spacing"][0] == pytest.approx(max(spacing))
    # the crop removed air (and the table) but kept every labelled voxel
    assert np.prod(props["cropped_shape"]) < label.size
    back = restore_to_original(case.seg, props)
    assert back.shape == label.shape and back.dtype == case.seg.dtype
    np.testing.assert_array_equal(back, label)
    # probabilities: (C, D, H, W) -> (C, z, y, x); background is 1 outside the crop
    probs = np.stack([(case.seg == c).astype(np.float32) for c in range(4)])
    pback = restore_to_original(probs, props)
    assert pback.shape == (4,) + label.shape
    np.testing.assert_array_equal(pback.argmax(0), label)
    np.testing.assert_allclose(pback.sum(0), 1.0)
    # prediction path gives the same image and grid
    pimg, pprops = preprocess_images([img], simple_settings(), "rt")
    assert pprops["coarse_shape"] == props["coarse_shape"]
    assert Geometry.from_dict(pprops["geometry"]).mismatch(geom) is None


def test_restore_after_inplane_resampling_keeps_shape():
    image, label = make_volume((40, 36, 20), (1.0, 1.0, 2.0))
    img, lab, _ = _images(image, label, (1.0, 1.0, 2.0))
    case = preprocess_case([img], simple_settings(inplane=[1.5, 1.5]), lab, "rs")
    assert case.properties["inplane_resampled"]
    assert case.image.shape[2] < case.properties["cropped_shape"][1]
    back = restore_to_original(case.seg, case.properties)
    assert back.shape == label.shape
    assert (back == label).mean() > 0.97
    # per structure, not only overall (foreground is ~2 % of the voxels, so an all-background result
    # would pass the line above): each class comes back in place. Measured Dice 0.88 / 0.77 / 0.77 for
    # structures of 420 / 124 / 50 voxels (1 -> 1.5 -> 1 mm loses a boundary layer of small objects).
    classes = [int(c) for c in np.unique(label) if c > 0]
    assert classes == [1, 2, 3]
    for c in classes:
        a, b = back == c, label == c
        assert 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()) > 0.7, c


def test_body_crop_drops_table_keeps_heart():
    image, label = make_volume((60, 60, 20), (1.0, 1.0, 2.0), table=True)
    box = cropping.body_bbox(image, (2.0, 1.0, 1.0), "ct", margin_mm=2.0)
    y_lo, y_hi = box[1]
    assert y_hi < int(0.93 * 60)  # the table (a separate component) is outside
    fg = cropping.label_bbox(label)
    for (a, b), (c, d) in zip(box, fg):
        assert a <= c and d <= b
    # MR: relative threshold, same guarantee
    mr, mlabel = make_volume((60, 60, 20), (1.0, 1.0, 2.0), modality="mr")
    box = cropping.body_bbox(mr, (2.0, 1.0, 1.0), "mr", margin_mm=2.0)
    for (a, b), (c, d) in zip(box, cropping.label_bbox(mlabel)):
        assert a <= c and d <= b
    # a blank image is not cropped
    assert cropping.body_bbox(np.zeros((10, 12, 14), np.float32), (1, 1, 1), "mr") == [[0, 10], [0, 12], [0, 14]]


def test_normalization_ct_and_mr():
    a = np.array([[-1000.0, -100.0, 150.0, 400.0, 3000.0]], np.float32)
    ct = {"scheme": "ct_clip", "clip_low": -100.0, "clip_high": 400.0, "target_range": [-1.0, 1.0]}
    out, windows = normalization.normalize_image(a, [ct])
    np.testing.assert_allclose(out[0], [-1, -1, 0, 1, 1], atol=1e-6)
    out, _ = normalization.normalize_image(a, [dict(ct, target_range=[0.0, 1.0])])  # the plans' range takes effect
    np.testing.assert_allclose(out[0], [0, 0, 0.5, 1, 1], atol=1e-6)
    flat, _ = normalization.normalize_image(np.full((1, 3), 7.0, np.float32), [dict(ct, clip_low=7.0, clip_high=7.0,
                                                                                      target_range=[0.0, 1.0])])
    np.testing.assert_allclose(flat[0], [0.5, 0.5, 0.5])  # a degenerate window maps to the range's centre
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 50.0, (1, 20, 20, 20)).astype(np.float32)
    out, windows = normalization.normalize_image(mr, [{"scheme": "percentile_clip", "percentile_low": 0.5,
                                                       "percentile_high": 99.5, "target_range": [-1.0, 1.0]}])
    assert out.min() == pytest.approx(-1.0) and out.max() == pytest.approx(1.0)
    lo, hi = np.percentile(mr, [0.5, 99.5])
    assert windows[0]["clip_low"] == pytest.approx(lo, rel=1e-5) and windows[0]["clip_high"] == pytest.approx(hi, rel=1e-5)
    with pytest.raises(HCError):
        normalization.normalize_image(mr, [{"scheme": "zscore"}])


# ---------------------------------------------------------------------------------------------------
# Resampling, coarse labels, class locations
# ---------------------------------------------------------------------------------------------------

def test_resample_torch_modes_and_shapes():
    x = torch.rand(2, 16, 20, 24)
    assert resampling.resample_torch(x, (8, 10, 12), "area").shape == (2, 8, 10, 12)
    assert resampling.resample_torch(x[0], (8, 40, 12), "auto").shape == (8, 40, 12)
    assert resampling.resample_torch(x[None], (4, 5, 6), "linear").shape == (1, 2, 4, 5, 6)
    # area averaging of an exact 2x reduction is the block mean
    y = resampling.resample_torch(x[0], (8, 10, 12), "area")
    ref = x[0].reshape(8, 2, 10, 2, 12, 2).mean((1, 3, 5))
    torch.testing.assert_close(y, ref)
    # nearest keeps integer label values
    lab = torch.randint(0, 5, (16, 20, 24), dtype=torch.uint8)
    out = resampling.resample_torch(lab, (32, 40, 48), "nearest")
    assert out.dtype == torch.uint8 and set(out.unique().tolist()) <= set(lab.unique().tolist())
    torch.testing.assert_close(resampling.resample_torch(x, (16, 20, 24), "linear"), x)
    with pytest.raises(HCError):
        resampling.resample_torch(lab, (8, 8, 8), "linear")


def test_coarse_labels_keep_every_class():
    image, label = make_volume((48, 48, 24), (1.0, 1.0, 1.0), thin_class=3)
    seg = label  # (z, y, x) is fine here
    size = (6, 12, 12)  # 4x coarser in-plane
    naive = torch.nn.functional.interpolate(torch.from_numpy(seg)[None, None].float(), size=size,
                                            mode="nearest").to(torch.uint8)[0, 0].numpy()
    kept = resampling.resample_labels(seg, size, 4)
    assert set(np.unique(seg)) == set(np.unique(kept))
    assert set(np.unique(naive)) <= set(np.unique(seg))
    # a one-voxel-thin structure between the nearest-neighbour sample points: nearest loses it, the
    # class-preserving resampler keeps it, at the coarse voxels that cover it
    thin = np.zeros((24, 48, 48), np.uint8)
    thin[4:20, 8:40, 8:40] = 1
    thin[8:16, 16:32, 16:32] = 2
    thin[10:14, 21, 20:32] = 3  # y = 21 is never a nearest sample (0, 4, 8, ...)
    naive = torch.nn.functional.interpolate(torch.from_numpy(thin)[None, None].float(), size=size,
                                            mode="nearest").to(torch.uint8)[0, 0].numpy()
    assert 3 not in np.unique(naive)
    kept = resampling.resample_labels(thin, size, 4)
    assert set(np.unique(kept)) == {0, 1, 2, 3}
    where = np.argwhere(kept == 3)
    assert where[:, 0].min() >= 2 and where[:, 0].max() <= 3 and set(where[:, 1]) == {5}
    assert where[:, 2].min() >= 5 and where[:, 2].max() <= 7
    # through the pipeline: the coarse grid keeps every class present at full resolution
    img, lab, _ = _images(image, label, (1.0, 1.0, 1.0))
    case = preprocess_case([img], simple_settings(coarse_spacing=(4.0, 4.0, 4.0)), lab, "thin")
    assert case.properties["coarse_classes_present"] == case.properties["classes_present"] == [0, 1, 2, 3]
    assert list(case.coarse_image.shape[1:]) == case.properties["coarse_shape"]
    assert case.properties["coarse_shape"] == list(coarse_shape(case.properties["shape"],
                                                                case.properties["coarse_scale_factors"]))


def test_coarse_grid_matches_cascade_rule():
    from heartcascade.networks.cascade import coarse_shape_for

    for shape, factors in (((37, 101, 64), (0.3, 0.25, 0.5)), ((11, 256, 256), (1.0, 0.4, 0.4))):
        assert coarse_shape(shape, factors) == coarse_shape_for(shape, factors)


def test_class_locations_are_correct():
    _, label = make_volume((40, 36, 20), (1.0, 1.0, 2.0))
    locs = sample_class_locations(label, 4, max_per_class=300, seed=1)
    assert sorted(locs) == [1, 2, 3]
    for c, arr in locs.items():
        assert arr.shape[1] == 3 and len(arr) == min(300, int((label == c).sum()))
        assert np.all(label[tuple(arr.T)] == c)
        assert len(np.unique(arr, axis=0)) == len(arr)
    again = sample_class_locations(label, 4, max_per_class=300, seed=1)
    for c in locs:
        np.testing.assert_array_equal(locs[c], again[c])


# ---------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------

def _tiny_case():
    image, label = make_volume((40, 36, 20), (1.0, 1.0, 2.0))
    img, lab, _ = _images(image, label, (1.0, 1.0, 2.0))
    return preprocess_case([img], simple_settings(), lab, "c1")


def test_storage_roundtrip(tmp_path):
    case = _tiny_case()
    storage.save_case(tmp_path, "c1", case)
    assert storage.list_cases(tmp_path) == ["c1"]
    loaded = storage.load_case(tmp_path, "c1")
    assert isinstance(loaded.image, np.memmap) and not loaded.image.flags.writeable
    np.testing.assert_array_equal(loaded.image, case.image)
    np.testing.assert_array_equal(loaded.seg, case.seg)
    np.testing.assert_array_equal(loaded.coarse_seg, case.coarse_seg)
    for c in case.class_locations:
        np.testing.assert_array_equal(loaded.class_locations[c], case.class_locations[c])
        np.testing.assert_array_equal(loaded.coarse_class_locations[c], case.coarse_class_locations[c])
    assert loaded.properties["crop_bbox_zyx"] == case.properties["crop_bbox_zyx"]
    assert loaded.properties["case_id"] == "c1"
    with pytest.raises(HCError, match="nope"):
        storage.load_case(tmp_path, "nope")


def test_storage_write_is_atomic(tmp_path, monkeypatch):
    case = _tiny_case()
    storage.save_case(tmp_path, "c1", case)
    before = (tmp_path / "c1_image.npy").read_bytes()
    real = storage._save_npy

    def failing(path, array):
        if path.name.endswith("coarse_image.npy"):
            raise OSError("disk full")
        real(path, array)

    monkeypatch.setattr(storage, "_save_npy", failing)
    case.image = case.image + 1.0
    with pytest.raises(OSError):
        storage.save_case(tmp_path, "c1", case)
    # the interrupted case no longer counts as complete, and no temporary files are left behind
    assert storage.list_cases(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(storage, "_save_npy", real)
    storage.save_case(tmp_path, "c1", case)
    assert storage.list_cases(tmp_path) == ["c1"]
    assert (tmp_path / "c1_image.npy").read_bytes() != before


# ---------------------------------------------------------------------------------------------------
# The driver and the command
# ---------------------------------------------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def test_driver_idempotent_and_reports_bad_case(hc_roots, capsys):
    from heartcascade.workflows.plan_and_preprocess import plan_and_preprocess

    make_raw_dataset(hc_roots["raw"], 5, "Tiny", n_cases=3, bad_case="case_bad")
    first = plan_and_preprocess(5, preset="demo", num_processes=2, progress=False)
    assert sorted(first.processed) == ["case_000", "case_001", "case_002"]
    assert list(first.failed) == ["case_bad"] and "case_bad" in capsys.readouterr().err
    assert "label values [9]" in first.failed["case_bad"]
    assert first.exit_code == 1
    out = hc_roots["preprocessed"] / "Dataset005_Tiny"
    for name in ("dataset.json", "dataset_fingerprint.json", "plans.json"):
        assert (out / name).is_file()
    data = storage.data_dir(out)
    assert storage.list_cases(data) == ["case_000", "case_001", "case_002"]
    snap = _snapshot(data)
    second = plan_and_preprocess(5, num_processes=1, progress=False)
    assert sorted(second.skipped) == ["case_000", "case_001", "case_002"] and not second.processed
    assert list(second.failed) == ["case_bad"]
    assert _snapshot(data) == snap  # untouched, byte for byte
    # a changed input file is preprocessed again, the others stay
    raw = hc_roots["raw"] / "Dataset005_Tiny" / "imagesTr" / "case_001_0000.nii.gz"
    os.utime(raw, ns=(raw.stat().st_atime_ns, raw.stat().st_mtime_ns + 10_000_000))
    third = plan_and_preprocess(5, num_processes=1, progress=False)
    assert third.processed == ["case_001"]
    case = storage.load_case(data, "case_000")
    assert case.image.shape[0] == 1 and case.seg is not None
    assert case.properties["stamp"]["plans_hash"]


def test_kept_plans_name_what_the_preset_now_plans_differently(hc_roots, capsys):
    """Re-running keeps plans.json (hand edits survive) but says which settings a re-plan would change."""
    import json

    from heartcascade.workflows.plan_and_preprocess import plan_and_preprocess

    make_raw_dataset(hc_roots["raw"], 8, "Kept", n_cases=2)
    plan_and_preprocess(8, preset="demo", plan_only=True, progress=False)
    assert "warning" not in capsys.readouterr().err  # nothing to say right after planning
    path = hc_roots["preprocessed"] / "Dataset008_Kept" / "plans.json"
    plans = json.loads(path.read_text())
    plans["settings"]["inference"]["tta"] = not plans["settings"]["inference"]["tta"]  # a hand edit (or an older release's)
    plans["report"]["memory"]["predicted_peak_gb"]["step1"] = 99.0  # a report field: not a setting, never named
    path.write_text(json.dumps(plans))
    plan_and_preprocess(8, plan_only=True, progress=False)
    err = capsys.readouterr().err
    assert "kept (hand edits survive)" in err and "inference.tta" in err and "--overwrite" in err
    assert "predicted_peak_gb" not in err
    kept = json.loads(path.read_text())["settings"]["inference"]["tta"]
    assert kept == plans["settings"]["inference"]["tta"]  # the edit is kept


def test_cli(hc_roots, capsys):
    from heartcascade.cli.plan_and_preprocess import main

    make_raw_dataset(hc_roots["raw"], 7, "Cli", n_cases=2)
    assert main(["-d", "7", "--preset", "demo", "--plan-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "K=" in out and (hc_roots["preprocessed"] / "Dataset007_Cli" / "plans.json").is_file()
    assert not storage.list_cases(hc_roots["preprocessed"] / "Dataset007_Cli" / "data")
    assert main(["-d", "8", "--no-progress"]) == 1
    assert capsys.readouterr().err.startswith("error: ")
    assert main(["-d", "7", "--preset", "nonexistent", "--no-progress", "--overwrite"]) == 1
    assert "unknown preset" in capsys.readouterr().err


def test_real_mscmrseg_case_roundtrip(shared_data):
    from heartcascade.dataset.image_io import label_array, read_image

    folder = shared_data / "mscmrseg2019_bssfp"
    img = read_image(folder / "image_1.nii.gz")
    raw_label = read_image(folder / "label_1.nii.gz")
    codes = label_array(raw_label)
    mapped = np.zeros(codes.shape, np.uint8)
    for new, code in ((1, 200), (2, 500), (3, 600)):
        mapped[codes == code] = new
    lab = sitk.GetImageFromArray(mapped)
    lab.CopyInformation(raw_label)
    plans = simple_settings("mr", coarse_spacing=(7.99, 2.5, 2.5))
    case = preprocess_case([img], plans, lab, "image_1")
    props = case.properties
    assert props["spacing"][0] == pytest.approx(7.99, abs=0.05)  # thick slices first
    assert case.image.shape[1] == props["cropped_shape"][0] <= 19
    assert props["coarse_scale_factors"][0] == 1.0  # slices are never resampled for Net1
    np.testing.assert_array_equal(restore_to_original(case.seg, props), mapped)
    assert -1.0 <= case.image.min() and case.image.max() <= 1.0
    assert props["coarse_classes_present"] == props["classes_present"] == [0, 1, 2, 3]
