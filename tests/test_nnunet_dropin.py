"""What an nnU-Net v2 user relies on: its folds, its environment variables, its flag spellings, model
archives, overlays, and probability files that nnUNetv2_ensemble reads."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from heartcascade.utils.errors import HCError
from test_inference import _planned, run_cli, synth, tiny_plans, write_model  # noqa: F401  (_planned: fixture)

DATA = Path(__file__).parent / "data"


# ------------------------------------------------------------------------------------------------
# Folds and paths


def test_default_split_matches_nnunet_fixture():
    from heartcascade.training.splits import make_kfold_splits

    fixture = json.loads((DATA / "nnunet_splits.json").read_text())
    assert len(fixture["cases"]) >= 3
    for name, entry in fixture["cases"].items():
        assert make_kfold_splits(entry["ids"]) == entry["splits"], name
        # the order the ids arrive in does not matter: nnU-Net sorts them first
        assert make_kfold_splits(list(reversed(entry["ids"]))) == entry["splits"], name


def test_default_split_file_is_nnunets(tmp_path):
    from heartcascade.training.splits import load_or_create_splits

    entry = json.loads((DATA / "nnunet_splits.json").read_text())["cases"]["mmwhs_20"]
    splits, path = load_or_create_splits(tmp_path, entry["ids"])
    assert json.loads(path.read_text()) == entry["splits"] == splits


def test_nnunet_raw_used_when_hc_raw_unset(tmp_path, monkeypatch, capsys):
    from heartcascade import paths

    monkeypatch.delenv("HC_RAW", raising=False)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setattr(paths, "_announced", set())
    (tmp_path / "Dataset004_Hearts").mkdir()
    assert paths.raw_dataset_dir(4) == tmp_path / "Dataset004_Hearts"
    assert paths.raw_root() == tmp_path
    err = capsys.readouterr().err
    assert err.count("nnUNet_raw") == 1 and "HC_RAW is not set" in err
    monkeypatch.setenv("HC_RAW", str(tmp_path / "mine"))
    assert paths.raw_root() == tmp_path / "mine"


# ------------------------------------------------------------------------------------------------
# Argument parsing


def _all_parsers():
    import importlib

    from heartcascade.cli import COMMANDS

    return {cmd: importlib.import_module(f"heartcascade.cli.{mod}").build_parser() for cmd, mod in COMMANDS.items()}


def test_every_command_refuses_prefixes_and_glued_short_options():
    parsers = _all_parsers()
    assert len(parsers) >= 13
    for cmd, parser in parsers.items():
        assert parser.allow_abbrev is False, cmd
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(["-device", "cpu"] if "-device" not in parser._option_string_actions
                              else ["-dx", "1"])
        actions = parser._option_string_actions
        assert "--quiet" in actions and "--verbose" in actions, f"{cmd} lacks --quiet/--verbose"


def test_glued_short_option_message():
    from heartcascade.cli import plan_and_preprocess

    err = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
        plan_and_preprocess.build_parser().parse_args(["-d1", "--plan-only"])
    assert "unknown option -d1" in err.getvalue() and "'-d 1'" in err.getvalue()


def _parse_error(parser, argv) -> str:
    err = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(err):
        parser.parse_args(argv)
    return err.getvalue().strip().splitlines()[-1]


def test_misspelling_hints_name_real_options():
    from heartcascade.cli import plan_and_preprocess, predict, train

    line = _parse_error(plan_and_preprocess.build_parser(), ["-d", "1", "-gpu_memory_target", "8"])
    assert "unknown option -gpu_memory_target (did you mean --gpu-memory-gb?)" in line, line
    assert "-g pu" not in line
    line = _parse_error(train.build_parser(), ["1", "0", "--time_budget", "5m"])
    assert "unrecognized arguments" in line and "--time_budget -> --time-budget" in line, line
    line = _parse_error(predict.build_parser(), ["-i", "a", "-o", "b", "-xyzzy"])
    assert line.endswith("unknown option -xyzzy"), line  # nothing close: no made-up suggestion


def test_nnunet_configuration_in_fold_position_is_explained():
    from heartcascade.cli import train

    line = _parse_error(train.build_parser(), ["1", "3d_fullres", "0"])
    assert "'3d_fullres' is an nnU-Net configuration" in line and "'hc_train 1 0'" in line, line


def test_other_nnunet_flags_accepted_or_refused_with_a_reason():
    from heartcascade.cli import predict, train

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        args = predict.build_parser().parse_args(["-i", "a", "-o", "b", "-npp", "3", "-nps", "2"])
    assert not hasattr(args, "npp") and "note: -npp 3 (nnU-Net) is accepted and ignored" in err.getvalue()
    for argv, expect in ((["1", "0", "--npz"], "hc_predict --nnunet-probabilities"),
                         (["1", "0", "-num_gpus", "2"], "torchrun --nproc_per_node"),
                         (["1", "0", "-tr", "nnUNetTrainer"], "no trainer classes")):
        line = _parse_error(train.build_parser(), argv)
        assert f"{argv[2]} (nnU-Net) is not supported: " in line and expect in line, line
    args = train.build_parser().parse_args(["1", "0", "-pretrained_weights", "m.pth"])
    assert args.pretrained == "m.pth"
    line = _parse_error(predict.build_parser(), ["-i", "a", "-o", "b", "-prev_stage_predictions", "x"])
    assert "cascade runs both of its stages itself" in line


def test_fold_averaging_refuses_another_label_order():
    from heartcascade.inference.model_loading import check_compatible_plans

    from heartcascade.planning.plans import parse_plans

    a = tiny_plans()
    b = a.to_dict()
    b["settings"]["labels"] = {"background": 0, "LV": 1, "Myo": 2, "RV": 3}
    b = parse_plans(b)
    assert a.labels != b.labels
    check_compatible_plans(a, parse_plans(a.to_dict()), "fold_1")  # the same plans: fine
    with pytest.raises(HCError, match="plans 'labels' differ"):
        check_compatible_plans(a, b, "fold_1")


def test_predict_accepts_nnunet_spellings():
    from heartcascade.cli import predict

    parser = predict.build_parser()
    args = parser.parse_args(["-i", "in", "-o", "out", "-d", "1", "-device", "cpu", "-chk", "checkpoint_best.pth",
                              "--save_probabilities", "-num_parts", "3", "-part_id", "2", "--disable_tta",
                              "--continue_prediction", "--verbose"])
    assert (args.device, args.checkpoint, args.nnunet_probabilities, args.num_parts, args.part_id, args.tta) == \
        ("cpu", "checkpoint_best.pth", True, 3, 2, False)
    assert args.save_probabilities is False  # nnU-Net's spelling writes nnU-Net's files, not the ROI npz
    assert parser.parse_args(["-i", "a", "-o", "b", "--save-probabilities"]).nnunet_probabilities is False
    assert parser.parse_args(["-i", "a", "-o", "b", "-d", "1", "--tta"]).tta is True
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        parser.parse_args(["-i", "a", "-o", "b", "-d", "1", "--dev", "cpu"])  # no prefix matching


def test_modality_is_case_insensitive():
    from heartcascade.cli import convert_mmwhs, demo, import_dataset, make_synthetic

    for module in (convert_mmwhs, import_dataset, make_synthetic, demo):
        parser = module.build_parser()
        action = parser._option_string_actions["--modality"]
        assert action.type("MR") == "mr" and action.type("Ct") == "ct"


def test_checkpoint_file_name(tmp_path):
    from heartcascade.inference.model_loading import checkpoint_file

    (tmp_path / "checkpoint_best.pth").write_bytes(b"x")
    assert checkpoint_file(tmp_path, "checkpoint_best.pth") == checkpoint_file(tmp_path, "best")
    with pytest.raises(HCError, match="a .pth file name"):
        checkpoint_file(tmp_path, "../elsewhere.pth")


# ------------------------------------------------------------------------------------------------
# Model archives


def _one_case(folder: Path) -> Path:
    folder.mkdir()
    sitk.WriteImage(synth(spacing=(1.25, 1.25, 6.0), size_xyz=(30, 28, 8)), str(folder / "c_0000.nii.gz"))
    return folder


def test_export_install_and_predict_from_zip(tmp_path, hc_roots, monkeypatch):
    from heartcascade.cli import export_model, install_model
    from heartcascade.inference.model_archive import read_manifest

    (hc_roots["raw"] / "Dataset007_Tiny").mkdir()
    config = write_model(hc_roots["results"] / "Dataset007_Tiny" / "cascade", tiny_plans(), folds=(0, 1))
    (config / "postprocessing.json").write_text('{"format_version": 1, "keep_largest_foreground": true, '
                                                '"keep_largest_per_label": [1]}')
    state = torch.load(config / "fold_0" / "checkpoint_final.pth", weights_only=True)
    state["optimizer"] = {"big": torch.zeros(1000)}  # resume state must not travel
    torch.save(state, config / "fold_0" / "checkpoint_final.pth")
    archive = tmp_path / "model.zip"
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_model.main(["-d", "7", "-c", "cascade", "-f", "0", "1", "-o", str(archive)]) == 0
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        readme = zf.read("README.md").decode()
        slim = torch.load(io.BytesIO(zf.read("Dataset007_Tiny/cascade/fold_0/checkpoint_final.pth")),
                          weights_only=True)
    assert {"heartcascade_model.json", "README.md", "Dataset007_Tiny/cascade/postprocessing.json",
            "Dataset007_Tiny/cascade/fold_1/plans.json"} <= names
    assert "optimizer" not in slim and set(slim) == {"format_version", "configuration", "plans", "networks"}
    assert "| 0 |" in readme and "| 1 |" in readme
    assert read_manifest(archive)["folds"] == ["0", "1"]

    inp = _one_case(tmp_path / "in")
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "from_zip", "-m", archive, "--device", "cpu", "--quiet"])
    assert code == 0, err
    code, _, err = run_cli(["-i", inp, "-o", tmp_path / "from_dir", "-d", 7, "--device", "cpu", "--quiet"])
    assert code == 0, err
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_zip" / "c.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "from_dir" / "c.nii.gz")))
    assert np.array_equal(a, b)

    # install into a fresh results root
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    monkeypatch.setenv("HC_RESULTS", str(fresh))
    err_buf = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()):
        assert install_model.main([str(archive)]) == 0
    assert (fresh / "Dataset007_Tiny" / "cascade" / "fold_1" / "checkpoint_final.pth").is_file()
    assert (fresh / "Dataset007_Tiny" / "cascade" / "postprocessing.json").is_file()
    with contextlib.redirect_stderr(err_buf):
        assert install_model.main([str(archive)]) == 1
    assert "already exist" in err_buf.getvalue() and "--overwrite" in err_buf.getvalue()
    with contextlib.redirect_stdout(io.StringIO()):
        assert install_model.main([str(archive), "--overwrite"]) == 0


def test_export_with_inference_settings_changes_only_the_inference_section(tmp_path, hc_roots):
    """hc_export_model --inference-settings: the archive's model gets the given inference fields (in every
    checkpoint and plans.json, listed in the manifest); the weights and everything else stay as trained."""
    from heartcascade.cli import export_model
    from heartcascade.inference.model_archive import extracted_model, read_manifest
    from heartcascade.inference.predictor import Predictor

    (hc_roots["raw"] / "Dataset008_Tiny").mkdir()
    trained = tiny_plans()
    config = write_model(hc_roots["results"] / "Dataset008_Tiny" / "cascade", trained, folds=(0,))
    archive = tmp_path / "model.zip"
    rule = {"brightening": {"label": 1, "targets": [0.6], "max_factor": 2.0, "min_voxels": 50}, "tta": True}
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_model.main(["-d", "8", "-f", "0", "-o", str(archive), "--inference-settings",
                                  json.dumps(rule)]) == 0
    assert read_manifest(archive)["inference_settings"] == rule
    with extracted_model(archive) as (folder, _):
        predictor = Predictor.from_model_dir(folder, device="cpu")
        on_disk = json.loads((folder / "fold_0" / "plans.json").read_text())
    assert predictor.tta is True and predictor.inference.brightening.targets == (0.6,)
    assert on_disk["settings"]["inference"]["brightening"] == rule["brightening"]
    assert {k: v for k, v in on_disk["settings"].items() if k != "inference"} == \
        {k: v for k, v in trained.settings_dict().items() if k != "inference"}
    original = torch.load(config / "fold_0" / "checkpoint_final.pth", weights_only=True)["networks"]
    for net, weights in original.items():
        for key, value in weights.items():
            assert torch.equal(predictor.folds[0][net].state_dict()[key].cpu(), value), (net, key)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert export_model.main(["-d", "8", "-f", "0", "-o", str(tmp_path / "bad.zip"),
                                  "--inference-settings", '{"nope": 1}']) == 1
    assert "inference has unknown key 'nope'" in err.getvalue() and not (tmp_path / "bad.zip").exists()


def test_unknown_plans_version_is_refused(tmp_path):
    from heartcascade.inference.model_loading import load_fold

    folder = write_model(tmp_path / "m", tiny_plans())
    state = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    state["plans"]["plans_version"] = 99  # a model from a newer release
    torch.save(state, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(HCError, match=r"plans_version 99 is not 3; re-plan") as info:
        load_fold(folder / "fold_0")
    assert "\n" not in str(info.value)


def test_archive_with_foreign_members_is_refused(tmp_path):
    from heartcascade.inference.model_archive import MANIFEST, read_manifest

    archive = tmp_path / "evil.zip"
    manifest = {"format": "heartcascade-model", "format_version": 1, "dataset": "Dataset007_Tiny",
                "configuration": "cascade", "folds": ["0"], "checkpoint": "final", "plans_version": 3}
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(MANIFEST, json.dumps(manifest))
        zf.writestr("Dataset007_Tiny/cascade/../../../etc/x", "no")
    with pytest.raises(HCError, match="unexpected member"):
        read_manifest(archive)
    (tmp_path / "plain.zip").write_bytes(b"PK not really")
    with pytest.raises(HCError, match="not a readable model archive"):
        read_manifest(tmp_path / "plain.zip")


# ------------------------------------------------------------------------------------------------
# Overlays and nnU-Net probability files


def test_predict_overlays_and_nnunet_probabilities(tmp_path):
    from heartcascade.inference.nnunet_interop import read_nnunet_probabilities

    inp = _one_case(tmp_path / "in")
    model = write_model(tmp_path / "model", tiny_plans(codes=False))
    out = tmp_path / "out"
    code, _, err = run_cli(["-i", inp, "-o", out, "-m", model, "--device", "cpu", "--quiet", "--overlays",
                            "--nnunet-probabilities"])
    assert code == 0, err
    png = out / "overlays" / "c.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    probs, props = read_nnunet_probabilities(out / "c.npz")
    image = sitk.ReadImage(str(inp / "c_0000.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "c.nii.gz")))
    assert probs.dtype == np.float32 and probs.shape == (4,) + labels.shape
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-2)
    srt = np.sort(probs, 0)
    confident = srt[-1] - srt[-2] > 1e-2
    assert np.array_equal(probs.argmax(0)[confident], labels[confident])
    assert props["sitk_stuff"]["spacing"] == image.GetSpacing()
    assert props["sitk_stuff"]["origin"] == image.GetOrigin()
    assert props["sitk_stuff"]["direction"] == image.GetDirection()
    assert props["spacing"] == list(reversed(image.GetSpacing()))
    with open(out / "c.pkl", "rb") as handle:
        assert pickle.load(handle) == props


def _nnunet_folder(folder: Path, probs: np.ndarray, labels: dict, codes: dict | None = None) -> Path:
    folder.mkdir()
    np.savez_compressed(folder / "c.npz", probabilities=probs.astype(np.float32))
    props = {"sitk_stuff": {"spacing": (1.5, 1.25, 6.0), "origin": (1.0, 2.0, 3.0),
                            "direction": (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)}, "spacing": [6.0, 1.25, 1.5]}
    (folder / "c.pkl").write_bytes(pickle.dumps(props))
    (folder / "dataset.json").write_text(json.dumps({"labels": labels, **({"label_codes": codes} if codes else {})}))
    return folder


def test_hc_ensemble_checks_and_aligns_label_order(tmp_path):
    from heartcascade.cli import ensemble

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(4), size=(3, 5, 6)).transpose(3, 0, 1, 2)  # (C, z, y, x), channels bg, Myo, LV, RV
    order = {"background": 0, "Myo": 1, "LV": 2, "RV": 3}
    hc = _nnunet_folder(tmp_path / "hc", p, order, codes={"1": 200, "2": 500, "3": 600})
    q = rng.dirichlet(np.ones(4), size=(3, 5, 6)).transpose(3, 0, 1, 2)
    swapped = {"background": 0, "LV": 1, "Myo": 2, "RV": 3}  # another model's order: LV first
    nn = _nnunet_folder(tmp_path / "nn", q[[0, 2, 1, 3]], swapped)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ensemble.main(["-i", str(hc), str(nn), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert "re-ordered to match the first folder" in err.getvalue()
    out = sitk.ReadImage(str(tmp_path / "out" / "c.nii.gz"))
    expected = np.array([0, 200, 500, 600])[np.argmax(p + q, axis=0)]
    assert np.array_equal(sitk.GetArrayFromImage(out), expected)
    assert out.GetSpacing() == (1.5, 1.25, 6.0) and out.GetOrigin() == (1.0, 2.0, 3.0)
    # other structures: refused; no dataset.json: refused with what to do
    other = _nnunet_folder(tmp_path / "other", q, {"background": 0, "LA": 1, "RA": 2, "AA": 3})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ensemble.main(["-i", str(hc), str(other), "-o", str(tmp_path / "o2")]) == 1
    assert "segment different structures" in err.getvalue()
    (nn / "dataset.json").unlink()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ensemble.main(["-i", str(hc), str(nn), "-o", str(tmp_path / "o3")]) == 1
    assert "no dataset.json" in err.getvalue() and "copy the model's dataset.json" in err.getvalue()


def test_hc_apply_postprocessing_on_a_folder_of_label_maps(tmp_path):
    from heartcascade.cli import apply_postprocessing

    plans = tiny_plans()  # label codes 1 -> 200, 2 -> 500, 3 -> 600
    model = write_model(tmp_path / "model", plans)
    (model / "postprocessing.json").write_text(json.dumps(
        {"format_version": 1, "connectivity": 26, "keep_largest_foreground": True, "keep_largest_per_label": [2]}))
    labels = np.zeros((8, 20, 20), np.uint16)
    labels[2:6, 4:12, 4:12] = 200
    labels[3:5, 6:9, 6:9] = 500
    labels[3, 14, 14] = 500   # a stray blob of label 2, and one far from the heart
    labels[7, 18, 1] = 600
    src = tmp_path / "in"
    src.mkdir()
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((1.25, 1.25, 6.0))
    sitk.WriteImage(image, str(src / "c.nii.gz"))
    code = apply_postprocessing.main(["-i", str(src), "-o", str(tmp_path / "out"), "-m", str(model), "--quiet"])
    assert code == 0
    result = sitk.ReadImage(str(tmp_path / "out" / "c.nii.gz"))
    expected = labels.copy()
    expected[3, 14, 14] = 0
    expected[7, 18, 1] = 0
    assert np.array_equal(sitk.GetArrayFromImage(result), expected)
    assert result.GetSpacing() == image.GetSpacing()
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(src / "c.nii.gz"))), labels)  # input kept
    # training labels are accepted too; foreign values and -i == -o are refused
    bad = tmp_path / "bad"
    bad.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray((labels > 0).astype(np.uint16) * 205), str(bad / "x.nii.gz"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert apply_postprocessing.main(["-i", str(bad), "-o", str(tmp_path / "o2"), "-m", str(model)]) == 1
        assert apply_postprocessing.main(["-i", str(src), "-o", str(src), "-m", str(model)]) == 1
    assert "label values [205] are not the model's labels" in err.getvalue()
    assert "must differ from the input folder" in err.getvalue()


def test_hc_overlay_three_views_with_reference(tmp_path):
    from PIL import Image

    from heartcascade.cli import overlay
    from heartcascade.evaluation.overlay import _lps_array, orthogonal_views

    image = synth(size_xyz=(40, 36, 10), spacing=(1.0, 1.0, 4.0))
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 300).astype(np.uint8) * 2)
    labels.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "img.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "seg.nii.gz"))
    out = tmp_path / "o.png"
    with contextlib.redirect_stdout(io.StringIO()):
        assert overlay.main(["-i", str(tmp_path / "img.nii.gz"), "-s", str(tmp_path / "seg.nii.gz"),
                             "-r", str(tmp_path / "seg.nii.gz"), "-o", str(out), "--labels", "2:LV"]) == 0
    width, height = Image.open(out).size
    assert width > height > 300  # two rows of three views
    # views: axial is (j, i), coronal and sagittal have the slice axis vertical with superior up
    array, spacing = _lps_array(labels, label=True)
    views = orthogonal_views(array, (5, 18, 20), spacing)
    assert [v[0] for v in views] == ["axial", "coronal", "sagittal"]
    assert views[0][1].shape == (36, 40) and views[1][1].shape == (10, 40) and views[2][1].shape == (10, 36)
    assert views[1][2] == pytest.approx(4.0)
    err = io.StringIO()
    small = sitk.Image(5, 5, 5, sitk.sitkUInt8)
    sitk.WriteImage(small, str(tmp_path / "small.nii.gz"))
    with contextlib.redirect_stderr(err):
        assert overlay.main(["-i", str(tmp_path / "img.nii.gz"), "-s", str(tmp_path / "small.nii.gz"),
                             "-o", str(tmp_path / "x.png")]) == 1
    assert err.getvalue().startswith("error: ") and "differs from the image" in err.getvalue()


# ------------------------------------------------------------------------------------------------
# Evaluation conventions and nnU-Net's summary keys


def test_hd95_conventions_and_both_empty_rule():
    from heartcascade.evaluation.metrics import binary_metrics, surface_distances

    ref = np.zeros((20, 40, 40), bool)
    ref[5:15, 10:25, 10:25] = True
    pred = ref.copy()
    pred[8:12, 33:37, 33:37] = True  # a stray blob far away: ~6 % of one direction, ~3 % pooled
    spacing = (2.0, 1.0, 1.0)
    d_rp, d_pr = surface_distances(ref, pred, spacing)
    pooled = binary_metrics(ref, pred, spacing)
    worst = binary_metrics(ref, pred, spacing, hd95="max")
    assert pooled.hd95 == pytest.approx(np.percentile(np.concatenate([d_rp, d_pr]), 95))
    assert worst.hd95 == pytest.approx(max(np.percentile(d_rp, 95), np.percentile(d_pr, 95)))
    assert worst.hd95 > pooled.hd95 and worst.dice == pooled.dice
    empty = np.zeros((4, 4, 4), bool)
    assert binary_metrics(empty, empty, (1, 1, 1)).dice == 1.0
    nan = binary_metrics(empty, empty, (1, 1, 1), both_empty="nan")
    assert np.isnan(nan.dice) and nan.status == "both_empty"
    with pytest.raises(ValueError, match="hd95 must be one of pooled, max"):
        binary_metrics(ref, pred, spacing, hd95="mean")


def test_evaluate_writes_nnunet_summary_keys_and_conventions(tmp_path):
    from heartcascade.cli import evaluate

    for folder in ("ref", "pred"):
        (tmp_path / folder).mkdir()
    for i, (ref_labels, pred_labels) in enumerate((((1, 2), (1, 2)), ((1,), (1,)))):
        ref = np.zeros((6, 12, 12), np.uint8)
        pred = np.zeros_like(ref)
        for value in ref_labels:
            ref[1:4, value * 3:value * 3 + 3, 2:8] = value
        for value in pred_labels:
            pred[1:4, value * 3:value * 3 + 3, 3:8] = value
        for array, folder in ((ref, "ref"), (pred, "pred")):
            img = sitk.GetImageFromArray(array)
            sitk.WriteImage(img, str(tmp_path / folder / f"case{i}.nii.gz"))
    out = tmp_path / "summary.json"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert evaluate.main(["-ref", str(tmp_path / "ref"), "-pred", str(tmp_path / "pred"), "-o", str(out),
                              "--labels", "1:LV:500,2:RV:600", "--hd95", "max", "--both-empty", "nan",
                              "--quiet"]) == 0
    assert "HD95 max" in printed.getvalue()
    summary = json.loads(out.read_text())
    assert summary["conventions"]["hd95"].startswith("max") and summary["conventions"]["both_empty"].startswith("nan")
    # label codes are what the files hold, so nnU-Net's keys are the codes
    assert [sorted(c["metrics"]) for c in summary["metric_per_case"]] == [["500", "600"], ["500", "600"]]
    case0 = summary["metric_per_case"][0]["metrics"]["500"]
    assert case0["Dice"] == pytest.approx(2 * 45 / (54 + 45)) and (case0["TP"], case0["FN"], case0["FP"]) == (45, 9, 0)
    assert summary["metric_per_case"][1]["metrics"]["600"]["Dice"] is None  # absent from both: left out
    assert summary["mean"]["600"]["Dice"] == pytest.approx(case0["Dice"])
    assert summary["foreground_mean"]["Dice"] == pytest.approx(
        (summary["mean"]["500"]["Dice"] + summary["mean"]["600"]["Dice"]) / 2)


# ------------------------------------------------------------------------------------------------
# Spacing noise


def test_same_scan_in_nrrd_and_nifti_gives_identical_predictions(tmp_path):
    """1.25 mm in NIfTI, 1.2499999999999998 mm in NRRD: the crop margin (10 mm = 8 voxels) used to differ."""
    from _training_fixture import make_case

    from heartcascade.planning.plans import preprocess_settings
    from heartcascade.preprocessing.preprocess import preprocess_images

    image, _ = make_case(1)
    image = np.pad(image, ((0, 0), (16, 16), (16, 16)), constant_values=-500)  # air: the crop margin shows
    files = {}
    for ending, spacing in ((".nii.gz", 1.25), (".nrrd", 1.2499999999999998)):
        img = sitk.GetImageFromArray(image)
        img.SetSpacing((spacing, spacing, 2.5))
        folder = tmp_path / ending.strip(".").replace(".", "_")
        folder.mkdir()
        files[ending] = folder / f"scan_0000{ending}"
        sitk.WriteImage(img, str(files[ending]))
    read = {e: sitk.ReadImage(str(p)) for e, p in files.items()}
    assert read[".nrrd"].GetSpacing()[0] != read[".nii.gz"].GetSpacing()[0]  # the noise survives the file
    plans = tiny_plans()
    settings = preprocess_settings(plans)
    (a, pa), (b, pb) = (preprocess_images([read[e]], settings, "scan") for e in (".nii.gz", ".nrrd"))
    assert pa["crop_bbox_zyx"] == pb["crop_bbox_zyx"] and pa["spacing"] == pb["spacing"]
    assert pa["crop_bbox_zyx"][1][0] > 0  # the body crop is inside the image, so the margin matters
    assert np.array_equal(a, b)
    model = write_model(tmp_path / "model", plans)
    outputs = {}
    for ending, path in files.items():
        out = tmp_path / f"out_{ending.strip('.')}"
        code, _, err = run_cli(["-i", path.parent, "-o", out, "-m", model, "--device", "cpu", "--quiet"])
        assert code == 0, err
        outputs[ending] = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"scan{ending}")))
    assert np.array_equal(outputs[".nii.gz"], outputs[".nrrd"])


# ------------------------------------------------------------------------------------------------
# Logs


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from heartcascade.utils.progress import bars_enabled, progress_bar

    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert not bars_enabled(True)
    assert list(progress_bar(range(20), desc="x")) == list(range(20))
    assert log.getvalue() == ""  # a log file gets no bar redraws
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert bars_enabled(True) and not bars_enabled(False)
    list(progress_bar(range(3), desc="shown"))
    assert "shown" in terminal.getvalue()


def test_plan_and_preprocess_verify_dataset_integrity(hc_roots):
    from _training_fixture import LABELS, make_case

    from heartcascade.cli import plan_and_preprocess

    raw = hc_roots["raw"] / "Dataset066_Bad"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    image, label = make_case(0)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(raw / "imagesTr" / "b0_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(label), str(raw / "labelsTr" / "b0.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MR"}, "labels": LABELS, "numTraining": 3,
                                                  "file_ending": ".nii.gz"}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        assert plan_and_preprocess.main(["-d", "66", "--verify_dataset_integrity", "--quiet"]) == 1
    assert "error: " in err.getvalue() and "numTraining is 3" in err.getvalue()
    assert not (hc_roots["preprocessed"] / "Dataset066_Bad").exists()
