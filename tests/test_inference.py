"""Prediction: geometry, dynamic tile, chunked Net2, folds, label codes, CLI robustness.

Networks are freshly initialised tiny ones built from a tiny plans dict (documentation/plans.md
fields); the model folder is written as training writes it (documentation/conventions.md).
"""
from __future__ import annotations

import copy
import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from heartcascade.cli import predict as predict_cli
from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.inference import cases as cases_mod
from heartcascade.inference import roi as roi_mod
from heartcascade.inference.io_pipeline import BackgroundWriter, prefetch
from heartcascade.inference.net2_runner import net2_chunks
from heartcascade.inference.predictor import Predictor, bspline2_resample, load_probabilities
from heartcascade.inference.upsampling import upsample_at, upsample_at_points
from heartcascade.model import from_plans
from heartcascade.planning.plans import Plans, parse_plans
from heartcascade.preprocessing.preprocess import restore_to_original
from heartcascade.utils.errors import HCError

CODES = {1: 200, 2: 500, 3: 600}


_BASE_PLANS: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _planned(tmp_path_factory):
    """Plans made by the real planner (demo preset) for a tiny 2-case MR dataset, once per session."""
    from heartcascade.dataset.dataset_json import load_dataset
    from heartcascade.planning.fingerprint import compute_fingerprint
    from heartcascade.planning.planner import plan_experiment
    from heartcascade.planning.presets import load_preset

    root = tmp_path_factory.mktemp("raw") / "Dataset950_Tiny"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(2):
        img = synth(size_xyz=(40, 36, 10), seed=i)
        lab = sitk.GetImageFromArray((sitk.GetArrayFromImage(img) > 300).astype(np.uint8) * (i + 1))
        lab.CopyInformation(img)
        sitk.WriteImage(img, str(root / "imagesTr" / f"t{i}_0000.nii.gz"))
        sitk.WriteImage(lab, str(root / "labelsTr" / f"t{i}.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "Myo": 1, "LV": 2, "RV": 3}, "numTraining": 2,
        "file_ending": ".nii.gz", "label_codes": {str(k): v for k, v in CODES.items()}}))
    info = load_dataset(root)
    plans = plan_experiment(compute_fingerprint(info, progress=False), load_preset("demo"), info, 950,
                            gpu_memory_gb=2.0)
    _BASE_PLANS.clear()
    _BASE_PLANS.update(plans)
    yield


def tiny_plans(K: int | None = None, input_mode: str | None = None, codes: bool = True, **inference) -> Plans:
    """The planned plans, with Net2's K / input mode and inference fields overridden for a test."""
    full = copy.deepcopy(_BASE_PLANS)
    plans = full["settings"]
    plans["net1"]["dropout"] = 0.0
    if K is not None:
        plans["net2"]["K"] = K
    if input_mode is not None:
        plans["net2"]["input_mode"] = input_mode
        plans["net2"]["in_channels"] = 1 + (plans["num_classes"] if input_mode == "probabilities" else 1)
    plans["inference"].update(inference)
    if not codes:
        plans["label_codes"] = None
    return parse_plans(full, "test plans")


def build(plans: Plans, configuration: str = "cascade", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return from_plans.build_networks(configuration, plans)


def write_model(folder: Path, plans: Plans, configuration: str = "cascade", folds=(0,)) -> Path:
    for i, fold in enumerate(folds):
        nets = build(plans, configuration, seed=i)
        fd = folder / f"fold_{fold}"
        fd.mkdir(parents=True)
        torch.save({"format_version": 1, "configuration": configuration, "plans": plans.to_dict(),
                    "networks": {k: v.state_dict() for k, v in nets.items()}}, fd / "checkpoint_final.pth")
        (fd / "plans.json").write_text(json.dumps(plans.to_dict()))
    return folder


def rotation(ax: float, ay: float, az: float) -> tuple[float, ...]:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


def synth(size_xyz=(36, 30, 9), spacing=(1.25, 1.25, 6.0), direction=None, seed=0, dtype=np.int16) -> sitk.Image:
    """A noisy MR-like volume with an ellipsoid 'heart' off centre."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = size_xyz
    z, y, x = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    blob = ((x - 0.6 * nx) / (0.25 * nx)) ** 2 + ((y - 0.45 * ny) / (0.3 * ny)) ** 2 + ((z - 0.5 * nz) / (0.4 * nz)) ** 2
    arr = 100 + 20 * rng.standard_normal((nz, ny, nx)) + 400 * (blob < 1)
    img = sitk.GetImageFromArray(arr.astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin((-12.5, 30.25, 101.0))
    if direction is not None:
        img.SetDirection(direction)
    return img


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(argv) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict_cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def reference_probs(predictor: Predictor, image: np.ndarray, props: dict, fold: int = 0,
                    window: tuple | None = None) -> torch.Tensor:
    """Net2 applied to every slice separately (its own K-slice window), (C, D, h, w) over ``window``.

    Net1 probabilities are upsampled with F.interpolate over the whole volume; z is padded by edge
    replication, and the in-plane window (default: the whole plane) by replication up to Net2's
    divisor -- what the predictor is specified to do.
    """
    net2 = predictor.folds[fold]["net2"]
    img = torch.from_numpy(image)
    coarse = predictor._net1_probabilities(img, props)[fold]
    D, H, W = img.shape[1:]
    full = F.interpolate(coarse, size=(D, H, W), mode="trilinear", align_corners=False)
    x = torch.cat([img[None], full], dim=1)
    (y0, y1), (x0, x1) = window if window is not None else ((0, H), (0, W))
    x = x[:, :, :, y0:y1, x0:x1]
    h, w = y1 - y0, x1 - x0
    m, div = net2.margin, net2.required_divisor
    x = F.pad(x, (0, (-w) % div, 0, (-h) % div, m, m), mode="replicate")
    out = []
    with torch.no_grad():
        for j in range(D):
            out.append(torch.softmax(net2(x[:, :, j:j + net2.K]), dim=1)[0, :, 0, :h, :w])
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------------------------
# Geometry


def test_geometry_identity_mscmrseg_both_orientations(shared_data, tmp_path):
    src = shared_data / "mscmrseg2019_bssfp"
    inp = tmp_path / "in"
    inp.mkdir()
    for name in ("image_1.nii.gz", "image_10.nii.gz"):
        shutil.copy(src / name, inp / name)
    dirs = {tuple(np.sign(np.round(sitk.ReadImage(str(p)).GetDirection(), 3))) for p in inp.iterdir()}
    assert len(dirs) == 2, "the two cases should have different orientations"
    hashes = {p.name: sha(p) for p in inp.iterdir()}
    model = write_model(tmp_path / "model", tiny_plans())
    code, out, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    for name in hashes:
        ref = sitk.ReadImage(str(inp / name))
        pred = sitk.ReadImage(str(tmp_path / "out" / name))
        assert Geometry.of(pred) == Geometry.of(ref)  # bit-exact size, spacing, origin, direction
        values = set(np.unique(sitk.GetArrayViewFromImage(pred)).tolist())
        assert values <= {0, *CODES.values()} and values - {0}, values
        assert pred.GetPixelID() == sitk.sitkUInt16  # 600 does not fit uint8
        assert sha(inp / name) == hashes[name], "input modified"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("ending", [".nii.gz", ".mha", ".nrrd"])
def test_geometry_identity_oblique(tmp_path, ending):
    img = synth(size_xyz=(20, 26, 8), spacing=(1.1, 0.9, 5.0), direction=rotation(0.4, -0.7, 1.3))
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(img, str(inp / f"obl_0000{ending}"))
    model = write_model(tmp_path / "model", tiny_plans())
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    ref = sitk.ReadImage(str(inp / f"obl_0000{ending}"))
    pred = sitk.ReadImage(str(tmp_path / "out" / f"obl{ending}"))
    if ending == ".nrrd":  # NRRD stores spacing x direction; ITK renormalises (one ulp)
        assert Geometry.of(pred).mismatch(Geometry.of(ref), tol=1e-12) is None
    else:
        assert Geometry.of(pred) == Geometry.of(ref)


def test_dicom_series_input(tmp_path):
    img = synth(size_xyz=(24, 20, 6), spacing=(1.0, 1.0, 6.0))
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    for i in range(img.GetSize()[2]):
        s = img[:, :, i]
        s.SetMetaData("0020|000e", uid)
        s.SetMetaData("0020|0032", "\\".join(str(v) for v in img.TransformIndexToPhysicalPoint((0, 0, i))))
        s.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        s.SetMetaData("0020|0013", str(i))
        s.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(folder / f"s{i:03d}.dcm"))
        writer.Execute(s)
    model = write_model(tmp_path / "model", tiny_plans())
    code, _, err = run_cli(["-i", folder, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    pred = sitk.ReadImage(str(tmp_path / "out" / "series.nii.gz"))
    assert Geometry.of(pred).mismatch(Geometry.of(image_io.read_image(folder)), tol=1e-6) is None


# ------------------------------------------------------------------------------------------------
# Net2 over the dynamic tile


def test_chunked_net2_equals_per_slice_and_unchunked():
    img = synth(size_xyz=(37, 29, 9))  # in-plane sizes not divisible by Net2's divisor
    probs = {}
    for chunk in (1, 4, 1000):
        p = Predictor(tiny_plans(K=5, roi_margin_mm=1e4, z_chunk=chunk), [build(tiny_plans(K=5))], device="cpu")
        image, props = p.preprocess([img])
        result = p.predict_preprocessed(image, props, return_probabilities=True)
        assert result.roi_box == roi_mod.full_box(props["shape"])
        probs[chunk] = result.probabilities.full()
        labels = result.labels
    assert np.allclose(probs[1], probs[1000], atol=2e-3)
    assert np.allclose(probs[4], probs[1000], atol=2e-3)
    ref = reference_probs(p, image, props).numpy()
    ref_zyx = restore_to_original(ref, props)
    assert np.allclose(probs[1000], ref_zyx, atol=2e-3)  # float16 storage
    confident = np.sort(ref_zyx, axis=0)[-1] - np.sort(ref_zyx, axis=0)[-2] > 1e-2
    assert np.array_equal(labels[confident], ref_zyx.argmax(0)[confident])


def test_net2_chunks_direct_equivalence():
    torch.manual_seed(0)
    from heartcascade.networks import Net2

    net = Net2(3, 3, K=7, base_features=4, num_levels=1, recursions=1).eval()
    vol = torch.randn(3, 11, 8, 8)
    D = vol.shape[1]

    def make_input(i, z_idx):
        return vol[:, z_idx][None]

    with torch.no_grad():
        whole = torch.cat([p for _, _, p in net2_chunks([net], make_input, (0, D), D, 7, chunk=100)], dim=1)
        parts = torch.cat([p for _, _, p in net2_chunks([net], make_input, (0, D), D, 7, chunk=3)], dim=1)
        middle = torch.cat([p for _, _, p in net2_chunks([net], make_input, (4, 9), D, 7, chunk=2)], dim=1)
    assert whole.shape == (3, D, 8, 8)
    assert torch.allclose(whole, parts, atol=1e-5)
    assert torch.allclose(whole[:, 4:9], middle, atol=1e-5)


def test_roi_crop_pastes_correctly():
    """A forced ROI: Net2 runs on the ROI's window only, results land at the right place after
    un-transposition, everything outside is background."""
    # Slice axis = x (thick x spacing): canonical order differs from SimpleITK's.
    img = synth(size_xyz=(9, 30, 34), spacing=(6.0, 1.25, 1.25), direction=rotation(0.2, 0.1, -0.3))
    plans = tiny_plans(K=3, roi_margin_mm=1e4)
    p = Predictor(plans, [build(plans)], device="cpu")
    image, props = p.preprocess([img])
    assert props["slice_axis"] == 0
    shape = tuple(props["shape"])
    box = ((2, shape[0] - 3), (5, shape[1] - 6), (3, shape[2] - 9))
    p.roi_rule = lambda probs, properties: box  # an ROI rule object: any callable of (probs, properties)
    part = p.predict_preprocessed(image, props, return_probabilities=True)
    div = p.folds[0]["net2"].required_divisor
    window = roi_mod.round_up_inside(box, (1, div, div), shape)
    assert all((b - a) % div == 0 for a, b in window[1:]) and window[1][0] <= box[1][0]
    ref_win = reference_probs(p, image, props, window=window[1:]).numpy()
    ref = np.zeros((4,) + shape, dtype=np.float32)
    ref[0] = 1
    sl = (slice(None), slice(*box[0]), slice(box[1][0] - window[1][0], box[1][1] - window[1][0]),
          slice(box[2][0] - window[2][0], box[2][1] - window[2][0]))
    ref[(slice(None),) + roi_mod.box_slices(box)] = ref_win[sl]
    ref_zyx = restore_to_original(ref, props)
    inside = np.zeros(shape, dtype=np.uint8)
    inside[roi_mod.box_slices(box)] = 1
    inside_zyx = restore_to_original(inside, props).astype(bool)
    assert np.all(part.labels[~inside_zyx] == 0)
    pf = part.probabilities.full()
    assert np.all(pf[0][~inside_zyx] == 1)
    assert np.allclose(pf, ref_zyx, atol=2e-3)
    srt = np.sort(ref_zyx, 0)
    confident = srt[-1] - srt[-2] > 1e-2
    assert np.array_equal(part.labels[confident], ref_zyx.argmax(0)[confident])


def test_roi_helpers():
    assert roi_mod.coarse_box_to_full(((1, 3), (0, 2), (2, 4)), (4, 4, 4), (8, 10, 16)) == ((2, 6), (0, 5), (8, 16))
    assert roi_mod.grow_box(((2, 6), (0, 5), (8, 16)), (1, 2, 3), (8, 10, 16)) == ((1, 7), (0, 7), (5, 16))
    box = roi_mod.round_up_inside(((0, 5), (3, 8), (0, 6)), (1, 4, 4), (5, 20, 6))
    assert box == ((0, 5), (2, 10), (0, 6))  # grown inside the image; the short axis stays whole
    m = torch.zeros(6, 7, 8)
    m[2:4, 1, 5:7] = 1
    assert roi_mod.foreground_box(m) == ((2, 4), (1, 2), (5, 7))
    assert roi_mod.foreground_box(torch.zeros(3, 3, 3)) is None
    coarse = torch.randn(2, 3, 5, 6, 4)
    full_shape = (13, 17, 9)
    ref = F.interpolate(coarse, size=full_shape, mode="trilinear", align_corners=False)
    idx = [roi_mod.clamped_range(-2, 15, 13), torch.arange(4, 11), torch.arange(9)]
    got = upsample_at(coarse, full_shape, idx)
    assert torch.allclose(got, roi_mod.gather(ref, idx), atol=1e-5)


def test_upsample_at_points_is_the_trilinear_rule_anywhere():
    """Step 4's device-side reading of Net1's probabilities: at integer positions it equals the
    predictor's separable reading (F.interpolate), between them it interpolates the upsampled grid
    linearly inside one coarse cell, and NaN positions read the outside class one-hot."""
    torch.manual_seed(0)
    coarse = torch.rand(3, 5, 6, 4)
    full_shape = (13, 17, 9)
    ref = F.interpolate(coarse[None], size=full_shape, mode="trilinear", align_corners=False)[0]
    zz, yy, xx = torch.meshgrid(torch.tensor([-2, 0, 6, 12, 14]), torch.arange(17), torch.arange(9), indexing="ij")
    points = torch.stack([zz, yy, xx]).float()
    got = upsample_at_points(coarse.half(), full_shape, points)
    want = upsample_at(coarse.half().float()[None], full_shape, [zz[:, 0, 0].clamp(0, 12), torch.arange(17),
                                                                   torch.arange(9)])[0]
    assert torch.allclose(got, want, atol=1e-5)
    # A point half-way between two full-resolution voxels that share a coarse cell: their mean.
    mid = torch.tensor([[6.0], [8.5], [4.0]])
    assert torch.allclose(upsample_at_points(coarse, full_shape, mid)[:, 0], ref[:, 6, 8:10, 4].mean(1), atol=1e-5)
    points[:, 1, 3, 2] = float("nan")
    out = upsample_at_points(coarse, full_shape, points)
    assert out[:, 1, 3, 2].tolist() == [1.0, 0.0, 0.0]  # outside_class 0 (background)


def _coarse_probs(shape: tuple, blobs: list[tuple[tuple[slice, ...], float]]) -> torch.Tensor:
    """Mean Net1 softmax (1, 4, d, h, w): background 1 except where ``blobs`` set p(class 1)."""
    p = torch.zeros((1, 4) + shape)
    p[0, 0] = 1.0
    for region, value in blobs:
        p[(0, 1) + region] = value
        p[(0, 0) + region] = 1.0 - value
    return p


def test_heart_component_roi_ignores_stray_detection():
    coarse = (10, 20, 20)
    props = {"shape": [20, 40, 40], "spacing": [4.0, 1.0, 1.0]}
    heart = (slice(4, 7), slice(8, 13), slice(8, 13))
    stray = (slice(0, 1), slice(18, 20), slice(18, 20))  # an 'arm': far away, 5 % of the heart's mass
    probs = _coarse_probs(coarse, [(heart, 0.95), (stray, 0.9)])
    old = roi_mod.AllForegroundRoi(margin_mm=2.0)(probs, props)
    new = roi_mod.HeartComponentRoi(margin_mm=2.0)(probs, props)
    # old rule: the box spans heart and stray (almost the whole volume); new: heart (8..14, 16..26) + margin
    assert old == ((0, 16), (14, 40), (14, 40))
    assert roi_mod.HeartComponentRoi(2.0, min_component_fraction=0.04)(probs, props) == old
    assert new == ((6, 16), (14, 28), (14, 28))  # margin: at least one coarse voxel (2 full voxels)
    # a bigger but faint stray region (above threshold) still loses to the confident heart by mass
    faint = (slice(0, 10), slice(0, 3), slice(0, 6))
    assert roi_mod.HeartComponentRoi(2.0)(_coarse_probs(coarse, [(heart, 0.95), (faint, 0.1)]), props) == new
    assert roi_mod.HeartComponentRoi(2.0)(_coarse_probs(coarse, []), props) == roi_mod.full_box(props["shape"])


def test_heart_component_roi_position_weight_and_whole_volume():
    """With ``centre_sigma`` a heavier detection at the edge of the field of view (a bright chest-wall ring
    on another centre's scan) loses to the heart near the middle; ``whole_volume`` never loses the heart."""
    coarse = (10, 20, 20)
    props = {"shape": [20, 40, 40], "spacing": [4.0, 1.0, 1.0]}
    heart = (slice(4, 7), slice(8, 12), slice(8, 12))  # centred, 48 voxels
    edge = (slice(2, 8), slice(0, 3), slice(14, 20))  # at the border, 108 voxels: more mass than the heart
    probs = _coarse_probs(coarse, [(heart, 0.9), (edge, 0.9)])
    by_mass = roi_mod.HeartComponentRoi(0.0, 0.5)(probs, props)
    by_position = roi_mod.HeartComponentRoi(0.0, 0.5, centre_sigma=0.15)(probs, props)
    assert by_mass[2][0] >= 26 and by_position == ((6, 16), (14, 26), (14, 26))
    for rule in (roi_mod.WholeVolumeRoi(), roi_mod.make_roi_rule("whole_volume", 10.0)):
        assert rule(probs, props) == roi_mod.full_box(props["shape"])


def test_heart_component_roi_keeps_split_heart():
    coarse = (10, 20, 20)
    props = {"shape": [20, 40, 40], "spacing": [4.0, 1.0, 1.0], "coarse_spacing": [8.0, 2.0, 2.0]}
    base = (slice(3, 5), slice(8, 13), slice(8, 13))
    apex = (slice(6, 7), slice(9, 11), slice(9, 11))  # one coarse slice missing in between, 4 of 50 voxels
    stray = (slice(0, 1), slice(19, 20), slice(19, 20))  # 1 voxel, 2 % of the base's mass, 30 mm away
    probs = _coarse_probs(coarse, [(base, 0.9), (apex, 0.9), (stray, 0.9)])
    rule = roi_mod.HeartComponentRoi(0.0, min_component_fraction=0.05)
    mask = rule.heart_mask(probs, props)
    assert mask[apex].all() and mask[base].all() and not mask[stray].any()
    # the apex (8 % of the base's mass) is dropped at 10 % unless it lies within the join distance (16 mm away)
    assert not roi_mod.HeartComponentRoi(0.0, 0.1).heart_mask(probs, props)[apex].any()
    joined = roi_mod.HeartComponentRoi(0.0, 0.1, join_distance_mm=16.0).heart_mask(probs, props)
    assert joined[apex].all() and not joined[stray].any()


def test_tta_follows_the_plans_unless_the_caller_decides():
    plans = tiny_plans()
    assert Predictor(plans, [build(plans)], device="cpu").tta is False  # plans without the field: off
    on = tiny_plans(tta=True)
    assert Predictor(on, [build(on)], device="cpu").tta is True
    assert Predictor(on, [build(on)], device="cpu", tta=False).tta is False
    # mirrored only along the axes training mirrored (a stack turned base-for-apex was never seen)
    from heartcascade.inference.predictor import tta_axes
    assert tta_axes(plans) == (2, 3, 4)  # trained without mirroring: every axis, as before
    flipped = on.to_dict()
    flipped["settings"]["augmentation"]["flip_axes"] = [1, 2]
    assert tta_axes(parse_plans(flipped)) == (3, 4)


def _quarter_turn_plans(**inference) -> Plans:
    """Tiny plans of a model trained rotated over the full circle in-plane and mirrored in-plane."""
    full = tiny_plans(tta=True, **inference).to_dict()
    full["settings"]["augmentation"].update(p_rotation=0.5, rotation_deg=[180.0, 0.0, 0.0], p_flip=0.5,
                                            flip_axes=[1, 2])
    full["settings"]["inference"]["tta_quarter_turns"] = True
    return parse_plans(full, "test plans")


def test_quarter_turns_average_the_eight_in_plane_symmetries_where_pixels_are_square():
    from heartcascade.inference.predictor import square_pixels

    with pytest.raises(HCError, match="tta_quarter_turns needs training rotated in-plane"):
        tiny_plans(tta=True, tta_quarter_turns=True)  # the demo preset rotates by 15 degrees at most
    assert tiny_plans().inference.tta_quarter_turns is False  # the planner writes it (off in the demo preset)
    legacy = tiny_plans().to_dict()
    del legacy["settings"]["inference"]["tta_quarter_turns"]
    assert parse_plans(legacy).inference.tta_quarter_turns is None  # plans written before it: off
    plans = _quarter_turn_plans()
    nets = build(plans)
    quarter = Predictor(plans, [nets], device="cpu")
    mirrors = Predictor(plans, [nets], device="cpu", tta=False)
    assert len(quarter.net2_views([5.0, 1.25, 1.25])) == 8
    assert len(quarter.net2_views([5.0, 1.25, 1.4])) == 4  # oblong pixels: a quarter turn would stretch the heart
    assert len(mirrors.net2_views([5.0, 1.25, 1.25])) == 1
    assert square_pixels([3.0, 1.0, 1.005]) and not square_pixels([3.0, 1.0, 1.05])
    # Net1: the mean over the four mirrorings and their transposes, each brought back
    image, props = mirrors.preprocess([synth(size_xyz=(36, 36, 10))])
    x = torch.from_numpy(image)
    got = quarter._net1_probabilities(x, props)[0]
    views = []
    for swap in (False, True):
        for dims in ((), (3,), (2,), (2, 3)):  # in-plane dims of the (C, D, H, W) image
            views.append((dims, swap))
    total = 0
    for dims, swap in views:
        xin = torch.flip(x, dims) if dims else x
        if swap:
            xin = xin.transpose(-2, -1)
        props_v = dict(props, coarse_shape=[props["coarse_shape"][0]] + list(
            reversed(props["coarse_shape"][1:])) if swap else props["coarse_shape"])
        p = mirrors._net1_probabilities(xin.contiguous(), props_v)[0]
        if swap:
            p = p.transpose(-2, -1)
        total = total + (torch.flip(p, [d + 1 for d in dims]) if dims else p)
    assert torch.allclose(got, total / len(views), atol=1e-4)
    # and the whole cascade predicts with them
    labels, _ = quarter.predict_case([synth(size_xyz=(36, 36, 10))])
    assert labels.shape == (10, 36, 36)


def test_roi_rule_from_plans():
    plans = tiny_plans()
    assert isinstance(Predictor(plans, [build(plans)], device="cpu").roi_rule, roi_mod.HeartComponentRoi)
    rule = Predictor(plans, [build(plans)], device="cpu").roi_rule
    assert rule == roi_mod.HeartComponentRoi(plans.inference.roi_margin_mm, 0.1, 0.0)
    with pytest.raises(HCError, match="plans_version 1 is not 3; re-plan"):
        parse_plans(dict(plans.to_dict(), plans_version=1))
    with pytest.raises(HCError, match="needs the typed plans"):
        Predictor(plans.to_dict(), [build(plans)], device="cpu")
    legacy = tiny_plans(roi_rule="all_foreground")
    assert isinstance(Predictor(legacy, [build(plans)], device="cpu").roi_rule, roi_mod.AllForegroundRoi)
    with pytest.raises(HCError, match="inference.roi_rule must be one of"):
        tiny_plans(roi_rule="largest")
    with pytest.raises(HCError, match="roi_min_component_fraction"):
        tiny_plans(roi_min_component_fraction=1.5)


def test_net1_only_is_upsampled_net1_argmax():
    img = synth()
    plans = tiny_plans(roi_rule="all_foreground")  # that ROI holds every foreground voxel of Net1
    p = Predictor(plans, [build(plans)], device="cpu")
    image, props = p.preprocess([img])
    res = p.predict_preprocessed(image, props, net1_only=True)
    coarse = p._net1_probabilities(torch.from_numpy(image), props)[0]
    ref = F.interpolate(coarse, size=tuple(props["shape"]), mode="trilinear", align_corners=False)[0]
    ref_labels = restore_to_original(ref.argmax(0).to(torch.uint8).numpy(), props)
    srt = np.sort(restore_to_original(ref.numpy(), props), axis=0)
    confident = srt[-1] - srt[-2] > 1e-4
    assert np.array_equal(res.labels[confident], ref_labels[confident])


def test_brightening_second_pass_runs_on_the_brightened_image():
    """With inference.brightening, a case whose first pass finds the reference class darker than the target is
    predicted again on the brightened image (and says so); a bright-enough case keeps its single pass."""
    from heartcascade.inference import brightening

    img = synth()
    plans = tiny_plans()
    nets = build(plans)
    plain = Predictor(plans, [nets], device="cpu")
    image, props = plain.preprocess([img])
    first = plain.predict_preprocessed(image, props)
    found = np.bincount(first.labels.ravel(), minlength=plans.num_classes)
    label = int(np.argmax(found[1:]) + 1)  # what the untrained networks label most
    assert found[label] > 0
    rule = {"label": label, "max_factor": 2.0, "min_voxels": 1}
    dark = Predictor(tiny_plans(brightening={**rule, "targets": [0.999]}), [nets], device="cpu")
    twice = dark.predict_preprocessed(image, props)
    assert twice.brightening is not None and 1.0 < twice.brightening[0] <= 2.0
    brightened = brightening.brighten(image, twice.brightening, [n.target_range for n in plans.normalization])
    assert np.array_equal(twice.labels, plain.predict_preprocessed(brightened, props).labels)
    assert "brightened_pass" in twice.timings
    bright = Predictor(tiny_plans(brightening={**rule, "targets": [0.001]}), [nets], device="cpu")
    once = bright.predict_preprocessed(image, props)
    assert once.brightening is None and np.array_equal(once.labels, first.labels)
    assert "brightened_pass" not in once.timings and first.brightening is None


def test_label_input_mode_and_tta_run():
    img = synth()
    plans = tiny_plans(K=3, input_mode="labelmap")
    p = Predictor(plans, [build(plans)], device="cpu", tta=True)
    labels, probs = p.predict_case([img], return_probabilities=True)
    assert labels.shape == sitk.GetArrayViewFromImage(img).shape and labels.dtype == np.uint8
    full = probs.full()
    assert np.allclose(full.sum(0), 1, atol=1e-2)
    srt = np.sort(full, 0)
    confident = srt[-1] - srt[-2] > 1e-2
    assert np.array_equal(full.argmax(0)[confident], labels[confident])


def test_net1_roi_box_selection_and_nothing_found_fallback():
    """Net1's box: the coarse foreground voxels mapped to the full grid, grown by the margin (in mm, at
    least one coarse voxel); the whole volume when Net1 finds no foreground. Hand-computed values."""
    plans = tiny_plans(roi_margin_mm=3.0)
    p = Predictor(plans, [build(plans)], device="cpu")
    props = {"shape": [8, 20, 24], "spacing": [2.0, 1.0, 1.0]}
    probs = torch.zeros(1, plans.num_classes, 4, 5, 6)
    probs[0, 0] = 0.9
    probs[0, 1] = 0.1
    probs[0, 2, 1, 2:4, 4] = 0.95  # foreground: coarse z 1, y 2..3, x 4 (a normalised softmax there)
    probs[0, 0, 1, 2:4, 4] = 0.05
    probs[0, 1, 1, 2:4, 4] = 0.0
    # coarse z [1, 2) -> full [2, 4), grown by max(ceil(3 / 2), 8 / 4) = 2 -> [0, 6)
    # coarse y [2, 4) -> full [8, 16), grown by max(3, 20 / 5) = 4 -> [4, 20)
    # coarse x [4, 5) -> full [16, 20), grown by max(3, 24 / 6) = 4 -> [12, 24)
    assert p.roi_box(probs, props) == ((0, 6), (4, 20), (12, 24))
    probs[0, 2] = 0.0
    probs[0, 0] = 0.9
    probs[0, 1] = 0.1
    assert p.roi_box(probs, props) == ((0, 8), (0, 20), (0, 24))  # nothing found: the whole volume


def test_tta_averages_the_mirrored_predictions():
    """TTA = the mean over all 8 mirrorings of Net1's softmax, each flipped back (not a no-op flag)."""
    import itertools

    img = synth()
    plans = tiny_plans(K=3)
    nets = build(plans)
    plain = Predictor(plans, [nets], device="cpu")
    tta = Predictor(plans, [nets], device="cpu", tta=True)
    image, props = plain.preprocess([img])
    x = torch.from_numpy(image)
    got = tta._net1_probabilities(x, props)[0]
    combos = [c for r in range(4) for c in itertools.combinations((1, 2, 3), r)]
    expected = sum(torch.flip(plain._net1_probabilities(torch.flip(x, c) if c else x, props)[0],
                              [d + 1 for d in c]) if c else plain._net1_probabilities(x, props)[0] for c in combos)
    expected = expected / len(combos)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain._net1_probabilities(x, props)[0], atol=1e-3)
    # the whole cascade: the flag reaches the written probabilities
    _, with_tta = tta.predict_case([img], return_probabilities=True)
    _, without = plain.predict_case([img], return_probabilities=True)
    assert not np.allclose(with_tta.full(), without.full(), atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Folds, codes, baseline


def test_inference_settings_change_only_the_inference_section(tmp_path):
    """from_model_dir(inference_settings=...) tries another inference setting on a model as it is (its
    postprocessing included); the override is checked as the plans are."""
    model = write_model(tmp_path / "model", tiny_plans())
    (model / "fold_0" / "postprocessing.json").write_text(json.dumps(
        {"format_version": 1, "connectivity": 26, "keep_largest_foreground": True, "keep_largest_per_label": []}))
    tried = Predictor.from_model_dir(model, device="cpu", inference_settings={"tta": True, "roi_margin_mm": 4.0})
    assert tried.tta is True and tried.plans.inference.roi_margin_mm == 4.0
    assert tried.postprocessing is not None and tried.postprocessing_source is not None
    assert Predictor.from_model_dir(model, device="cpu").plans.inference.roi_margin_mm != 4.0
    with pytest.raises(HCError, match="inference has unknown key 'nope'"):
        Predictor.from_model_dir(model, device="cpu", inference_settings={"nope": 1})
    with pytest.raises(HCError, match="tta_quarter_turns needs training rotated"):
        Predictor.from_model_dir(model, device="cpu", inference_settings={"tta_quarter_turns": True})


def test_multiple_folds_average(tmp_path):
    plans = tiny_plans(roi_margin_mm=1e4)
    model = write_model(tmp_path / "model", plans, folds=(0, 1))
    img = synth()
    both = Predictor.from_model_dir(model, device="cpu")
    assert both.fold_names == ["0", "1"]
    singles = [Predictor.from_model_dir(model, folds=[f], device="cpu") for f in (0, 1)]
    _, pb = both.predict_case([img], return_probabilities=True)
    p0 = singles[0].predict_case([img], return_probabilities=True)[1].full()
    p1 = singles[1].predict_case([img], return_probabilities=True)[1].full()
    assert not np.allclose(p0, p1, atol=1e-2)
    assert np.allclose(pb.full(), (p0 + p1) / 2, atol=2e-3)


def test_label_codes_written_and_uint8_without_codes(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(synth(), str(inp / "a.nii.gz"))
    plans = tiny_plans(codes=False)
    model = write_model(tmp_path / "model", plans)
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    pred = sitk.ReadImage(str(tmp_path / "out" / "a.nii.gz"))
    assert pred.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= {0, 1, 2, 3}
    # dataset.json next to the checkpoint supplies codes when the plans have none
    (model / "fold_0" / "dataset.json").write_text(json.dumps({"label_codes": {"1": 205, "2": 500, "3": 850}}))
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out2", "-m", model, "--device", "cpu", "--quiet"])
    pred = sitk.ReadImage(str(tmp_path / "out2" / "a.nii.gz"))
    assert set(np.unique(sitk.GetArrayViewFromImage(pred))) <= {0, 205, 500, 850}


def test_baseline_configuration(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    img = synth(direction=rotation(0.3, 0.2, 0.1))
    sitk.WriteImage(img, str(inp / "b_0000.nii.gz"))
    model = write_model(tmp_path / "baseline", tiny_plans(), "baseline")
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet",
                            "--save-probabilities"])
    assert code == 0, err
    pred = sitk.ReadImage(str(tmp_path / "out" / "b.nii.gz"))
    assert Geometry.of(pred) == Geometry.of(sitk.ReadImage(str(inp / "b_0000.nii.gz")))
    probs = load_probabilities(tmp_path / "out" / "b.npz").full()
    assert probs.shape[1:] == sitk.GetArrayViewFromImage(pred).shape
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out1", "-m", model, "--net1-only", "--device", "cpu"])
    assert code == 1 and "cascade" in err


def test_bspline2_resample():
    from scipy import ndimage

    assert np.allclose(bspline2_resample(np.full((3, 4, 5), 0.25, np.float32), (1, 1, 1), (6, 8, 10)), 0.25, atol=1e-5)
    rng = np.random.default_rng(0)
    small = ndimage.gaussian_filter(rng.random((7, 9, 11)), 1).astype(np.float32)
    full = (20, 25, 33)
    up = bspline2_resample(small, (1.0, 1.0, 1.0), full)
    # reference: scipy's order-2 spline at the coarse-grid coordinates of the fine voxel centres
    coords = np.meshgrid(*[np.clip((np.arange(f) + 0.5) * n / f - 0.5, 0, n - 1) for n, f in zip(small.shape, full)],
                         indexing="ij")
    ref = ndimage.map_coordinates(small.astype(np.float64), coords, order=2, mode="mirror")
    assert np.abs(up - ref).max() < 1e-5
    # and SimpleITK's sitkBSpline2 away from the border (ITK extrapolates the last half voxel differently)
    img = sitk.GetImageFromArray(small)
    sp = [f / n for n, f in zip(reversed(small.shape), reversed(full))]
    img.SetSpacing(sp)
    img.SetOrigin([0.5 * v for v in sp])
    out = sitk.Resample(img, list(reversed(full)), sitk.Transform(), sitk.sitkBSpline2, [0.5] * 3, [1.0] * 3,
                        [1, 0, 0, 0, 1, 0, 0, 0, 1], 0.0, sitk.sitkFloat32, True)
    assert np.abs(up - sitk.GetArrayFromImage(out))[3:-3, 3:-3, 3:-3].max() < 1e-5


def test_save_probabilities_match_labels(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(synth(spacing=(6.0, 1.25, 1.25), size_xyz=(8, 30, 28)), str(inp / "c.nii.gz"))
    plans = tiny_plans(codes=False)
    model = write_model(tmp_path / "model", plans)
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--device", "cpu", "--quiet",
                            "--save-probabilities"])
    assert code == 0, err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "c.nii.gz")))
    probs = load_probabilities(tmp_path / "out" / "c.npz").full()
    assert probs.shape == (4,) + labels.shape
    srt = np.sort(probs, 0)
    confident = srt[-1] - srt[-2] > 1e-2
    assert np.array_equal(probs.argmax(0)[confident], labels[confident])


def test_hc_predict_applies_stored_postprocessing(tmp_path):
    import cc3d

    from heartcascade.inference.postprocessing import POSTPROCESSING_FILE, Postprocessing

    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(synth(size_xyz=(40, 36, 10)), str(inp / "a.nii.gz"))
    plans = tiny_plans(codes=False, roi_rule="all_foreground")
    model = write_model(tmp_path / "model", plans)
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "raw", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "raw" / "a.nii.gz")))
    counts = [cc3d.connected_components(raw == c, connectivity=26, return_N=True)[1] for c in (1, 2, 3)]
    assert max(counts) > 1, "the untrained network should leave several components somewhere"
    post = Postprocessing(keep_largest_foreground=False, keep_largest_per_label=(1, 2, 3))
    (model / "fold_0" / POSTPROCESSING_FILE).write_text(json.dumps(post.to_dict()))
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "pp", "-m", model, "--device", "cpu", "--quiet"])
    assert code == 0, err
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pp" / "a.nii.gz")))
    assert np.array_equal(got, post.apply(raw.copy())) and not np.array_equal(got, raw)
    for c in (1, 2, 3):
        assert cc3d.connected_components(got == c, connectivity=26, return_N=True)[1] <= 1
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "off", "-m", model, "--device", "cpu", "--quiet",
                            "--no-postprocessing"])
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "off" / "a.nii.gz"))), raw)


def test_postprocessing_file_of_an_ensemble(tmp_path):
    from heartcascade.inference.postprocessing import POSTPROCESSING_FILE, Postprocessing

    plans = tiny_plans()
    model = write_model(tmp_path / "model", plans, folds=(0, 1))
    (model / "fold_0" / POSTPROCESSING_FILE).write_text(json.dumps(Postprocessing(True).to_dict()))
    assert Predictor.from_model_dir(model, device="cpu").postprocessing == Postprocessing(True)  # first fold's
    (model / POSTPROCESSING_FILE).write_text(json.dumps(Postprocessing(False, (2,)).to_dict()))
    both = Predictor.from_model_dir(model, device="cpu")
    assert both.postprocessing == Postprocessing(False, (2,)) and both.postprocessing_source == model / POSTPROCESSING_FILE
    assert Predictor.from_model_dir(model, folds=[0], device="cpu").postprocessing == Postprocessing(True)
    assert Predictor.from_model_dir(model, folds=[1], device="cpu").postprocessing == Postprocessing(False, (2,))
    assert Predictor.from_model_dir(model, device="cpu", postprocessing=None).postprocessing is None
    (model / POSTPROCESSING_FILE).write_text(json.dumps(Postprocessing(False, (7,)).to_dict()))
    with pytest.raises(HCError, match="outside 1..3"):
        Predictor.from_model_dir(model, device="cpu")


# ------------------------------------------------------------------------------------------------
# CLI robustness


def _folder_of_cases(folder: Path, n: int) -> list[str]:
    folder.mkdir()
    ids = [f"case{i:02d}" for i in range(n)]
    for i, cid in enumerate(ids):
        sitk.WriteImage(synth(size_xyz=(24, 20, 6), seed=i), str(folder / f"{cid}_0000.nii.gz"))
    return ids


def test_part_sharding(tmp_path):
    ids = _folder_of_cases(tmp_path / "in", 5)
    model = write_model(tmp_path / "model", tiny_plans())
    written = []
    for part in (0, 1):
        out = tmp_path / f"out{part}"
        code, _, err = run_cli(["-i", tmp_path / "in", "-o", out, "-m", model, "--device", "cpu", "--quiet",
                                "--part-id", part, "--num-parts", 2])
        assert code == 0, err
        names = sorted(p.name.replace(".nii.gz", "") for p in out.glob("*.nii.gz"))
        assert names == sorted(ids)[part::2]
        assert (out / f"measures_part{part}.csv").is_file()
        written += names
    assert sorted(written) == ids
    code, _, err = run_cli(["-i", tmp_path / "in", "-o", tmp_path / "x", "-m", model, "--part-id", 2,
                            "--num-parts", 2])
    assert code == 1 and err.startswith("error: --part-id")


def test_bad_input_fails_alone(tmp_path):
    ids = _folder_of_cases(tmp_path / "in", 2)
    (tmp_path / "in" / "bad_0000.nii.gz").write_bytes(b"this is not an image at all" * 10)
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    model = write_model(tmp_path / "model", tiny_plans())
    code, out, err = run_cli(["-i", tmp_path / "in", "-o", tmp_path / "out", "-m", model, "--device", "cpu",
                              "--quiet"])
    assert code == 1
    bad_lines = [line for line in err.splitlines() if "bad" in line and line.startswith("error:")]
    assert len(bad_lines) == 1 and "Traceback" not in err
    assert "1 failed" in err.splitlines()[-1] and "2 predicted" in err.splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"{c}.nii.gz" for c in ids] + ["failures.csv", "itksnap_labels.txt", "measures.csv"])
    failures = (tmp_path / "out" / "failures.csv").read_text().splitlines()
    assert failures[0] == "case,error" and len(failures) == 2 and failures[1].startswith("bad,")


def test_existing_output_skipped_unless_overwrite(tmp_path):
    _folder_of_cases(tmp_path / "in", 2)
    model = write_model(tmp_path / "model", tiny_plans())
    out = tmp_path / "out"
    out.mkdir()
    sentinel = out / "case00.nii.gz"
    sentinel.write_bytes(b"keep me")
    code, stdout, err = run_cli(["-i", tmp_path / "in", "-o", out, "-m", model, "--device", "cpu"])
    assert code == 0, err
    assert sentinel.read_bytes() == b"keep me"
    assert "1 skipped" in stdout.splitlines()[-1]
    assert (out / "case01.nii.gz").is_file()
    code, _, err = run_cli(["-i", tmp_path / "in", "-o", out, "-m", model, "--device", "cpu", "--quiet",
                            "--overwrite"])
    assert code == 0, err
    assert sitk.ReadImage(str(sentinel)).GetSize() == (24, 20, 6)


def test_atomic_output_on_write_failure(tmp_path, monkeypatch):
    _folder_of_cases(tmp_path / "in", 2)
    model = write_model(tmp_path / "model", tiny_plans())
    from heartcascade.dataset import nifti_header

    real = nifti_header.write_with_header

    def flaky(array, reference, path, compress):
        if "case00" in str(reference):
            Path(path).write_bytes(b"partial")
            raise OSError("disk full")
        return real(array, reference, path, compress)

    monkeypatch.setattr(nifti_header, "write_with_header", flaky)
    code, _, err = run_cli(["-i", tmp_path / "in", "-o", tmp_path / "out", "-m", model, "--device", "cpu",
                            "--quiet"])
    assert code == 1 and "case00" in err and "disk full" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [  # no temp, no partial
        "case01.nii.gz", "failures.csv", "itksnap_labels.txt", "measures.csv"]


def test_model_folder_errors(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(synth(), str(inp / "a.nii.gz"))
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", tmp_path / "nope"])
    assert code == 1 and err.count("\n") == 1 and "not found" in err
    model = write_model(tmp_path / "model", tiny_plans(), folds=(0,))
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "-f", "3"])
    assert code == 1 and "fold_3" in err
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "out", "-m", model, "--checkpoint", "best"])
    assert code == 1 and "available: final" in err


def test_dataset_id_resolution(tmp_path, hc_roots):
    inp = tmp_path / "in"
    inp.mkdir()
    sitk.WriteImage(synth(), str(inp / "a.nii.gz"))
    (hc_roots["raw"] / "Dataset007_Tiny").mkdir()
    write_model(hc_roots["results"] / "Dataset007_Tiny" / "cascade", tiny_plans(), folds=("all",))
    code, _, err = run_cli(["-i", inp / "a.nii.gz", "-o", tmp_path / "out", "-d", 7, "-f", "all", "--quiet"])
    assert code == 0, err
    assert (tmp_path / "out" / "a.nii.gz").is_file()


# ------------------------------------------------------------------------------------------------
# Discovery and background I/O


def test_discover_cases(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("p1_0000.nii.gz", "p1_0001.nii.gz", "p2_0000.nii.gz", ".hidden_0000.nii.gz", "x.txt"):
        (d / name).write_bytes(b"")
    two = cases_mod.discover_cases(d, num_channels=2)
    assert [c.case_id for c in two] == ["p1", "p2"]
    assert two[0].error is None and [f.name for f in two[0].files] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]
    assert "p2_0001" in two[1].error
    one = cases_mod.discover_cases(d, num_channels=1)
    # p1_0000 + p1_0001 are one two-channel case: failed for a one-channel model, not two cases
    assert [c.case_id for c in one] == ["p1", "p2"]
    assert "takes 1 channel" in one[0].error and one[1].error is None
    (d / "p2.mha").write_bytes(b"")
    dup = {c.case_id: c for c in cases_mod.discover_cases(d, num_channels=1)}
    assert dup["p2"].error and "also given" in dup["p2"].error
    assert cases_mod.discover_cases(d / "p2.mha")[0].output_ending == ".mha"
    assert [c.case_id for c in cases_mod.shard(one, 1, 2)] == ["p2"]
    with pytest.raises(HCError):
        cases_mod.discover_cases(tmp_path / "missing")


def test_prefetch_and_writer_capture_errors():
    def load(i):
        if i == 2:
            raise ValueError("boom")
        return i * 10

    got = [(x.item, x.value, type(x.error).__name__ if x.error else None) for x in prefetch(range(4), load)]
    assert got == [(0, 0, None), (1, 10, None), (2, None, "ValueError"), (3, 30, None)]
    done = []
    writer = BackgroundWriter(max_pending=1)
    writer.on_done(lambda key, err: done.append(key))
    writer.submit("a", lambda: None)
    writer.submit("b", lambda: 1 / 0)
    errors = writer.close()
    assert set(errors) == {"b"} and sorted(done) == ["a", "b"]


# ------------------------------------------------------------------------------------------------
# Clinical output formats and cohort runs (issue #22)


def write_dicom_series(image: sitk.Image, folder: Path) -> Path:
    """``image`` as an MR DICOM series (int16 slices with the tags a DICOM-SEG must reference)."""
    folder.mkdir(parents=True)
    arr = sitk.GetArrayFromImage(image).astype(np.float64)
    scaled = sitk.GetImageFromArray(np.round((arr - arr.min()) / max(np.ptp(arr), 1e-6) * 1000).astype(np.int16))
    scaled.CopyInformation(image)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    root = "1.2.826.0.1.3680043.2.1125.7"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(scaled.GetSize()[2]):
        s = scaled[:, :, i]
        for tag, value in {"0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{root}.3.{i + 1}",
                           "0020|000d": f"{root}.1", "0020|000e": f"{root}.2", "0020|0052": f"{root}.4",
                           "0008|0060": "MR", "0010|0010": "Test^Heart", "0010|0020": "HC001",
                           "0020|0010": "1", "0020|0011": "1", "0020|0013": str(i + 1),
                           "0008|0020": "20260101", "0008|0030": "120000", "0020|0037": orientation,
                           "0020|0032": "\\".join(f"{v:.6f}" for v in
                                                   scaled.TransformIndexToPhysicalPoint((0, 0, i)))}.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{i:03d}.dcm"))
        writer.Execute(s)
    return folder


def test_dicom_series_to_dicom_seg_and_seg_nrrd(shared_data, tmp_path):
    """One MS-CMRSeg scan as a DICOM series -> DICOM-SEG (read back by highdicom: three named, coded
    segments, voxel for voxel the NIfTI prediction) and seg.nrrd (same labels and names)."""
    import highdicom as hd

    from heartcascade.dataset.segformats.dicom_seg import series_files
    from heartcascade.dataset.segformats.seg_nrrd import read_seg_nrrd_segments
    from heartcascade.inference.batch import predict_files

    scan = sitk.ReadImage(str(shared_data / "mscmrseg2019_bssfp" / "image_1.nii.gz"))
    series = write_dicom_series(scan[64:192, 64:192, :], tmp_path / "patient1")
    predictor = Predictor(tiny_plans(), build(tiny_plans()), device="cpu")
    for fmt in ("nifti", "dicom-seg", "seg.nrrd"):
        report = predict_files(predictor, series, tmp_path / fmt, output_format=fmt, background_io=False)
        assert report.ok and report.written == ["patient1"], report.failed
    nifti = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "nifti" / "patient1.nii.gz")))
    assert set(np.unique(nifti)) == {0, *CODES.values()}  # the seeded untrained model paints all three
    assert set(np.unique(nifti)) - {0} <= set(CODES.values()) and nifti.any()
    seg = hd.seg.segread(tmp_path / "dicom-seg" / "patient1.dcm")
    described = {n: seg.get_segment_description(n) for n in seg.segment_numbers}
    assert [d.segment_label for d in described.values()] == ["Myo", "LV", "RV"]
    assert described[2].segmented_property_type.value == "87878005"  # SNOMED-CT left ventricle
    assert described[2].segmented_property_category.value == "91723000"  # anatomical structure
    uids = [pydicom_uid(f) for f in series_files(series)]
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.2.1125.7.1"  # the input's study, referencing its slices
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == len(uids)
    numbers = seg.get_pixels_by_source_instance(uids, combine_segments=True, skip_overlap_checks=True)
    by_number = np.array([0, CODES[1], CODES[2], CODES[3]])  # segment n is training label n here
    assert np.array_equal(by_number[numbers], nifti)
    back = sitk.ReadImage(str(tmp_path / "seg.nrrd" / "patient1.seg.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(back), nifti)
    assert read_seg_nrrd_segments(tmp_path / "seg.nrrd" / "patient1.seg.nrrd") == {200: "Myo", 500: "LV", 600: "RV"}
    # a NIfTI input cannot become a DICOM-SEG: that case fails alone, with a clear reason
    sitk.WriteImage(synth(), str(tmp_path / "plain.nii.gz"))
    report = predict_files(predictor, tmp_path / "plain.nii.gz", tmp_path / "x", output_format="dicom-seg")
    assert "needs a DICOM series" in report.failed["plain"]


def pydicom_uid(path: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_cohort_list_with_a_broken_file(tmp_path):
    """A case list with one broken and one missing file: the others are predicted, failures.csv names
    both, the exit code is 1 and the last line sums it up; measures.csv covers the good cases."""
    ids = _folder_of_cases(tmp_path / "in", 3)
    (tmp_path / "in" / "broken_0000.nii.gz").write_bytes(b"not an image" * 20)
    names = [f"in/{c}_0000.nii.gz" for c in ids] + ["in/broken_0000.nii.gz", "in/gone_0000.nii.gz"]
    (tmp_path / "cohort.csv").write_text("case,image\n" + "".join(f"p{i},{n}\n" for i, n in enumerate(names)))
    model = write_model(tmp_path / "model", tiny_plans())
    code, out, err = run_cli(["-i", tmp_path / "cohort.csv", "-o", tmp_path / "out", "-m", model, "--device", "cpu"])
    assert code == 1
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["p0.nii.gz", "p1.nii.gz", "p2.nii.gz"]
    failures = list(csv.DictReader((tmp_path / "out" / "failures.csv").open()))
    assert [r["case"] for r in failures] == ["p3", "p4"]
    assert "broken_0000.nii.gz" in failures[0]["error"] and "not found" in failures[1]["error"]
    last = err.strip().splitlines()[-1]
    assert last.startswith("hc_predict: 3 predicted") and "2 failed: p3, p4" in last and "failures.csv" in last
    assert "[3/4]" in out and "ETA" in out and " s -> " in out  # i/N of the readable cases, per-case time
    measured = list(csv.DictReader((tmp_path / "out" / "measures.csv").open()))
    assert [r["case"] for r in measured] == ["p0", "p1", "p2"] and "LV_ml" in measured[0]
    # rerun after fixing nothing: good cases skipped, measures kept, still failing
    code, out, err = run_cli(["-i", tmp_path / "cohort.csv", "-o", tmp_path / "out", "-m", model, "--device", "cpu",
                              "--quiet"])
    assert code == 1 and "3 skipped" in err.strip().splitlines()[-1]
    assert [r["case"] for r in csv.DictReader((tmp_path / "out" / "measures.csv").open())] == ["p0", "p1", "p2"]
