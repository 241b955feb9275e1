"""Planning: fingerprint statistics, planner rules, plans schema, presets, memory model vs measurement."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade.dataset.dataset_json import MMWHS_LABELS, DatasetInfo, load_dataset
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import memory_model as mm
from heartcascade.planning import planner, presets
from heartcascade.planning.plans import (
    PLANS_VERSION,
    load_plans,
    net1_kwargs,
    net1_network_kwargs,
    net2_kwargs,
    net2_network_kwargs,
    parse_plans,
    preprocessing_hash,
    save_plans,
)
from heartcascade.utils.errors import HCError

from test_preprocessing import make_raw_dataset  # noqa: E402 - shared tiny-dataset helper

CT_INFO = DatasetInfo(Path("/nowhere/Dataset001_HeartCT"), {"0": "CT"}, dict(MMWHS_LABELS), 20, ".nii.gz")
MR_INFO = DatasetInfo(Path("/nowhere/Dataset002_CMR"), {"0": "MR"}, {"background": 0, "Myo": 1, "LV": 2, "RV": 3},
                      25, ".nii.gz", label_codes={1: 200, 2: 500, 3: 600})


def synthetic_fingerprint(spacing, cropped_p95, cropped_median, min_slices, ratio=1.1, intensity=(-150.0, 650.0)):
    """Aggregate-level fingerprint of a dataset geometry (all the planner reads)."""
    fov95 = [a * b for a, b in zip(cropped_p95, spacing)]
    fovm = [a * b for a, b in zip(cropped_median, spacing)]
    return {"num_cases": 20, "spacing": {"median": list(spacing)}, "inplane_spacing_ratio": ratio,
            "inplane_spacing_median": float(spacing[1]), "fov_mm": {"p95": fov95, "median": fovm},
            "cropped_shape": {"p95": list(cropped_p95), "median": list(cropped_median)}, "min_slices": min_slices,
            "intensity": [{"percentile_00_5": intensity[0], "percentile_99_5": intensity[1]}]}


# MM-WHS CT: 512 x 512 x ~180-360 slices at ~0.45 x 0.45 x 0.625 mm (cropped to the body)
MMWHS_CT = synthetic_fingerprint([0.625, 0.45, 0.45], [300, 480, 480], [230, 420, 430], 150)
# MS-CMRSeg bSSFP: 256 x 256 x (11..19) at 1.25 x 1.25 x 7.99 mm
MSCMR = synthetic_fingerprint([7.99, 1.25, 1.25], [17, 240, 240], [15, 220, 220], 11)


@pytest.fixture(scope="module")
def paper() -> dict:
    return presets.load_preset("paper")


# ---------------------------------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------------------------------

def test_fingerprint_statistics_match_numpy(tmp_path):
    info = make_raw_dataset(tmp_path, 3, "Fp", n_cases=3, spacing=(0.8, 0.8, 2.5), size_xyz=(32, 30, 14))
    fp = fpmod.compute_fingerprint(load_dataset(info.folder), num_processes=1, progress=False)
    values, counts = [], np.zeros(4, int)
    for case in info.training_cases():
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images[0]))).astype(np.float64)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(case.label)))
        values.append(img[lab > 0])
        counts += np.bincount(lab.ravel(), minlength=4)
        rec = next(r for r in fp["cases"] if r["case_id"] == case.case_id)
        assert rec["slice_axis"] == 2 and rec["spacing"] == pytest.approx([2.5, 0.8, 0.8])
        assert rec["shape"] == [14, 30, 32]
        fg = np.argwhere(lab > 0)
        extent = (fg.max(0) - fg.min(0) + 1) * np.array([2.5, 0.8, 0.8])
        assert rec["foreground_extent_mm"] == pytest.approx(extent.tolist())
        assert rec["intensity"][0]["mean"] == pytest.approx(img[lab > 0].mean())
    pooled = np.concatenate(values)
    assert pooled.size < 3 * fpmod.SAMPLES_PER_CASE  # every voxel sampled: statistics are exact
    stats = fp["intensity"][0]
    assert stats["n"] == pooled.size
    assert stats["mean"] == pytest.approx(pooled.mean(), rel=1e-6)
    assert stats["std"] == pytest.approx(pooled.std(), rel=1e-6)
    assert stats["percentile_00_5"] == pytest.approx(np.percentile(pooled, 0.5), rel=1e-5)
    assert stats["percentile_99_5"] == pytest.approx(np.percentile(pooled, 99.5), rel=1e-5)
    assert fp["class_voxels_total"] == counts.tolist()
    assert fp["spacing"]["median"] == pytest.approx([2.5, 0.8, 0.8])
    assert fp["min_slices"] == min(r["cropped_shape"][0] for r in fp["cases"])
    assert fpmod.fingerprint_is_current(fp, info)
    json.dumps(fp)  # JSON-serialisable


# ---------------------------------------------------------------------------------------------------
# Planner rules
# ---------------------------------------------------------------------------------------------------

def test_k_rule():
    assert planner.choose_k(0.625, 200) == 9  # MM-WHS CT
    assert planner.choose_k(0.5, 200) == 9
    assert planner.choose_k(0.65, 200) == 9
    assert planner.choose_k(7.99, 11) == 3  # MS-CMRSeg
    assert planner.choose_k(0.625, 7) == 7  # capped by the thinnest case
    assert planner.choose_k(0.625, 8) == 7
    assert planner.choose_k(7.99, 2) == 1
    for spacing in (0.3, 0.9, 1.5, 2.5, 5.0):
        assert planner.choose_k(spacing, 50) % 2 == 1


def test_inplane_spacing_rule():
    assert planner.choose_inplane_spacing(dict(MMWHS_CT, inplane_spacing_ratio=1.9)) is None
    wide = dict(MMWHS_CT, inplane_spacing_ratio=2.3, inplane_spacing_median=0.41)
    assert planner.choose_inplane_spacing(wide) == [0.41, 0.41]


def _check_plans(plans: dict, usable_gb: float) -> None:
    assert all(v % 16 == 0 for v in plans["settings"]["net1"]["patch_shape"])
    div = plans["settings"]["net2"]["required_divisor"]
    peaks = plans["report"]["memory"]["predicted_peak_gb"]
    assert set(peaks) == {"step1", "step2", "step3", "step4", "inference", "baseline"}
    for step in plans["settings"]["training"]["steps"]:
        assert peaks[f"step{step['step']}"] <= usable_gb + 1e-6, step
    for shape in parse_plans(plans).training.step(3).subvolume_shapes:
        assert shape[1] % div == 0 and shape[2] % div == 0 and shape[0] >= plans["settings"]["net2"]["K"]
    # the whole 95th-percentile field of view fits Net1's patch
    fov = plans["report"]["fingerprint_summary"]["fov_mm_p95"]
    assert all(p * s >= f - 1e-6 for p, s, f in zip(plans["settings"]["net1"]["patch_shape"], plans["settings"]["net1"]["coarse_spacing"], fov))


def test_plan_ct_geometry(paper):
    plans = planner.plan_experiment(MMWHS_CT, paper, CT_INFO, 1, gpu_memory_gb=12)
    assert plans["plans_version"] == PLANS_VERSION and plans["report"]["preset"] == "paper"
    assert plans["settings"]["net2"]["K"] == 9 and plans["settings"]["modality"] == "ct" and plans["settings"]["num_classes"] == 8
    assert plans["settings"]["full_resolution"]["inplane_spacing"] is None
    assert plans["settings"]["normalization"][0] == {"channel": 0, "name": "CT", "scheme": "ct_clip", "clip_low": -150.0,
                                         "clip_high": 650.0, "target_range": [-1.0, 1.0]}
    assert [s["losses"] for s in plans["settings"]["training"]["steps"]] == [["L1_ROI"], ["L1", "L1_ROI"], ["L1", "L2"], ["L2"]]
    assert parse_plans(plans).training.step(4).train == ("net2",) and parse_plans(plans).training.step(4).stack_shape[0] == 9
    assert all(s["epochs"] == 200 and s["iterations_per_epoch"] == 16 and s["lr"] == 1e-4
               for s in plans["settings"]["training"]["steps"])
    _check_plans(plans, plans["report"]["memory"]["usable_gb"])
    # the networks can be built from the plans
    from heartcascade.networks import Net1, Net2

    import torch
    with torch.device("meta"):
        Net1(**net1_kwargs(parse_plans(plans)))
        Net2(**net2_kwargs(parse_plans(plans)))


def test_plan_mr_geometry(paper):
    plans = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=12)
    assert plans["settings"]["net2"]["K"] == 3
    assert plans["settings"]["modality"] == "mr" and plans["settings"]["label_codes"] == {"1": 200, "2": 500, "3": 600}
    assert plans["settings"]["net1"]["coarse_spacing"][0] == pytest.approx(7.99)  # thick slices are never resampled
    assert plans["settings"]["normalization"][0]["scheme"] == "percentile_clip"
    assert plans["settings"]["augmentation"]["rotation_deg"][1:] == [0.0, 0.0]  # in-plane rotation only
    assert all(s[0] <= 11 for s in parse_plans(plans).training.step(3).subvolume_shapes)
    _check_plans(plans, plans["report"]["memory"]["usable_gb"])


def test_coarse_spacing_grows_as_memory_shrinks(paper):
    spacings = []
    for gb in (24, 12, 6):
        ctx = planner._Context(MMWHS_CT, paper, CT_INFO, gb)
        spacing, patch, network, peak = planner.choose_coarse_spacing(ctx)
        kwargs = net1_network_kwargs(network)
        assert peak <= ctx.usable and all(p % 16 == 0 for p in patch)
        # the whole 95th-percentile field of view fits the patch
        assert all(p * s >= f - 1e-6 for p, s, f in zip(patch, spacing, ctx.fov95))
        # no coarser than needed: one grid step finer does not fit
        finer = spacing[1] / paper["net1"]["coarse_spacing_step"]
        if finer >= 0.45:
            patch_f = planner.coarse_patch(ctx.fov95, planner._coarse_axes(ctx.native, finer))
            assert mm.net1_memory(kwargs, 1, patch_f).peak > ctx.usable
        spacings.append(spacing[1])
    assert spacings[0] < spacings[1] < spacings[2]


def test_widths_and_batches_adapt_to_memory(paper):
    big = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=16)
    small = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=1.2)
    for plans in (big, small):
        _check_plans(plans, plans["report"]["memory"]["usable_gb"])
    batches = lambda p: [s["batch_size"] for s in p["settings"]["training"]["steps"]]  # noqa: E731
    assert all(b >= s for b, s in zip(batches(big), batches(small)))
    assert big["settings"]["net2"]["base_features"] >= small["settings"]["net2"]["base_features"]
    assert big["settings"]["net1"]["base_features"] >= small["settings"]["net1"]["base_features"]
    assert (batches(big) != batches(small) or big["settings"]["net2"]["base_features"] > small["settings"]["net2"]["base_features"]
            or big["settings"]["net1"]["base_features"] > small["settings"]["net1"]["base_features"])
    assert big["settings"]["net2"]["base_features"] == paper["net2"]["base_features"]  # ample memory: the preset's widths
    assert sum(batches(big)) > sum(batches(small))


def test_memory_target_sources(paper, monkeypatch):
    monkeypatch.setattr(planner, "detect_gpu_memory_gb", lambda: None)
    assert planner.memory_target(paper, None) == (12.0, "default (no CUDA GPU found; the paper's 12 GB K40)")
    assert planner.memory_target(paper, 24.0)[0] == 24.0
    monkeypatch.setattr(planner, "detect_gpu_memory_gb", lambda: 79.6)
    assert planner.memory_target(paper, None) == (79.6, "detected CUDA GPU")
    with pytest.raises(HCError):
        planner.plan_experiment(MMWHS_CT, paper, CT_INFO, 1, gpu_memory_gb=0.55)


# ---------------------------------------------------------------------------------------------------
# Plans file, presets
# ---------------------------------------------------------------------------------------------------

def test_plans_roundtrip_and_validation(tmp_path):
    demo = presets.load_preset("demo")
    plans = planner.plan_experiment(synthetic_fingerprint([2.0, 2.0, 2.0], [50, 90, 90], [40, 80, 80], 32),
                                    demo, CT_INFO, 1)
    assert plans["report"]["memory"]["target_source"] == "preset 'demo'"
    path = tmp_path / "plans.json"
    save_plans(path, plans)
    good = path.read_text()
    assert load_plans(tmp_path).to_dict() == plans
    assert preprocessing_hash(parse_plans(plans)) == preprocessing_hash(load_plans(path))
    changed = json.loads(path.read_text())
    changed["settings"]["training"]["steps"][0]["epochs"] = 1
    assert preprocessing_hash(parse_plans(changed)) == preprocessing_hash(parse_plans(plans))  # schedule: data valid
    changed["settings"]["net1"]["coarse_spacing"] = [6.0, 6.0, 6.0]
    assert preprocessing_hash(parse_plans(changed)) != preprocessing_hash(parse_plans(plans))
    for breaker, message in ((lambda p: p["settings"].pop("net2"), "lack field"), (lambda p: p.update(plans_version=99), "99"),
                             (lambda p: p["settings"]["net2"].update(K=4), "odd")):
        bad = json.loads(good)
        breaker(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(HCError, match=message):
            load_plans(path)


def test_preset_step_losses_and_dice_weighting_reach_the_plans(paper):
    custom = json.loads(json.dumps(paper))
    custom["training"]["steps"][0]["losses"] = ["L1", "L1_ROI", "CE1"]
    custom["training"]["dice_weighting"] = "uniform"
    plans = planner.plan_experiment(MMWHS_CT, custom, CT_INFO, 1, gpu_memory_gb=12)
    assert [s["losses"] for s in plans["settings"]["training"]["steps"]] == [["L1", "L1_ROI", "CE1"], ["L1", "L1_ROI"],
                                                                ["L1", "L2"], ["L2"]]
    from heartcascade.training.steps import check_losses

    p = parse_plans(plans)
    assert p.training.dice_weighting == "uniform" and p.training.step(1).losses == ("L1", "L1_ROI", "CE1")
    plans["settings"]["training"]["dice_weighting"] = "median"
    with pytest.raises(HCError, match="dice_weighting"):
        parse_plans(plans)
    plans["settings"]["training"]["dice_weighting"] = "inverse_count"
    plans["settings"]["training"]["steps"][1]["losses"] = ["L1", "CE3"]
    with pytest.raises(HCError, match="unknown loss"):
        check_losses(parse_plans(plans).training_steps("cascade"))
    plans["settings"]["training"]["steps"][1]["losses"] = ["L1", "L2"]  # step 2 runs Net1 alone
    check_losses(parse_plans(plans).training_steps("cascade"))
    plans["settings"]["training"]["steps"][3]["losses"] = ["L1"]  # step 4's slice stacks have no Net1 output
    with pytest.raises(HCError, match=r"training.steps\[4\].losses \['L1'\] read an output"):
        check_losses(parse_plans(plans).training_steps("cascade"))


def test_step4_stacks_capped_at_the_presets_inplane_mm(paper):
    """A heart-sized step-4 window: K x (max_inplane_mm / spacing, up to Net2's divisor), never larger
    than the full slice; inference (whole ROI, memory tile) is unchanged."""
    assert planner.step4_tile([256, 256], [1.25, 1.25], None, 8) == [256, 256]
    assert planner.step4_tile([256, 256], [1.25, 1.25], 160.0, 8) == [128, 128]
    assert planner.step4_tile([256, 96], [1.25, 1.25], 150.0, 8) == [120, 96]
    capped = json.loads(json.dumps(paper))
    capped["training"]["steps"][3]["max_inplane_mm"] = 160.0
    a = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=12)
    b = planner.plan_experiment(MSCMR, capped, MR_INFO, 2, gpu_memory_gb=12)
    divisor = b["settings"]["net2"]["required_divisor"]
    spacing = b["settings"]["full_resolution"]["spacing"]
    s4a, s4b = a["settings"]["training"]["steps"][3], b["settings"]["training"]["steps"][3]
    assert not a["settings"]["net2"]["tiling"] and s4a["stack_shape"][1:] == a["settings"]["net2"]["full_slice_shape"]
    assert s4b["stack_shape"][0] == s4a["stack_shape"][0]
    for axis in (1, 2):
        edge = s4b["stack_shape"][axis]
        assert edge % divisor == 0 and edge * spacing[axis] >= 160.0 > (edge - divisor) * spacing[axis]
        assert edge < s4a["stack_shape"][axis]
    assert b["settings"]["inference"] == a["settings"]["inference"] and b["settings"]["net2"] == a["settings"]["net2"]


def test_plan_experiment_assembles_the_rule_functions(paper):
    """The plans are the rule functions' outputs (issue #15): MS-CMRSeg geometry, paper preset, 12 GB.

    Pinned values were recorded before the planner was split into one function per rule; the networks'
    keyword arguments come from the plans fields through the plans accessors."""
    from heartcascade.planning.curriculum import CURRICULUM_STEPS

    plans = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=12)
    ctx = planner._Context(MSCMR, planner.preset_for_machine(paper, "cuda"), MR_INFO, 12)
    K = planner.preset_k(ctx.spacing[0], ctx.min_slices, ctx.preset)  # rule 3
    net1 = planner.plan_net1(ctx)  # rule 4
    net2 = planner.plan_net2(ctx, net1, K)  # rules 5, 6
    shapes2 = planner.step2_subvolumes(ctx, net1, net2.subvolumes)
    shapes3 = planner.step3_subvolumes(ctx, net1, net2)  # rule 7
    stack = planner.step4_stack(ctx, net2)  # rule 8
    batches = planner.choose_batch_sizes(ctx, net1, net2, shapes2, shapes3, stack)  # rule 9
    z_chunk, _ = planner.choose_z_chunk(ctx, net1, net2)  # rule 10
    assert (K, net1.coarse_spacing, net1.patch_shape, net1.network["base_features"]) == (3, [7.99, 1.25, 1.25],
                                                                                        [32, 240, 240], 16)
    assert (net2.network["base_features"], net2.tile, net2.full_slice) == (32, [240, 240], [240, 240])
    assert shapes2 == shapes3 == [[5, 32, 32], [9, 56, 56], [11, 112, 112]]
    assert stack == [3, 240, 240] and [batches[s][0] for s in (1, 2, 3, 4)] == [2, 2, 2, 4] and z_chunk == 64
    p = parse_plans(plans)
    assert net1_kwargs(p) == net1_network_kwargs(net1.network)
    assert net2_kwargs(p) == net2_network_kwargs(net2.network)
    assert [list(s) for s in p.training.step(2).subvolume_shapes] == shapes2
    assert [list(s) for s in p.training.step(3).subvolume_shapes] == shapes3
    assert list(p.training.step(4).stack_shape) == stack
    assert [s["batch_size"] for s in plans["settings"]["training"]["steps"]] == [batches[s][0] for s in (1, 2, 3, 4)]
    assert plans["settings"]["inference"]["z_chunk"] == z_chunk
    baseline, baseline_peak = planner.plan_baseline(ctx)  # rule 11
    assert plans["settings"]["baseline_unet"] == {k: v for k, v in baseline.items() if k != "widths"}
    assert plans["report"]["baseline_unet"] == {"widths": baseline["widths"]}
    assert plans["report"]["memory"]["predicted_peak_gb"]["baseline"] == round(baseline_peak / 2**30, 3)
    assert plans["settings"]["baseline_unet"]["patch_shape"] == [32, 160, 160]
    # one curriculum table: the planner's steps and training's step inputs
    steps = p.training_steps("cascade")
    for row, entry in zip(CURRICULUM_STEPS, plans["settings"]["training"]["steps"]):
        assert (entry["step"], entry["name"], entry["train"], entry["losses"], entry["input"]) == \
            (row.step, row.name, list(row.train), list(row.losses), row.input)
        assert steps[str(row.step)].input == row.input


def test_presets_folder_and_override(tmp_path, monkeypatch):
    assert {"paper", "demo"} <= set(presets.available_presets())
    paper = presets.load_preset("paper")
    assert [s["epochs"] for s in paper["training"]["steps"]] == [200] * 4
    assert paper["training"]["lr"] == 1e-4 and paper["subvolumes"]["reference_edges"] == [64, 128, 256]
    custom = dict(paper, name="mine")
    (tmp_path / "mine.json").write_text(json.dumps(custom))
    monkeypatch.setenv("HC_PRESETS_DIR", str(tmp_path))
    assert presets.load_preset("mine")["name"] == "mine"
    with pytest.raises(HCError, match="unknown preset"):
        presets.load_preset("paper")


# ---------------------------------------------------------------------------------------------------
# Memory model against measurement (CPU; the same functions run on a GPU in the benchmark)
# ---------------------------------------------------------------------------------------------------

def test_memory_model_matches_measured_cpu():
    net1 = {"in_channels": 1, "num_classes": 4, "base_features": 8, "max_features": 32, "dropout": 0.1}
    net2 = {"in_channels": 5, "num_classes": 4, "K": 5, "base_features": 16, "num_levels": 2, "recursions": 2,
            "max_features": 64}
    results = [
        mm.check_net1(net1, 1, (16, 32, 32)),
        mm.check_cascade(net1, net2, "probabilities", 1, (10, 48, 48), (0.5, 0.5, 0.5)),  # Net1 + Net2 end to end
    ]
    for r in results:
        assert 0.75 <= r["ratio"] <= 1.25, results


# ---------------------------------------------------------------------------------------------------
# The default preset plans for the machine it runs on
# ---------------------------------------------------------------------------------------------------

def test_default_preset_is_the_planners_default_and_differs_by_machine():
    assert presets.DEFAULT_PRESET == "default"
    default = presets.load_preset("default")
    cpu = planner.plan_experiment(MSCMR, default, MR_INFO, 2, machine="cpu")
    cuda = planner.plan_experiment(MSCMR, default, MR_INFO, 2, gpu_memory_gb=40)
    assert cpu["report"]["machine"]["kind"] == "cpu" and cpu["report"]["machine"]["source"] == "--machine"
    assert cuda["report"]["machine"] == {**cuda["report"]["machine"], "kind": "cuda", "source": "--gpu-memory-gb", "gpu_memory_gb": 40.0}
    # CPU: narrow networks, a one-hour budget shared by the steps; GPU: wider, the plans' iteration counts
    assert cpu["settings"]["training"]["time_budget_s"] == 3600 and cuda["settings"]["training"]["time_budget_s"] is None
    assert cpu["settings"]["net1"]["max_features"] < cuda["settings"]["net1"]["max_features"]
    assert cpu["settings"]["net2"]["base_features"] < cuda["settings"]["net2"]["base_features"]
    assert [s["time_fraction"] for s in cpu["settings"]["training"]["steps"]] == [0.30, 0.05, 0.10, 0.60]
    assert [s["enabled"] for s in cpu["settings"]["training"]["steps"]] == [True, False, True, True]  # step 2 off (issue #21)
    assert [s["iterations_per_epoch"] for s in cuda["settings"]["training"]["steps"]] == [50] * 4
    # step 4 on heart-sized windows on the CPU (160 mm at 1.25 mm = 128), whole slices on the GPU
    assert cpu["settings"]["training"]["steps"][3]["stack_shape"][1:] == [128, 128]
    assert not cuda["settings"]["net2"]["tiling"] and cuda["settings"]["training"]["steps"][3]["stack_shape"][1:] == cuda["settings"]["net2"]["full_slice_shape"]
    for plans in (cpu, cuda):  # the recipe shared by both machines
        tr = plans["settings"]["training"]
        assert tr["lr_schedule"] == "poly" and tr["keep_best_per_step"] and tr["warmup_iterations"] == 20
        assert plans["settings"]["net1"]["kernel_size"] == 3 and plans["settings"]["net1"]["norm"] == "instance"
        # rule 12: cine MR is small enough for Net2 on the whole volume (the ROI never loses the heart)
        assert plans["settings"]["inference"]["roi_rule"] == "whole_volume" and plans["settings"]["inference"]["tta"] is True
        aug = plans["settings"]["augmentation"]
        assert aug["p_gamma"] > 0 and aug["p_bias_field"] > 0 and aug["flip_axes"] == [0, 1, 2]
        assert aug["rotation_deg"] == [180.0, 0.0, 0.0]  # full circle in-plane; none out of plane (8 mm slices)
    # a preset without machine sections plans the same on both (the paper preset)
    paper = presets.load_preset("paper")
    a = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=12, machine="cpu")
    b = planner.plan_experiment(MSCMR, paper, MR_INFO, 2, gpu_memory_gb=12, machine="cuda")
    assert a["settings"] == b["settings"]
    assert {k: v for k, v in a["report"].items() if k != "machine"} == {k: v for k, v in b["report"].items() if k != "machine"}
    with pytest.raises(HCError, match="unknown machine"):
        planner.preset_for_machine(default, "tpu")


def test_training_plan_reads_budget_schedule_and_keep_best():
    from heartcascade.training.time_budget import time_fractions

    plans = planner.plan_experiment(MSCMR, presets.load_preset("default"), MR_INFO, 2, machine="cpu")
    p = parse_plans(plans)
    tr = p.training
    assert tr.time_budget_s == 3600 and tr.lr_schedule == "poly" and tr.keep_best_per_step
    steps = p.training_steps("cascade")
    assert time_fractions({n: steps[n] for n in "234"}) == {"2": 0.05, "3": 0.10, "4": 0.60}
    assert tr.checkpoint_interval(steps["1"]) == tr.checkpoint_interval_epochs * steps["1"].iterations_per_epoch
    plans["settings"]["training"]["lr_schedule"] = "cosine"
    with pytest.raises(HCError, match="lr_schedule"):
        parse_plans(plans)
    plans["settings"]["training"]["lr_schedule"] = "poly"
    plans["settings"]["training"]["time_budget_s"] = -5
    with pytest.raises(HCError, match="time_budget_s"):
        parse_plans(plans)
    plans["settings"]["training"]["time_budget_s"] = None
    plans["settings"]["training"]["steps"][0]["time_fraction"] = 1.5
    with pytest.raises(HCError, match="time_fraction"):
        parse_plans(plans)


# ---------------------------------------------------------------------------------------------------
# The plans are the one, complete, validated configuration (schema version 2)
# ---------------------------------------------------------------------------------------------------

V1_PLANS = Path(__file__).parent / "data" / "plans_v1_demo_mr.json"  # written by plans_version 1 (demo, MSCMR, cpu)


def _fresh_demo() -> dict:
    return planner.plan_experiment(MSCMR, presets.load_preset("demo"), MR_INFO, 2, machine="cpu")


def test_fresh_plans_parse_complete_and_without_dead_fields():
    from heartcascade.planning.augmentation_plan import AugmentationParams

    plans = _fresh_demo()
    p = parse_plans(plans, "plans.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.training.grad_clip = 1.0  # type: ignore[misc]
    # the values that take effect are written, not left to defaults
    tr = plans["settings"]["training"]
    for key in ("grad_clip", "ema_momentum", "warmup_iterations", "budget_probe_iterations", "val_max_cases",
                "checkpoint_interval_iterations", "num_workers", "seed", "weight_decay"):
        assert key in tr, key
    assert plans["settings"]["amp"] == "bf16" and "roi_margin_mm" in plans["settings"]["inference"]
    assert set(plans["settings"]["augmentation"]) == {f.name for f in dataclasses.fields(AugmentationParams)}
    # ... and nothing that has no effect
    for section, dead in (("training", ("precision", "optimizer", "lr", "amp")),
                          ("sampling", ("scheme", "subvolume_shape_choice")), ("net2", ("inplane_tile",)),
                          ("inference", ("inplane_tile",)), ("baseline_unet", ("kernel_size", "optimizer"))):
        assert not set(dead) & set(plans["settings"][section]), section
    assert all("frozen" not in s for s in tr["steps"])
    # every written field is a field of the typed sections (parse refuses others), and every typed field is
    # written: nothing falls back on a default (loss_weights is the one optional, unwritten field)
    typed = {"net1": p.net1, "net2": p.net2, "sampling": p.sampling, "inference": p.inference,
             "baseline_unet": p.baseline_unet, "full_resolution": p.full_resolution}
    for name, obj in typed.items():
        assert set(plans["settings"][name]) == {f.name for f in dataclasses.fields(obj)}, name
    r = p.report
    for name, obj in {"dataset": r.dataset, "machine": r.machine, "memory": r.memory, "net1": r.net1,
                      "net2": r.net2, "full_resolution": r.full_resolution, "baseline_unet": r.baseline_unet}.items():
        assert set(plans["report"][name]) == {f.name for f in dataclasses.fields(obj)}, name
    # settings and report are apart: no field in both
    for name in set(plans["settings"]) & set(plans["report"]):
        assert not set(plans["settings"][name]) & set(plans["report"][name]), name
    assert set(plans) == {"plans_version", "settings", "report"}
    assert set(tr) == {f.name for f in dataclasses.fields(p.training)}
    for entry, st in zip(tr["steps"], p.training.steps):
        assert set(entry) | {"loss_weights"} >= {f.name for f in dataclasses.fields(st)} - {
            "patch_shape", "subvolume_shapes", "coarse_patch_shapes", "stack_shape"}
    # the consumers read these typed sections (no renamed copies)
    assert p.amp == "bf16" and p.training.grad_clip == 12.0 and p.training.ema_momentum == 0.9
    assert p.net2.input_mode == "probabilities" and p.to_dict() == plans


@pytest.mark.parametrize("where", ["", "settings", "report", "settings.net1", "settings.net2", "settings.training",
                                   "settings.training.steps.1", "settings.augmentation", "settings.sampling",
                                   "settings.inference", "settings.baseline_unet", "report.memory", "report.dataset",
                                   "settings.normalization.0", "settings.cropping", "settings.full_resolution",
                                   "report.full_resolution", "report.net1", "report.fingerprint_summary",
                                   "report.machine"])
def test_unknown_keys_are_refused_in_every_section(tmp_path, where):

    plans = _fresh_demo()
    target = plans
    for part in filter(None, where.split(".")):
        target = target[int(part) if part.isdigit() else part]
    target["foo"] = 1
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    with pytest.raises(HCError) as info:
        load_plans(path)
    label = {"": "plans have", "settings.training.steps.1": "settings.training.steps[2] has",
             "settings.normalization.0": "settings.normalization[0] has"}.get(where, f"{where} has")
    assert str(info.value).startswith(f"{path}: {label} unknown key 'foo'"), str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(HCError, match="unknown key 'foo'"):
        parse_plans(plans, "x")


def test_wrong_values_are_one_line_errors_naming_the_field():

    for edit, message in ((lambda p: p["settings"]["training"].update(grad_clip="big"), "training.grad_clip must be a number"),
                          (lambda p: p["settings"].update(amp="fp8"), "settings.amp must be one of"),
                          (lambda p: p["settings"]["training"]["steps"][2].pop("lr"), r"training.steps\[3\] lacks field 'lr'"),
                          (lambda p: p["settings"]["net2"].update(input_mode="probs"), "net2.input_mode must be one of"),
                          (lambda p: p["settings"]["inference"].update(z_chunk=0), "inference.z_chunk must be >= 1")):
        plans = _fresh_demo()
        edit(plans)
        with pytest.raises(HCError, match=message):
            parse_plans(plans, "plans.json")


def test_version_1_plans_are_refused_with_a_one_line_hint_to_replan(tmp_path):
    v1 = json.loads(V1_PLANS.read_text())
    assert v1["plans_version"] == 1
    (tmp_path / "plans.json").write_text(V1_PLANS.read_text())
    with pytest.raises(HCError, match=r"plans.json: plans_version 1 is not 3; re-plan with "
                                      r"hc_plan_and_preprocess --overwrite") as info:
        load_plans(tmp_path)
    assert "\n" not in str(info.value)


def test_plans_override_keys_are_checked():
    from heartcascade.training.run_inputs import parse_override

    assert parse_override('{"training": {"steps": {"2": {"epochs": 1}}}, "amp": "none"}') == {
        "training": {"steps": [{"epochs": 1, "step": 2}]}, "amp": "none"}
    for text, message in (('{"training": {"foo": 1}}', "--plans-override: training has unknown key 'foo'"),
                          ('{"training": {"steps": {"3": {"bogus": 2}}}}', r"training.steps\[3\] has unknown key 'bogus'"),
                          ('{"net2": {"inplane_tile": [64, 64]}}', "net2 has unknown key 'inplane_tile'"),
                          ('{"augmentation": {"p_twist": 1}}', "augmentation has unknown key 'p_twist'"),
                          ('{"fooo": 1}', "settings have unknown key 'fooo'"),
                          # the report (what the planner recorded) is not a setting
                          ('{"memory": {"target_gb": 2}}', "--plans-override: memory is part of the plans' report"),
                          ('{"net1": {"widths": [8]}}', "net1.widths is part of the plans' report"),
                          ('{"preset": "paper"}', "preset is part of the plans' report"),
                          ('{"training": {"steps": {"2": {"predicted_peak_gb": 1}}}}',
                           r"training.steps\[2\] has unknown key 'predicted_peak_gb'")):
        with pytest.raises(HCError, match=message) as info:
            parse_override(text)
        assert "\n" not in str(info.value)
    assert parse_override('{"net1": {"dropout": 0.1}, "inference": {"tta": true}}')  # settings: fine


def test_defaults_are_defined_once(tmp_path, monkeypatch):
    """Issue #24: a preset key's default lives in presets.PRESET_DEFAULTS only. The planner reads values,
    never ``.get(key, fallback)`` on a preset; the typed plans sections have no defaults of their own (the
    augmentation section's dataclass is the one source of its defaults, PRESET_DEFAULTS included); a preset
    that leaves out every key with a default still plans, and leaving out the keys it sets to their
    defaults changes nothing."""
    import ast
    import copy

    from heartcascade.planning import plans as plans_mod
    from heartcascade.planning.augmentation_plan import AugmentationParams, augmentation_dict

    for node in ast.walk(ast.parse(Path(planner.__file__).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            receiver = ast.unparse(node.func.value)
            assert receiver in ("fingerprint", "ctx.fp", "preset['machines']"), \
                f"planner.py line {node.lineno}: {receiver}.get(...) -- read the preset's value (presets.PRESET_DEFAULTS)"
    for cls in (plans_mod.Net1Plan, plans_mod.Net2Plan, plans_mod.TrainingPlan, plans_mod.SamplingPlan,
                plans_mod.InferencePlan, plans_mod.BaselinePlan, plans_mod.CroppingPlan, plans_mod.MemoryPlan):
        own = [f.name for f in dataclasses.fields(cls)
               if "check" in f.metadata and f.default not in (dataclasses.MISSING, None)]
        assert not own, f"{cls.__name__} has defaults {own}: the planner writes every field"
    defaults = presets.PRESET_DEFAULTS
    assert defaults["augmentation"] == augmentation_dict(AugmentationParams())

    raw = json.loads((presets.presets_dir() / "paper.json").read_text())
    full = planner.plan_experiment(MSCMR, presets.load_preset("paper"), MR_INFO, 2, gpu_memory_gb=12)

    def without(keep) -> dict:
        """``raw`` less the keys that have a default, except those ``keep(default, value)`` keeps."""
        out = copy.deepcopy(raw)
        for section, values in defaults.items():
            if isinstance(out.get(section), dict) and isinstance(values, dict):
                out[section] = {k: v for k, v in out[section].items() if k not in values or keep(values[k], v)}
        out["training"]["steps"] = [{k: v for k, v in s.items() if k == "step" or k not in d or keep(d[k], v)}
                                    for s, d in zip(raw["training"]["steps"], defaults["training"]["steps"])]
        return out

    monkeypatch.setenv("HC_PRESETS_DIR", str(tmp_path))
    (tmp_path / "same.json").write_text(json.dumps(without(lambda default, value: default != value)))
    (tmp_path / "bare.json").write_text(json.dumps(without(lambda default, value: False)))
    same = planner.plan_experiment(MSCMR, presets.load_preset("same"), MR_INFO, 2, gpu_memory_gb=12)
    assert same["settings"] == full["settings"]
    assert dict(same["report"], preset="paper") == full["report"]
    bare = presets.load_preset("bare")
    assert bare["training"]["steps"][3]["epochs"] == defaults["training"]["steps"][3]["epochs"]
    planner.plan_experiment(MSCMR, bare, MR_INFO, 2, gpu_memory_gb=12)  # every key the planner reads exists
