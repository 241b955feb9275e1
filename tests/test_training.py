"""Training: data pipeline, curriculum, checkpoints/resume, CLI errors (tiny synthetic data, CPU).

The dataset (tests/_training_fixture.py) is planned and preprocessed with the real
``plan_and_preprocess`` and the *demo* preset; the tests shrink the schedule with plans overrides.
"""
from __future__ import annotations

import math
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_fixture import LABELS, make_dataset  # noqa: E402

from heartcascade.utils.errors import HCError  # noqa: E402

DATASET_ID = 901

#: The demo preset's recipe (instance-normalised 3x3x3 Net1 on a 5 mm grid, soft Dice averaged over the
#: classes plus cross-entropy, classifier biases from the class frequencies, lr 1e-3) with a shorter
#: schedule (~330 iterations) for the tiny volumes: no dropout, subvolumes that cover more of the 48 x 48 x 24
#: volumes (the planner scales the paper's edges to the field of view, which gives too little context for
#: Net1 here), and most iterations in step 1 (Net1 learns the layout on whole volumes) and step 4 (Net2
#: on full slices is cheap). Net2's whole-heart Dice L2_ROI is in steps 3-4 as in the preset.
LEARN_OVERRIDE = {
    "net1": {"dropout": 0.0},
    "training": {
        "validation_interval_epochs": 5,
        "checkpoint_interval_epochs": 5,
        "steps": [
            {"step": 1, "epochs": 10, "iterations_per_epoch": 10},
            {"step": 2, "epochs": 8, "iterations_per_epoch": 3,
             "subvolume_shapes": [[16, 32, 32], [24, 40, 40]]},
            {"step": 3, "epochs": 8, "iterations_per_epoch": 8,
             "subvolume_shapes": [[12, 32, 32], [16, 40, 40]]},
            {"step": 4, "epochs": 15, "iterations_per_epoch": 10},
        ],
    },
}

#: A very short schedule crossing every step boundary, with checkpoints every 2 iterations.
SHORT_OVERRIDE = {
    "training": {
        "validation_interval_epochs": 1,
        "checkpoint_interval_iterations": 2,
        "steps": [
            {"step": 1, "epochs": 1, "iterations_per_epoch": 3},
            {"step": 2, "epochs": 2, "iterations_per_epoch": 2},
            {"step": 3, "epochs": 1, "iterations_per_epoch": 4},
            {"step": 4, "epochs": 1, "iterations_per_epoch": 3},
        ],
    },
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """HC_* roots pointing at a fresh tmp tree holding the preprocessed tiny dataset."""
    root = tmp_path_factory.mktemp("hc_training")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # predictable on a shared 2-core CI machine
    with pytest.MonkeyPatch.context() as mp:
        for key, var in (("raw", "HC_RAW"), ("pre", "HC_PREPROCESSED"), ("res", "HC_RESULTS")):
            (root / key).mkdir()
            mp.setenv(var, str(root / key))
        mp.setenv("HC_N_PROC_DA", "0")
        pre = make_dataset(root / "raw", num_cases=5, dataset_id=DATASET_ID)
        yield {"root": root, "pre": pre, "raw": root / "raw" / pre.name, "res": root / "res"}
    torch.set_num_threads(threads)


def _trainer(**kwargs):
    from heartcascade.training.trainer import Trainer

    defaults = dict(dataset=DATASET_ID, fold=0, device="cpu", progress=False, num_workers=0)
    defaults.update(kwargs)
    return Trainer(**defaults)


# --------------------------------------------------------------------------------------------------
# the whole curriculum learns


def test_four_steps_learn_and_validate(tiny):
    from heartcascade.model import from_plans
    from heartcascade.model.checkpoint import load_checkpoint

    result = _trainer(plans_override=LEARN_OVERRIDE).run()
    folder = result.output_folder
    assert folder == tiny["res"] / tiny["pre"].name / "cascade" / "fold_0"
    assert result.step_names == ["1", "2", "3", "4"]
    # every step's loss falls (mean of the last two epochs clearly below the first epoch)
    for step_name, losses in result.epoch_losses.items():
        assert len(losses) >= 8, (step_name, losses)
        assert np.mean(losses[-2:]) < 0.9 * losses[0], (step_name, losses)
    # the real predictor + hc_evaluate scored the validation case: every structure well above chance
    assert result.validation_method == "predictor"
    summary = json.loads((folder / "validation" / "summary.json").read_text())
    case_id = next(iter(summary["cases"]))
    ref = np.load(tiny["pre"] / "data" / f"{case_id}_seg.npy")
    for name, label in LABELS.items():
        if label == 0:
            continue
        dice = summary["aggregate"][name]["dice"]["mean"]
        chance = float(np.mean(ref == label))  # Dice of a random guess with the right frequency
        assert dice > max(0.3, 5 * chance), (name, dice, chance)
    # logs and the model-folder contract
    for name in ("checkpoint_latest.pth", "checkpoint_best.pth", "checkpoint_final.pth", "plans.json",
                 "dataset.json", "training_log.txt", "metrics.jsonl", "progress.png", "postprocessing.json"):
        assert (folder / name).is_file(), name
    post = json.loads((folder / "postprocessing.json").read_text())  # chosen on the validation predictions
    assert post["num_cases"] == summary["num_cases"] and post["dice_after"]["mean"] >= post["dice_before"]["mean"]
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {r["type"] for r in records} == {"train", "val"}
    assert {r["step"] for r in records if r["type"] == "train"} == {"1", "2", "3", "4"}
    assert (folder / "progress.png").read_bytes()[:4] == b"\x89PNG"
    final = torch.load(folder / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert final["format_version"] == 1 and final["configuration"] == "cascade"
    assert set(final["networks"]) == {"net1", "net2"}
    from heartcascade.planning.plans import parse_plans
    net1, net2 = from_plans.build_net1(parse_plans(final["plans"])), from_plans.build_net2(parse_plans(final["plans"]))
    net1.load_state_dict(final["networks"]["net1"])
    net2.load_state_dict(final["networks"]["net2"])
    assert final["plans"]["settings"]["net1"]["dropout"] == 0.0  # the override is recorded in the checkpoint
    assert json.loads((folder / "plans.json").read_text())["settings"]["net1"]["dropout"] == 0.0
    best = load_checkpoint(folder / "checkpoint_best.pth")
    assert best["best"]["target"] == "cascade"


# --------------------------------------------------------------------------------------------------
# resume


def test_kill_and_continue_matches_uninterrupted_run(tiny):
    from heartcascade.model.checkpoint import load_checkpoint
    from heartcascade.training.trainer import StopTraining

    out_a = tiny["root"] / "resume_a"
    out_b = tiny["root"] / "resume_b"
    _trainer(plans_override=SHORT_OVERRIDE, predict_validation=False, output_folder=out_a).run()

    def kill(event, info):
        if event == "iteration" and info["step"] == "3" and info["iteration"] == 3:
            raise StopTraining  # "killed" one iteration after the checkpoint at iteration 2

    with pytest.raises(StopTraining):
        _trainer(plans_override=SHORT_OVERRIDE, predict_validation=False, output_folder=out_b, callback=kill).run()
    latest = load_checkpoint(out_b / "checkpoint_latest.pth")
    assert (latest["step"], latest["iteration"]) == ("3", 2)
    assert not (out_b / "checkpoint_final.pth").exists()
    assert not list(out_b.glob(".*tmp*")), "temporary files left behind"

    _trainer(continue_training=True, predict_validation=False, output_folder=out_b).run()
    a = load_checkpoint(out_a / "checkpoint_final.pth")
    b = load_checkpoint(out_b / "checkpoint_final.pth")
    assert sorted(a) == sorted(b)
    for net in ("net1", "net2"):
        for key, value in a["networks"][net].items():
            assert torch.equal(value, b["networks"][net][key]), (net, key)

    def strip(records):
        return [{k: v for k, v in r.items() if k not in ("seconds_per_iteration", "data_wait_fraction")}
                for r in records]

    assert strip(a["logger"]["records"]) == strip(b["logger"]["records"])
    assert a["best"] == b["best"]
    metrics_b = (out_b / "metrics.jsonl").read_text().splitlines()
    assert len(metrics_b) == len(a["logger"]["records"])
    assert "checkpoint_latest.pth: step 3 iteration 2" in (out_b / "training_log.txt").read_text()  # not "step None"


def test_cpu_training_settings(tiny):
    """Issue #16: Net1 and the baseline train channels-last on the CPU (checkpoints stay contiguous), and
    the intra-op threads follow training.num_threads / the CPUs the loader workers leave free, restored
    when the run ends."""
    from heartcascade.planning.plans import parse_plans
    from heartcascade.training.session import training_threads

    cpus = os.cpu_count() or 1
    before = torch.get_num_threads()
    assert training_threads(None, 0, load=cpus + 5.0) == before  # never more than torch already uses
    assert training_threads(None, cpus + 3, load=cpus + 5.0) == 1  # busy machine: what the workers leave
    assert training_threads(None, cpus + 3, load=0.0) == before  # idle machine: every thread
    assert training_threads(1, 0) == 1
    assert training_threads(cpus + 5, 0) == cpus
    trainer = _trainer(steps=[1], plans_override={"training": {"num_threads": 1}})
    trainer.setup()
    assert torch.get_num_threads() == 1
    w = [p for p in trainer.networks["net1"].parameters() if p.dim() == 5 and p.shape[1] > 1][0]
    assert w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous()
    assert all(p.is_contiguous() for p in trainer.networks["net2"].parameters())
    from heartcascade.model.checkpoint import state_dict_cpu
    assert all(t.is_contiguous() for t in state_dict_cpu(trainer.networks["net1"]).values())
    torch.set_num_threads(before)
    plans = json.loads((tiny["pre"] / "plans.json").read_text())
    for bad in (0, -1, 1.5, "2", True):
        plans["settings"]["training"]["num_threads"] = bad
        with pytest.raises(HCError, match="num_threads"):
            parse_plans(plans)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from heartcascade.model import checkpoint as ck

    path = tmp_path / "checkpoint_latest.pth"
    ck.save_checkpoint(path, {"format_version": 1, "value": torch.arange(3)})

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise KeyboardInterrupt  # killed in the middle of writing

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(path, {"format_version": 1, "value": torch.arange(5)})
    assert torch.equal(ck.load_checkpoint(path)["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pth"]


def test_rng_state_roundtrip():
    import random

    from heartcascade.training.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# --------------------------------------------------------------------------------------------------
# step subsets, baseline, CLI


def test_cli_steps_subset_and_errors(tiny, capsys):
    from heartcascade.cli.train import main

    override = json.dumps({"training": {"steps": [{"step": 3, "epochs": 1, "iterations_per_epoch": 2},
                                                  {"step": 4, "epochs": 1, "iterations_per_epoch": 2}]}})
    assert main([str(DATASET_ID), "fold1", "--steps", "3,4", "--device", "cpu", "--num-workers", "0",
                 "--plans-override", override, "--no-validation", "--quiet"]) == 0
    folder = tiny["res"] / tiny["pre"].name / "cascade" / "fold_1"
    final = torch.load(folder / "checkpoint_final.pth", weights_only=True)
    assert final["steps"] == ["3", "4"]
    log = (folder / "training_log.txt").read_text()
    assert "step 3" in log and "=== step 1" not in log

    def error_of(argv):
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
        return err

    assert "valid folds are 0, 1, 2, 3, 4, all" in error_of([str(DATASET_ID), "7", "--device", "cpu"])
    assert "1,2,3,4" in error_of([str(DATASET_ID), "0", "--steps", "5", "--device", "cpu"])
    # a dataset with raw data but no preprocessing names the command to run
    raw2 = tiny["root"] / "raw" / "Dataset902_NotPreprocessed"
    raw2.mkdir()
    assert "run: hc_plan_and_preprocess -d 902" in error_of(["902", "0", "--device", "cpu"])
    bad = json.dumps({"net1": {"coarse_spacing": [2.0, 2.0, 2.0]}})
    assert "hc_plan_and_preprocess" in error_of([str(DATASET_ID), "0", "--device", "cpu", "--plans-override", bad])
    unknown = json.dumps({"training": {"steps": {"2": {"epochs": 1, "epoch": 2}}}})
    assert "training.steps[2] has unknown key 'epoch'" in error_of([str(DATASET_ID), "0", "--device", "cpu",
                                                                   "--plans-override", unknown])
    if not torch.cuda.is_available():
        assert "no CUDA GPU is available" in error_of([str(DATASET_ID), "0", "--device", "cuda"])


def test_baseline_trains(tiny):
    override = {"baseline_unet": {"epochs": 6, "iterations_per_epoch": 4, "lr": 0.003}}
    result = _trainer(configuration="baseline", plans_override=override).run()
    assert result.step_names == ["baseline"]
    losses = result.epoch_losses["baseline"]
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.9 * losses[0], losses  # it learns, not only runs
    assert all(np.isfinite(losses)), losses
    final = torch.load(result.final_checkpoint, weights_only=True)
    assert final["configuration"] == "baseline" and set(final["networks"]) == {"baseline"}
    assert result.validation_method == "predictor"
    assert (result.output_folder / "validation" / "summary.json").is_file()


def test_resume_refuses_a_checkpoint_of_the_older_layout(tmp_path):
    from heartcascade.training.run_inputs import check_resume

    old = {"format_version": 1, "configuration": "cascade", "steps": ["1", "2"], "stage_index": 1, "stage": "2"}
    with pytest.raises(HCError, match="checkpoint_latest.pth: checkpoint of an older heartcascade; start over"):
        check_resume(old, tmp_path / "checkpoint_latest.pth", "cascade", [], tmp_path, None)
    check_resume({**old, "step_index": 1}, tmp_path / "checkpoint_latest.pth", "cascade", [], tmp_path, None)


def test_each_configuration_is_a_model_object(tiny):
    """The session asks the configuration's model object, never its name: networks, steps, targets."""
    from heartcascade.planning.plans import load_plans
    from heartcascade.training.models import BaselineModel, CascadeModel, model_class

    with pytest.raises(HCError, match="unknown configuration 'unet'; expected cascade or baseline"):
        model_class("unet")
    with pytest.raises(HCError, match="--steps applies to the cascade; the baseline has a single step"):
        _trainer(configuration="baseline", steps=[1])
    plans = load_plans(tiny["pre"] / "plans.json")
    cascade, baseline = CascadeModel(plans, torch.device("cpu")), BaselineModel(plans, torch.device("cpu"))
    assert set(cascade.networks) == {"net1", "net2"} and set(baseline.networks) == {"baseline"}
    assert [cascade.validation_target(s) for s in "1234"] == ["net1", "net1", "cascade", "cascade"]
    steps = plans.training_steps("cascade")
    cascade.select(steps["4"])  # step 4 trains Net2 on frozen Net1
    assert not any(p.requires_grad for p in cascade.networks["net1"].parameters())
    assert all(p.requires_grad for p in cascade.networks["net2"].parameters())
    assert type(cascade.runner(plans, steps["4"])).__name__ == "SliceStacksRunner"
    base_steps = plans.training_steps("baseline")
    assert list(base_steps) == list(BaselineModel.default_steps) == ["baseline"]
    assert base_steps["baseline"].shapes == (plans.baseline_unet.patch_shape,)
    assert type(baseline.runner(plans, base_steps["baseline"])).__name__ == "BaselineRunner"


# --------------------------------------------------------------------------------------------------
# splits


def test_splits_kfold_custom_and_all(tmp_path):
    from heartcascade.training.splits import (fold_cases, load_or_create_splits, make_kfold_splits, parse_fold)

    ids = [f"c{i}" for i in range(12)]
    splits = make_kfold_splits(ids, 5, seed=1)
    assert len(splits) == 5
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)
    assert all(not set(s["train"]) & set(s["val"]) for s in splits)
    assert make_kfold_splits(ids, 5, seed=1) == splits
    got, path = load_or_create_splits(tmp_path, ids)
    assert path.is_file() and got == load_or_create_splits(tmp_path, ids)[0]
    custom = tmp_path / "paper.json"
    custom.write_text(json.dumps([{"train": ids[:9], "val": ids[9:]}]))
    got, _ = load_or_create_splits(tmp_path, ids, splits_file=custom)
    assert parse_fold("fold0", len(got)) == 0 and parse_fold("all", 1) == "all"
    with pytest.raises(HCError, match="valid folds are 0, all"):
        parse_fold("1", len(got))
    train, val = fold_cases(got, "all", ids)
    assert train == sorted(ids) and val == []  # nothing held out: no validation on training cases
    custom.write_text(json.dumps([{"train": ["nope"], "val": []}]))
    with pytest.raises(HCError, match="not in the preprocessed data"):
        load_or_create_splits(tmp_path, ids, splits_file=custom)


# --------------------------------------------------------------------------------------------------
# data pipeline units


def test_partial_upsampling_equals_trilinear():
    from heartcascade.training.augmentation import upsample_at

    coarse = np.random.default_rng(0).random((3, 5, 7, 6)).astype(np.float32)
    full = (13, 20, 17)
    ref = F.interpolate(torch.from_numpy(coarse)[None], size=full, mode="trilinear", align_corners=False)[0].numpy()
    z = np.array([0, 3, 12, 12, 5])
    rows = np.arange(4, 11)
    np.testing.assert_allclose(upsample_at(coarse, full, [z, rows, None]), ref[:, z][:, :, rows], atol=1e-5)


def test_partial_upsampling_of_float16_probabilities_matches_float32():
    from heartcascade.training.augmentation import upsample_at

    coarse = np.random.default_rng(1).random((4, 6, 8, 8)).astype(np.float16)
    idx = [np.array([2, 3, 4]), np.arange(5, 17), None]
    out = upsample_at(coarse, (12, 24, 20), idx)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, upsample_at(coarse.astype(np.float32), (12, 24, 20), idx))


def test_inplane_transform_interpolates_each_plane_exactly_like_3d():
    from scipy import ndimage

    from heartcascade.training import augmentation as A

    rng = np.random.default_rng(3)
    vol = rng.random((12, 40, 36)).astype(np.float32)
    params = A.AugmentationParams(p_rotation=1, p_scale=1, p_shear=1, shear=0.2, p_translation=1, p_elastic=1,
                                  elastic_spacing_mm=8.0)
    for seed in range(4):
        sample = A.random_spatial(np.random.default_rng(seed), params, (3.0, 1.0, 1.0), (5, 24, 24),
                                  inplane_only=True)
        centre = np.array([2 + seed * 3, 20, 18])  # the first stack reaches beyond z = 0
        local = A.sample_coordinates(centre, (5, 24, 24), sample)
        assert sample.inplane  # step-4 transforms never move along D: the in-plane path
        np.testing.assert_allclose(local[0], np.broadcast_to(np.arange(5).reshape(5, 1, 1) + centre[0] - 2,
                                                             local[0].shape), atol=1e-4)
        fast = A.extract([vol], centre, (5, 24, 24), sample, orders=[1], cvals=[0.5])[0]
        lo = np.floor(local.reshape(3, -1).min(1)).astype(int) - 1
        box_lo = np.maximum(lo, 0)
        box_hi = np.minimum(np.ceil(local.reshape(3, -1).max(1)).astype(int) + 2, vol.shape)
        sub = vol[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))]
        full3d = ndimage.map_coordinates(sub, local - box_lo.reshape(3, 1, 1, 1), order=1, mode="constant",
                                         cval=0.5, prefilter=False)
        np.testing.assert_allclose(fast, full3d, atol=1e-5)
        labels = (vol * 7).astype(np.int16)
        fast_labels = A.extract([labels], centre, (5, 24, 24), sample, orders=[0], cvals=[0])[0]
        idx = np.rint(local).astype(int)
        ok = np.all((idx >= 0) & (idx < np.asarray(vol.shape).reshape(3, 1, 1, 1)), axis=0)
        want = np.zeros((5, 24, 24), np.int16)
        want[ok] = labels[idx[0][ok], idx[1][ok], idx[2][ok]]
        assert (fast_labels != want).mean() < 0.002  # rounding ties of float32 coordinates aside
    # a 3D rotation reads several planes per output plane: the general path
    tilted = A.random_spatial(np.random.default_rng(0), A.AugmentationParams(p_rotation=1), (1.0, 1.0, 1.0),
                              (5, 24, 24))
    assert not tilted.inplane


def test_extract_identity_and_label_values():
    from heartcascade.training.augmentation import AugmentationParams, SpatialSample, extract, random_spatial

    rng = np.random.default_rng(0)
    vol = rng.random((20, 30, 40)).astype(np.float32)
    seg = rng.integers(0, 4, (20, 30, 40)).astype(np.uint8)
    plain = extract([vol, seg], (2, 28, 5), (8, 16, 16), None)
    same = extract([vol, seg], (2, 28, 5), (8, 16, 16), SpatialSample(matrix=np.eye(3)), orders=[1, 0])
    np.testing.assert_allclose(plain[0], same[0], atol=1e-6)
    np.testing.assert_array_equal(plain[1], same[1])
    np.testing.assert_array_equal(plain[1][2:, :10, 3:], seg[0:6, 20:30, 0:13])
    assert not plain[1][:2].any() and not plain[1][:, 10:].any() and not plain[1][:, :, :3].any()
    params = AugmentationParams(p_rotation=1, p_scale=1, p_shear=1, shear=0.2, p_translation=1, p_elastic=1)
    sample = random_spatial(rng, params, (2.0, 1.0, 1.0), (8, 16, 16))
    assert set(sample.applied) == {"rotation", "shear", "scale", "translation", "elastic"}
    _, labels = extract([vol, seg], (10, 15, 20), (8, 16, 16), sample, orders=[1, 0])
    assert set(np.unique(labels)) <= {0, 1, 2, 3}  # nearest neighbour: no mixed label values


def test_image_and_label_stay_aligned_under_random_spatial_transforms():
    """The image (linear) and the label map (nearest) are warped by the same transform. Both volumes hold
    a voxel coordinate (+1): linear interpolation of a linear ramp gives the exact source coordinate and
    nearest neighbour the rounded one, so in every output voxel they differ by at most half a voxel --
    for each axis, every kind of transform, 3D patches and in-plane slice stacks."""
    from heartcascade.training.augmentation import AugmentationParams, extract, random_spatial

    shape = (32, 64, 64)
    params = AugmentationParams(p_rotation=1, p_scale=1, p_shear=1, p_translation=1, p_elastic=1,
                                translation_mm=4.0, p_scale_per_axis=0.5)
    rng = np.random.default_rng(5)
    for trial in range(6):
        inplane = trial % 2 == 1
        out_shape = (3, 24, 24) if inplane else (12, 24, 24)
        sample = random_spatial(rng, params, (2.0, 1.0, 1.0), out_shape, inplane_only=inplane)
        assert len(sample.applied) == 5
        for axis in range(3):
            ramp = np.broadcast_to(np.expand_dims(np.arange(shape[axis]) + 1,
                                                  [a for a in range(3) if a != axis]), shape)
            warped, labels = extract([ramp.astype(np.float32), ramp.astype(np.uint8)], (16, 32, 32), out_shape,
                                     sample, orders=[1, 0])
            assert labels.min() >= 1, "patch reaches outside the volume: test geometry too tight"
            diff = np.abs(warped - labels)
            assert diff.max() <= 0.5 + 1e-3, (trial, axis, sample.applied, diff.max())
            if axis > 0:
                assert len(np.unique(labels)) > 3  # the transform actually moves things along this axis
            # a pair misaligned by one voxel would fail
            assert np.abs(warped - np.roll(labels, 1, axis=axis)).max() > 0.6 or axis == 0 and inplane


def test_step4_probabilities_follow_the_image_under_augmentation_and_flips():
    """Step 4's workers hand over source positions, the device reads Net1's coarse probabilities there.
    With an image that *is* the upsampled coarse field and a class-1 probability equal to the same field,
    both must agree after every kind of in-plane transform and a flip applied by the batch transform
    (which only the positions channels carry along), and read background where the image is padding."""
    from heartcascade.inference.upsampling import upsample_at_points
    from heartcascade.training.augmentation import AugmentationParams, batch_transforms
    from heartcascade.training.dataloading import SliceStackLoader, TrainCase

    rng = np.random.default_rng(3)
    field = rng.random((1, 4, 6, 6)).astype(np.float32)
    shape = (12, 40, 44)
    image = F.interpolate(torch.from_numpy(field)[None], size=shape, mode="trilinear",
                          align_corners=False)[0].numpy()
    seg = (image[0] > 0.5).astype(np.int16)
    coarse = torch.from_numpy(np.concatenate([1 - field, field])).half()
    case = TrainCase("a", image, seg, (3.0, 1.0, 1.0), {1: np.argwhere(seg == 1)[::7], 0: np.argwhere(seg == 0)[::7]})
    params = AugmentationParams(p_rotation=1, p_scale=1, p_shear=1, p_translation=1, p_elastic=1, p_flip=1,
                                flip_axes=(0, 1, 2), translation_mm=4.0)
    loader = SliceStackLoader([case], 4, 0, [7], params, K=3, divisor=8, tile=(32, 32))
    transform = batch_transforms(params, image_channels=1)
    checked = 0
    for _ in range(3):
        batch = transform(**loader.generate_train_batch())
        assert batch["data"].shape == (4, 4, 3, 32, 32)  # image + (z, y, x) positions, no probabilities
        for b in range(4):
            positions = torch.from_numpy(batch["data"][b, 1:])
            probs = upsample_at_points(coarse, shape, positions).numpy()
            img = batch["data"][b, 0]
            outside = np.isnan(batch["data"][b, 1])
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-3)
            assert np.all(probs[1][outside] == 0) and np.all(img[outside] == 0)
            inside = ~outside
            assert inside.sum() > 500
            # Bilinear reading of the upsampled image vs. direct reading of the field: equal up to the
            # kinks at coarse cell borders (a quarter of the slope per output voxel at most).
            diff = np.abs(probs[1][inside] - img[inside])
            assert diff.max() < 0.1 and diff.mean() < 0.005, (diff.max(), diff.mean())
            flipped = np.flip(probs[1], axis=2)
            both = inside & np.flip(inside, axis=2)
            checked += int(np.abs(flipped[both] - img[both]).mean() > 0.02)
    assert checked >= 6  # a flip of the image alone would have been caught


def test_class_balanced_sampling():
    from heartcascade.training.sampling import CaseLocations, ClassBalancedSampler

    seg = np.zeros((10, 10, 10), dtype=np.uint8)
    seg[1, 1, 1] = 1  # one voxel of class 1
    seg[5:9, 5:9, 5:9] = 2
    locs = {1: np.argwhere(seg == 1), 2: np.argwhere(seg == 2)}
    sampler = ClassBalancedSampler([CaseLocations("a", seg.shape, locs, seg)])
    rng = np.random.default_rng(0)
    counts = np.zeros(3)
    for _ in range(600):
        _, cls, voxel = sampler.draw(rng)
        counts[cls] += 1
        assert seg[tuple(voxel)] == cls
    assert np.all(np.abs(counts / 600 - 1 / 3) < 0.07), counts


def test_loader_batches_identical_with_and_without_workers(tiny):
    from heartcascade.training.dataloading import BatchStream

    intensity = {key: 0.5 for key in INTENSITY_P}  # batchgenerators' RNG use (numpy's and Python's) too
    trainer = _trainer(plans_override={"augmentation": {"p_flip": 0.5, "flip_axes": [1, 2], **intensity}})
    trainer.setup()
    st = trainer.steps["3"]

    def batches(workers, start, n):
        stream = BatchStream(trainer.build_loader("3", start) if workers == 0 else
                             _with_workers(trainer, start, workers), trainer.plans.augmentation, workers)
        try:
            return [next(stream) for _ in range(n)]
        finally:
            stream.close()

    single = batches(0, 0, 4)
    multi = batches(2, 0, 4)
    resumed = batches(0, 2, 2)
    for a, b in zip(single, multi):
        np.testing.assert_array_equal(a["data"], b["data"])
        np.testing.assert_array_equal(a["seg"], b["seg"])
    for a, b in zip(single[2:], resumed):
        np.testing.assert_array_equal(a["data"], b["data"])
    assert single[0]["data"].shape[0] == st.batch_size


def _with_workers(trainer, start, workers):
    trainer.num_workers = workers
    try:
        return trainer.build_loader("3", start)
    finally:
        trainer.num_workers = 0


# --------------------------------------------------------------------------------------------------
# intensity augmentation

INTENSITY_P = ("p_gaussian_noise", "p_gaussian_blur", "p_brightness", "p_contrast", "p_low_resolution", "p_gamma",
               "p_gamma_inverted", "p_bias_field", "p_histogram_shift", "p_class_intensity")


def _batch(n: int, seed: int = 0) -> dict:
    """n samples: 1 image channel in [-1, 1], 4 probability channels (softmax), labels."""
    rng = np.random.default_rng(seed)
    image = np.tanh(rng.normal(0, 1, (n, 1, 5, 16, 16))).astype(np.float32)
    probs = torch.softmax(torch.from_numpy(rng.normal(0, 1, (n, 4, 5, 16, 16))), dim=1).numpy().astype(np.float32)
    seg = rng.integers(0, 4, (n, 1, 5, 16, 16)).astype(np.int16)
    return {"data": np.concatenate([image, probs], axis=1), "seg": seg}


def _run(transform, batch: dict, seed: int) -> dict:
    import random

    np.random.seed(seed)
    random.seed(seed + 1)
    return transform(**{k: v.copy() for k, v in batch.items()})


def test_intensity_transforms_only_touch_image_channels():
    from heartcascade.training.augmentation import AugmentationParams, batch_transforms

    batch = _batch(16)
    for key in INTENSITY_P:
        transform = batch_transforms(AugmentationParams.from_dict({key: 1.0}), image_channels=1)
        out = _run(transform, batch, seed=3)
        assert out["data"].shape == batch["data"].shape and out["data"].dtype == np.float32, key
        changed = [not np.allclose(out["data"][i, 0], batch["data"][i, 0]) for i in range(16)]
        # blur and low resolution act on each channel with probability 0.5 (nnU-Net's setting)
        assert sum(changed) >= (4 if key in ("p_gaussian_blur", "p_low_resolution") else 16), (key, sum(changed))
        np.testing.assert_array_equal(out["data"][:, 1:], batch["data"][:, 1:])  # Net1 probabilities untouched
        np.testing.assert_array_equal(out["seg"], batch["seg"])
        if key.startswith("p_gamma") or key in ("p_contrast", "p_bias_field", "p_histogram_shift",
                                                "p_class_intensity"):  # range-preserving
            assert out["data"][:, 0].min() >= batch["data"][:, 0].min() - 1e-5
            assert out["data"][:, 0].max() <= batch["data"][:, 0].max() + 1e-5
        again = _run(transform, batch, seed=3)
        np.testing.assert_array_equal(out["data"], again["data"])  # a fixed seed gives the same batch
        assert not np.array_equal(_run(transform, batch, seed=4)["data"], out["data"])


def test_histogram_shift_is_a_monotone_curve_that_keeps_the_range_and_moves_the_middle():
    """The remap keeps the order of intensities (no tissue swaps brightness with another), the patch's darkest
    and brightest values, and moves mid-range values by up to the configured share of the range."""
    from heartcascade.training.augmentation import HistogramShiftTransform

    image = np.linspace(-1, 1, 5 * 16 * 16, dtype=np.float32).reshape(1, 1, 5, 16, 16)
    moved = []
    for seed in range(20):
        np.random.seed(seed)
        out = HistogramShiftTransform((0.1, 0.25), p_per_sample=1.0)(data=image.copy())["data"]
        flat = out.ravel()
        assert np.all(np.diff(flat) >= -1e-6) and flat[0] == -1 and flat[-1] == pytest.approx(1)
        middle = (out - image)[np.abs(image) < 0.05]
        assert np.abs(middle).max() <= 2 * 0.25 + 1e-5
        moved.append(float(np.abs(middle).mean()))
    assert min(moved) > 0 and max(moved) > 0.1  # every draw moves the middle; some by a tenth of the range
    np.random.seed(0)
    assert np.array_equal(HistogramShiftTransform((0.1, 0.25), p_per_sample=0.0)(data=image.copy())["data"], image)


def test_class_intensity_scales_each_structure_by_its_own_gain_with_a_soft_edge():
    """Inside a labelled structure the image is scaled (above the patch's darkest value) by that label's factor,
    far from every structure it is unchanged, the edge is a blend, the labels are only read, and the batch
    path hands the labels to the transform."""
    from heartcascade.training.augmentation import AugmentationParams, ClassIntensityTransform, batch_transforms

    image = np.full((1, 2, 3, 32, 32), 0.5, dtype=np.float32)
    image[:, :, :, 0, 0] = -1.0  # the patch's darkest value
    seg = np.zeros((1, 1, 3, 32, 32), dtype=np.int16)
    seg[..., 4:14, 4:14] = 1
    seg[..., 18:28, 18:28] = 2
    np.random.seed(0)
    out = ClassIntensityTransform((0.6, 0.6), p_per_sample=1.0)(data=image.copy(), seg=seg.copy())
    np.testing.assert_array_equal(out["seg"], seg)
    for c in range(2):
        assert out["data"][0, c, 1, 9, 9] == pytest.approx(-1 + 1.5 * 0.6, abs=1e-4)  # inside label 1
        assert out["data"][0, c, 1, 23, 23] == pytest.approx(-1 + 1.5 * 0.6, abs=1e-4)  # inside label 2
        assert out["data"][0, c, 1, 9, 26] == pytest.approx(0.5)  # far from both
        edge = out["data"][0, c, 1, 9, 13:16]
        assert -0.1 < edge.min() and edge.max() < 0.5 and np.all(np.diff(edge) > 0)  # fades, no step
    np.random.seed(1)
    out = ClassIntensityTransform((0.5, 1.5), p_per_sample=1.0)(data=image.copy(), seg=seg.copy())["data"]
    assert out[0, 0, 1, 9, 9] != pytest.approx(out[0, 0, 1, 23, 23])  # each label draws its own factor
    assert out.min() >= -1 and out.max() <= 0.5 + 1e-6  # clipped to the patch's range
    batch = {"data": image, "seg": seg}
    transform = batch_transforms(AugmentationParams.from_dict({"p_class_intensity": 1.0,
                                                               "class_intensity_range": [0.6, 0.6]}), image_channels=1)
    moved = _run(transform, batch, seed=0)["data"]
    assert moved[0, 0, 1, 9, 9] == pytest.approx(-0.1, abs=1e-4) and moved[0, 1, 1, 9, 9] == 0.5  # image channel only


def test_scaling_per_axis_and_full_circle_inplane_rotation():
    """Per-axis scaling draws a zoom per axis (the slice axis untouched in slice stacks); an in-plane
    rotation limit of 180 degrees reaches every orientation."""
    from heartcascade.training.augmentation import AugmentationParams, random_spatial

    rng = np.random.default_rng(0)
    params = AugmentationParams(p_rotation=0, p_scale=1, p_scale_per_axis=1, scale_range=(0.7, 1.4))
    for inplane in (False, True):
        diag = np.diag(random_spatial(rng, params, (8.0, 1.25, 1.25), (3, 32, 32), inplane_only=inplane).matrix)
        assert len(set(np.round(diag[1:], 6))) == 2 and np.all((diag > 1 / 1.4 - 1e-6) & (diag < 1 / 0.7 + 1e-6))
        assert (diag[0] == 1.0) == inplane
    same = AugmentationParams(p_rotation=0, p_scale=1, scale_range=(0.7, 1.4))
    diag = np.diag(random_spatial(rng, same, (8.0, 1.25, 1.25), (3, 32, 32)).matrix)
    assert np.allclose(diag, diag[0])  # without it: one zoom for every axis
    full = AugmentationParams(p_rotation=1, rotation_deg=(180.0, 0.0, 0.0), p_scale=0)
    angles = [math.degrees(math.atan2(m[2, 1], m[1, 1])) for m in
              (random_spatial(rng, full, (1.0, 1.0, 1.0), (3, 8, 8), inplane_only=True).matrix for _ in range(400))]
    assert min(angles) < -150 and max(angles) > 150


def test_bias_field_is_smooth_positive_and_keeps_the_range():
    from heartcascade.training.augmentation import BiasFieldTransform

    np.random.seed(0)
    gain = BiasFieldTransform((0.0, 0.15), p_per_sample=1.0).field((3, 64, 64))
    assert gain.shape == (3, 64, 64) and gain.min() > 0 and gain.max() / gain.min() > 1.05
    assert np.abs(np.diff(gain, axis=2)).max() < 0.05  # smooth: no jumps between neighbours
    data = np.random.default_rng(1).uniform(-1, 1, (2, 1, 3, 64, 64)).astype(np.float32)
    out = BiasFieldTransform((0.0, 0.15), p_per_sample=1.0)(data=data.copy())["data"]
    assert not np.allclose(out, data)
    for b in range(2):
        assert out[b].min() >= data[b].min() - 1e-6 and out[b].max() <= data[b].max() + 1e-6


def test_intensity_probability_and_defaults():
    from heartcascade.planning.presets import load_preset
    from heartcascade.training.augmentation import AugmentationParams, batch_transforms

    batch = _batch(200, seed=1)
    out = _run(batch_transforms(AugmentationParams.from_dict({"p_brightness": 0.3}), image_channels=1), batch, 0)
    changed = np.mean([not np.array_equal(out["data"][i, 0], batch["data"][i, 0]) for i in range(200)])
    assert 0.2 < changed < 0.4, changed
    # plans without the fields, and the demo preset, have no intensity augmentation
    spatial = ("enabled", "p_rotation", "rotation_deg", "p_scale", "scale_range", "p_shear", "shear", "p_translation",
               "translation_mm", "p_elastic", "elastic_magnitude_mm", "elastic_spacing_mm", "p_flip", "flip_axes")
    old_plans = {k: v for k, v in load_preset("cpu")["augmentation"].items() if k in spatial}
    assert batch_transforms(AugmentationParams.from_dict(old_plans), image_channels=1) is None
    assert batch_transforms(AugmentationParams.from_dict(load_preset("demo")["augmentation"]), image_channels=1) is None
    assert batch_transforms(AugmentationParams.from_dict(load_preset("cpu")["augmentation"]), image_channels=1)
    with pytest.raises(HCError, match="p_gamma must be a probability"):
        AugmentationParams.from_dict({"p_gamma": 1.5})
    with pytest.raises(HCError, match="noise_std must be two numbers"):
        AugmentationParams.from_dict({"noise_std": [0.1, 0.0]})
