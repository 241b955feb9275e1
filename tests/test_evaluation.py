"""Evaluation metrics against hand-computed values, folder evaluation and the hc_evaluate CLI."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade.cli.evaluate import main, parse_labels
from heartcascade.evaluation.evaluate import case_name, evaluate_folders, to_training_labels
from heartcascade.evaluation.metrics import (
    WHOLE_HEART,
    binary_metrics,
    label_metrics,
    mean_over_structures,
    surface_distances,
    surface_mask,
)
from heartcascade.utils.errors import HCError


def cube(shape, start, size) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def brute_force_distances(ref, pred, spacing):
    """Independent check: all pairwise surface-point distances, no distance transform."""
    sp = np.asarray(spacing, dtype=float)
    a = np.argwhere(surface_mask(ref)) * sp
    b = np.argwhere(surface_mask(pred)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def ball(shape, spacing, center_mm, radius_mm) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center_mm)) <= radius_mm**2


# ---------------------------------------------------------------------------------------------------
# metrics


def test_surface_is_mask_minus_six_connected_erosion():
    assert surface_mask(cube((7, 7, 7), (1, 1, 1), 3)).sum() == 26  # only the centre voxel is interior
    assert surface_mask(cube((9, 9, 9), (2, 2, 2), 5)).sum() == 125 - 27
    # a mask touching the array border: outside counts as background
    assert surface_mask(np.ones((4, 4, 4), dtype=bool)).sum() == 64 - 8


def test_identical_masks():
    m = ball((20, 30, 30), (1.5, 1.0, 1.0), (15, 15, 15), 8)
    r = binary_metrics(m, m, (1.5, 1.0, 1.0))
    assert (r.dice, r.jaccard, r.assd, r.hd95, r.status) == (1.0, 1.0, 0.0, 0.0, "ok")


def test_shifted_cubes_exact_overlap_and_distances():
    ref = cube((30, 30, 30), (10, 10, 10), 10)
    pred = cube((30, 30, 30), (10, 10, 13), 10)  # shifted by 3 voxels along the last axis
    spacing = (2.0, 0.7, 1.3)
    r = binary_metrics(ref, pred, spacing)
    assert r.dice == pytest.approx(2 * 700 / 2000)
    assert r.jaccard == pytest.approx(700 / 1300)
    d_rp, d_pr = brute_force_distances(ref, pred, spacing)
    pooled = np.concatenate([d_rp, d_pr])
    assert r.assd == pytest.approx(pooled.mean(), abs=1e-4)
    assert r.hd95 == pytest.approx(np.percentile(pooled, 95), abs=1e-4)
    assert pooled.max() == pytest.approx(3 * 1.3)


def test_single_voxels_distance_uses_spacing_in_array_order():
    ref = np.zeros((10, 10, 10), dtype=bool)
    pred = np.zeros_like(ref)
    ref[2, 2, 2] = True
    pred[3, 4, 5] = True
    r = binary_metrics(ref, pred, (2.0, 0.5, 1.0))
    d = math.sqrt((1 * 2.0) ** 2 + (2 * 0.5) ** 2 + (3 * 1.0) ** 2)
    assert r.dice == 0.0 and r.jaccard == 0.0
    assert r.assd == pytest.approx(d, abs=1e-5)
    assert r.hd95 == pytest.approx(d, abs=1e-5)


def test_hd95_ignores_a_small_outlier_but_assd_does_not():
    ref = cube((40, 40, 40), (5, 5, 5), 5)  # 98 surface voxels
    pred = ref.copy()
    pred[35, 35, 35] = True  # one stray voxel: pooled set = 98 + 99 distances, one of them non-zero
    d = math.dist((35, 35, 35), (9, 9, 9))
    r = binary_metrics(ref, pred, (1.0, 1.0, 1.0))
    assert r.hd95 == 0.0
    assert r.assd == pytest.approx(d / 197, abs=1e-5)


def test_concentric_spheres_anisotropic():
    spacing = (2.0, 0.8, 0.8)
    shape = (24, 50, 50)
    center = (12 * 2.0, 25 * 0.8, 25 * 0.8)
    r = binary_metrics(ball(shape, spacing, center, 10), ball(shape, spacing, center, 14), spacing)
    assert r.assd == pytest.approx(4.0, abs=max(spacing))
    assert r.hd95 == pytest.approx(4.0, abs=max(spacing))
    assert r.dice == pytest.approx(2 * 10**3 / (10**3 + 14**3), abs=0.02)


def test_cropping_matches_brute_force_at_array_border():
    rng = np.random.default_rng(0)
    ref = np.zeros((12, 14, 16), dtype=bool)
    ref[0:6, 3:14, 10:16] = True  # touches three borders
    pred = ref ^ (rng.random(ref.shape) < 0.05)
    spacing = (1.7, 0.9, 0.6)
    d_rp, d_pr = surface_distances(ref, pred, spacing)
    b_rp, b_pr = brute_force_distances(ref, pred, spacing)
    np.testing.assert_allclose(d_rp, b_rp, atol=1e-4)
    np.testing.assert_allclose(d_pr, b_pr, atol=1e-4)


def test_empty_structure_rules():
    empty = np.zeros((8, 8, 8), dtype=bool)
    full = cube((8, 8, 8), (2, 2, 2), 3)
    both = binary_metrics(empty, empty, (1, 1, 1))
    assert (both.dice, both.jaccard, both.assd, both.hd95, both.status) == (1.0, 1.0, 0.0, 0.0, "both_empty")
    missed = binary_metrics(full, empty, (1, 1, 1))
    assert missed.dice == 0.0 and missed.jaccard == 0.0 and missed.status == "pred_empty"
    assert math.isnan(missed.assd) and math.isnan(missed.hd95)
    assert missed.to_dict()["assd"] is None and missed.to_dict()["hd95"] is None
    extra = binary_metrics(empty, full, (1, 1, 1))
    assert extra.status == "ref_empty" and math.isnan(extra.hd95)

    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[pred == 2] = 0
    res = label_metrics(ref, pred, (1, 1, 1), {"A": 1, "B": 2, "C": 3})
    assert res["A"].dice == 1.0 and res["B"].status == "pred_empty" and res["C"].status == "both_empty"
    assert res[WHOLE_HEART].dice == pytest.approx(2 * 27 / (54 + 27))
    mean = mean_over_structures(res)
    assert mean["dice"] == pytest.approx((1 + 0 + 1) / 3)
    assert mean["assd"] == 0.0  # mean of A (0) and C (0); B's undefined distance is excluded
    assert mean["missing"] == 1 and mean["both_empty"] == 1


def test_label_metrics_whole_heart_is_union():
    ref = np.zeros((20, 20, 20), dtype=np.int16)
    ref[2:8, 2:8, 2:8] = 1
    ref[8:14, 2:8, 2:8] = 2
    pred = np.zeros_like(ref)
    pred[2:14, 2:8, 2:8] = 1  # all labelled 1: whole heart perfect, structures half right
    res = label_metrics(ref, pred, (1.0, 1.0, 1.0), {"A": 1, "B": 2})
    assert res[WHOLE_HEART].dice == 1.0 and res[WHOLE_HEART].assd == 0.0
    assert res["A"].dice == pytest.approx(2 * 216 / (216 + 432))
    assert res["B"].status == "pred_empty"
    full = binary_metrics(ref == 1, pred == 1, (1.0, 1.0, 1.0))
    assert res["A"] == full


# ---------------------------------------------------------------------------------------------------
# folders, label codes, CLI


def write(path: Path, array: np.ndarray, spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def two_structures(shift: int = 0) -> np.ndarray:
    arr = np.zeros((12, 24, 24), dtype=np.int16)
    arr[3:9, 4:12, 4 + shift : 12 + shift] = 1
    arr[3:9, 12:20, 4:12] = 2
    return arr


def test_case_name_pairing():
    assert case_name("ct_1001_0000.nii.gz") == "ct_1001"
    assert case_name("ct_1001.nii") == "ct_1001"
    assert case_name("a.mha") == "a" and case_name("b_0000.nrrd") == "b"


def test_geometry_mismatch_names_both_files(tmp_path):
    ref = write(tmp_path / "ref" / "c1.nii.gz", two_structures())
    pred = write(tmp_path / "pred" / "c1.nii.gz", two_structures(), origin=(0.0, 0.0, 5.0))
    with pytest.raises(HCError, match="geometry") as info:
        evaluate_folders(ref.parent, pred.parent, {"A": 1, "B": 2}, progress=False)
    assert str(ref) in str(info.value) and str(pred) in str(info.value)


def test_prediction_without_reference(tmp_path):
    write(tmp_path / "ref" / "c1.nii.gz", two_structures())
    write(tmp_path / "pred" / "c2.nii.gz", two_structures())
    with pytest.raises(HCError, match="c2"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", {"A": 1, "B": 2}, progress=False)


def test_label_codes_are_mapped_back(tmp_path):
    codes = {1: 500, 2: 205}
    coded = two_structures()
    coded[coded == 1] = 500
    coded[coded == 2] = 205
    write(tmp_path / "ref" / "c1.nii.gz", coded)  # reference in original codes
    # prediction in training labels, stored as float64 like some public label files
    write(tmp_path / "pred" / "c1_0000.nii.gz", two_structures(shift=2).astype(np.float64))
    s = evaluate_folders(tmp_path / "ref", tmp_path / "pred", {"LV": 1, "Myo": 2}, label_codes=codes,
                         progress=False)
    m = s["cases"]["c1"]["metrics"]
    assert m["Myo"]["dice"] == 1.0
    assert m["LV"]["dice"] == pytest.approx(2 * 6 * 8 * 6 / (2 * 6 * 8 * 8))
    # without the codes, 500 and 205 are unknown values
    with pytest.raises(HCError, match=r"c1\.nii\.gz.*205, 500"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred", {"LV": 1, "Myo": 2}, progress=False)
    with pytest.raises(HCError, match="unknown label values 7"):
        to_training_labels(np.array([0, 1, 7, 500]), [1, 2], codes, "x.nii.gz")
    with pytest.raises(HCError, match="mixes"):
        to_training_labels(np.array([0, 1, 500]), [1, 2], codes, "x.nii.gz")
    np.testing.assert_array_equal(to_training_labels(np.array([0, 205, 500]), [1, 2], codes, "x"), [0, 2, 1])


def test_cli_end_to_end(tmp_path, capsys):
    for i, shift in enumerate((0, 1, 3)):
        write(tmp_path / "ref" / f"case{i}.nii.gz", two_structures())
        write(tmp_path / "pred" / f"case{i}.nii.gz", two_structures(shift))
    out = tmp_path / "eval" / "summary.json"
    rc = main(["-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "-o", str(out),
               "--labels", "1:LV,2:Myo", "-np", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "| LV |" in printed and "| Myo | 1.0000 | 1.0000 | 0.00 | 0.00 |" in printed

    summary = json.loads(out.read_text())
    assert summary["num_cases"] == 3 and set(summary["cases"]) == {"case0", "case1", "case2"}
    lv = [summary["cases"][f"case{i}"]["metrics"]["LV"]["dice"] for i in range(3)]
    assert lv == pytest.approx([1.0, 7 / 8, 5 / 8])
    agg = summary["aggregate"]["LV"]["dice"]
    assert agg["mean"] == pytest.approx(np.mean(lv)) and agg["median"] == pytest.approx(7 / 8)
    assert agg["std"] == pytest.approx(np.std(lv)) and agg["n"] == 3
    assert set(summary["aggregate"]) == {"LV", "Myo", "whole_heart", "mean"}

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert len(rows) == 3 * 3  # cases x (2 structures + whole heart)
    assert {r["structure"] for r in rows} == {"LV", "Myo", "whole_heart"}
    assert out.with_suffix(".md").read_text().startswith("Evaluation of 3 case(s)")


def test_cli_dataset_id_and_errors(tmp_path, capsys, hc_roots):
    dataset = hc_roots["raw"] / "Dataset007_Heart"
    dataset.mkdir()
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "LV": 1, "Myo": 2},
        "numTraining": 1, "file_ending": ".nii.gz", "label_codes": {"1": 500, "2": 205}}))
    coded = two_structures()
    coded[coded == 1] = 500
    coded[coded == 2] = 205
    write(tmp_path / "ref" / "c1.nii.gz", coded)
    write(tmp_path / "pred" / "c1.nii.gz", coded)
    rc = main(["-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "-d", "7", "--quiet"])
    assert rc == 0
    summary = json.loads((tmp_path / "pred" / "summary.json").read_text())
    assert summary["aggregate"]["mean"]["dice"]["mean"] == 1.0
    capsys.readouterr()

    rc = main(["-ref", str(tmp_path / "nope"), "-pred", str(tmp_path / "pred"), "--labels", "1:LV", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "nope" in err and "Traceback" not in err
    with pytest.raises(HCError):
        parse_labels("LV:1")
    assert parse_labels("1:LV:500, 2:Myo:205") == ({"LV": 1, "Myo": 2}, {1: 500, 2: 205})


# ---------------------------------------------------------------------------------------------------
# connected-component postprocessing


def _pp_case(shape=(12, 30, 30)) -> tuple[np.ndarray, np.ndarray]:
    """Reference: LV (1) cube touching a Myo (2) cube, plus a second, separate Myo piece; prediction:
    the reference plus a stray LV blob far away (keep-largest helps LV; it would cut Myo's real piece)."""
    ref = np.zeros(shape, dtype=np.uint8)
    ref[cube(shape, (2, 5, 5), 6)] = 1
    ref[cube(shape, (2, 11, 5), 4)] = 2
    ref[cube(shape, (3, 22, 22), 3)] = 2
    pred = ref.copy()
    pred[cube(shape, (8, 24, 2), 2)] = 1
    return ref, pred


def test_postprocessing_kept_only_where_it_raises_dice(tmp_path):
    from heartcascade.evaluation.postprocessing import determine_postprocessing
    from heartcascade.inference.postprocessing import Postprocessing, load_postprocessing

    labels = {"LV": 1, "Myo": 2}
    ref_pairs = [_pp_case() for _ in range(2)]
    for i, (ref, pred) in enumerate(ref_pairs):
        write(tmp_path / "ref" / f"c{i}.nii.gz", ref)
        write(tmp_path / "pred" / f"c{i}.nii.gz", pred)
    out = tmp_path / "pp.json"
    result = determine_postprocessing(tmp_path / "pred", tmp_path / "ref", labels, output_json=out)
    # whole foreground: would delete the real second Myo piece and the stray -> Myo falls, not applied;
    # LV: its stray goes -> applied; Myo: keeping its largest piece loses the real small one -> not applied
    assert result["decisions"]["foreground"]["applied"] is False
    assert result["decisions"]["LV"]["applied"] is True and result["decisions"]["Myo"]["applied"] is False
    assert result["decisions"]["LV"]["dice_after"] == pytest.approx(1.0)
    assert result["dice_after"]["mean"] > result["dice_before"]["mean"]
    post = load_postprocessing(out)
    assert post == Postprocessing(False, (1,), 26)
    ref, pred = ref_pairs[0]
    assert np.array_equal(post.apply(pred.copy()), ref)

    # a stray blob of two touching labels: the whole-foreground step removes it at once
    shape = (12, 30, 30)
    ref, _ = _pp_case(shape)
    ref[cube(shape, (3, 22, 22), 3)] = 0  # one Myo piece only
    pred = ref.copy()
    pred[cube(shape, (8, 24, 2), 3)] = 1
    pred[cube(shape, (8, 24, 5), 3)] = 2
    write(tmp_path / "ref2" / "c.nii.gz", ref)
    write(tmp_path / "pred2" / "c.nii.gz", pred)
    result = determine_postprocessing([tmp_path / "pred2"], tmp_path / "ref2", labels)
    assert result["keep_largest_foreground"] is True
    assert result["keep_largest_per_label"] == []  # nothing left to gain after the foreground step
    assert result["dice_after"]["mean"] == pytest.approx(1.0)


def test_postprocessing_file_errors(tmp_path):
    from heartcascade.inference.postprocessing import load_postprocessing

    path = tmp_path / "postprocessing.json"
    path.write_text(json.dumps({"format_version": 1, "keep_largest_per_label": ["LV"]}))
    with pytest.raises(HCError, match="postprocessing.json: keep_largest_per_label"):
        load_postprocessing(path)
    path.write_text(json.dumps({"format_version": 1, "connectivity": 5}))
    with pytest.raises(HCError, match="connectivity"):
        load_postprocessing(path)


def test_determine_postprocessing_cli_pools_folds(tmp_path, capsys, hc_roots):
    from heartcascade.cli.determine_postprocessing import main as pp_main

    dataset = hc_roots["raw"] / "Dataset008_Heart"
    (dataset / "labelsTr").mkdir(parents=True)
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MR"}, "labels": {"background": 0, "LV": 1, "Myo": 2},
        "numTraining": 2, "file_ending": ".nii.gz", "label_codes": {"1": 500, "2": 205}}))
    config = hc_roots["results"] / "Dataset008_Heart" / "cascade"
    for fold in (0, 1):
        ref, pred = _pp_case()
        for array, folder in ((ref, dataset / "labelsTr"), (pred, config / f"fold_{fold}" / "validation")):
            coded = np.where(array == 1, 500, np.where(array == 2, 205, 0)).astype(np.int16)
            write(folder / f"c{fold}.nii.gz", coded)
    assert pp_main(["-d", "8", "-c", "cascade", "-f", "0", "1"]) == 0
    written = json.loads((config / "postprocessing.json").read_text())
    assert written["num_cases"] == 2 and written["keep_largest_per_label"] == [1]
    assert "wrote" in capsys.readouterr().out
    assert pp_main(["-d", "8", "-f", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "fold_3" in err and err.count("\n") == 1
