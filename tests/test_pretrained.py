"""The default (pretrained) model and fine-tuning (issue #22 items 1 and 2), on a tiny synthetic MR model.

A cascade is trained for a few iterations on the tiny synthetic dataset of tests/_training_fixture.py
and exported as a model zip: it stands in for the shipped model (``HC_DEFAULT_MODEL``) and is the
starting point of the fine-tuning runs. The real shipped file is checked at the end when present.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_fixture import SPACING_XYZ, make_case, make_dataset, training_world  # noqa: E402

from heartcascade.dataset.synthetic.cases import make_case as synthetic_case  # noqa: E402
from heartcascade.utils.errors import HCError  # noqa: E402

DATASET_ID = 905
#: A few iterations per step: enough to give weights that differ from a fresh initialisation.
TINY_RUN = {"training": {"validation_interval_epochs": 1, "steps": [
    {"step": 1, "epochs": 1, "iterations_per_epoch": 2}, {"step": 2, "epochs": 1, "iterations_per_epoch": 1},
    {"step": 3, "epochs": 1, "iterations_per_epoch": 1}, {"step": 4, "epochs": 1, "iterations_per_epoch": 2}]}}
CARD = {"name": "tiny", "purpose": "tiny synthetic MR test volumes", "configuration": "cascade",
        "input": {"modality": "mr", "channels": 1, "min_slices": 5}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """HC_* roots with the preprocessed tiny dataset and a trained fold 0 exported to ``model.zip``."""
    from heartcascade.inference.model_archive import export_model
    from heartcascade.training.trainer import Trainer

    root = tmp_path_factory.mktemp("hc_pretrained")
    with training_world(root) as mp:
        make_dataset(root / "raw", num_cases=5, dataset_id=DATASET_ID)
        Trainer(DATASET_ID, 0, device="cpu", progress=False, num_workers=0, plans_override=TINY_RUN,
                predict_validation=False).run()
        archive = export_model(DATASET_ID, "cascade", root / "model.zip", ["0"])
        (root / "model.json").write_text(json.dumps(CARD))
        yield {"root": root, "zip": archive, "mp": mp}


def _trainer(**kwargs):
    from heartcascade.training.trainer import Trainer

    defaults = dict(dataset=DATASET_ID, fold=0, device="cpu", progress=False, num_workers=0,
                    predict_validation=False, plans_override=TINY_RUN)
    defaults.update(kwargs)
    return Trainer(**defaults)


def _weights(networks) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": t.detach().cpu().clone() for k, net in networks.items() for n, t in net.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# fine-tuning (item 2)


@pytest.mark.parametrize("form", ["zip", "folder", "pth", "default"])
def test_finetuning_starts_from_the_given_weights(model, tmp_path, form, monkeypatch):
    from heartcascade.inference.pretrained import DEFAULT_MODEL_ENV, load_model_weights

    fold = model["root"] / "res" / f"Dataset{DATASET_ID:03d}_TinyTrain" / "cascade" / "fold_0"
    monkeypatch.setenv(DEFAULT_MODEL_ENV, str(model["zip"]))  # 'default': the model hc_predict uses
    source = {"zip": model["zip"], "folder": fold.parent, "pth": fold / "checkpoint_final.pth",
              "default": "default"}[form]
    reference = _weights(load_model_weights(model["zip"]).networks)
    trainer = _trainer(pretrained=source, output_folder=tmp_path / "ft")
    trainer.setup()
    started = _weights(trainer.networks)
    assert started.keys() == reference.keys()
    assert all(torch.equal(started[k], reference[k]) for k in reference)
    fresh = _trainer(output_folder=tmp_path / "fresh")
    fresh.setup()
    assert not all(torch.equal(t, reference[k]) for k, t in _weights(fresh.networks).items())


def test_hc_train_pretrained_weights_spelling_trains_with_a_time_budget(model, tmp_path):
    from heartcascade.cli import train as train_cli
    from heartcascade.model.checkpoint import load_checkpoint

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train_cli.main([str(DATASET_ID), "1", "-pretrained_weights", str(model["zip"]), "--time-budget",
                               "8s", "--no-validation", "--quiet", "-device", "cpu", "--num-workers", "0",
                               "--plans-override", json.dumps(TINY_RUN)])
    assert code == 0, err.getvalue()
    fold = model["root"] / "res" / f"Dataset{DATASET_ID:03d}_TinyTrain" / "cascade" / "fold_1"
    log = (fold / "training_log.txt").read_text()
    assert f"networks initialised from {model['zip']}" in log
    assert "of the time budget" in log
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["pretrained"] == str(model["zip"])
    assert final["budget"]["time_budget_s"] == 8.0  # the run's option, kept in its checkpoint (not the plans)


def test_incompatible_models_are_refused(model, tmp_path):
    from heartcascade.inference.pretrained import load_model_weights
    from heartcascade.training.finetune import check_finetune_compatible

    from heartcascade.planning.plans import parse_plans

    plans = load_model_weights(model["zip"]).plans
    check_finetune_compatible(plans, parse_plans(plans.to_dict()), "cascade", "m.zip")  # itself: fine

    def refused(change, match):
        other = plans.to_dict()
        change(other)
        with pytest.raises(HCError, match=match):
            check_finetune_compatible(plans, parse_plans(other), "cascade", "m.zip")

    refused(lambda p: p["settings"].update(modality="ct"), r"m.zip: modality differs \(model: mr, this dataset's plans: ct\)")
    refused(lambda p: p["settings"].update(labels={"background": 0, "big": 1, "side": 2, "inner": 3}), "labels differ")
    refused(lambda p: p["settings"]["net1"].update(base_features=p["settings"]["net1"]["base_features"] * 2),
            "net1.base_features differs")
    refused(lambda p: p["settings"]["net2"].update(K=p["settings"]["net2"]["K"] + 2), "net2.K differs")
    # whole run: an architecture change through --plans-override, and the wrong configuration
    convs = plans.net2.convs_per_level + 1
    with pytest.raises(HCError, match=r"--pretrained .*model.zip: net2\.convs_per_level differs .*--plans-override"):
        _trainer(pretrained=model["zip"], output_folder=tmp_path / "a",
                 plans_override={**TINY_RUN, "net2": {"convs_per_level": convs}}).run()
    with pytest.raises(HCError, match="a 'cascade' model cannot start a 'baseline' run"):
        _trainer(pretrained=model["zip"], configuration="baseline", output_folder=tmp_path / "b",
                 plans_override=None).setup()
    with pytest.raises(HCError, match="pretrained model not found"):
        _trainer(pretrained=tmp_path / "nothing.zip", output_folder=tmp_path / "c").setup()


# ------------------------------------------------------------------------------------------------
# the default model (item 1)


def _write(array: np.ndarray, path: Path, spacing=SPACING_XYZ) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _predict(argv) -> tuple[int, str, str]:
    from heartcascade.cli import predict as predict_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict_cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_predict_without_model_uses_the_default_model(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HC_DEFAULT_MODEL", str(model["zip"]))
    (tmp_path / "in").mkdir()
    image, _ = make_case(7)
    _write(image, tmp_path / "in" / "scan_0000.nii.gz")
    code, out, err = _predict(["-i", tmp_path / "in", "-o", tmp_path / "out", "-device", "cpu", "--quiet"])
    assert code == 0, err
    lines = [line for line in err.splitlines() if "default model" in line]
    assert len(lines) == 1 and "model.zip (tiny synthetic MR test volumes)" in lines[0], err
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "scan.nii.gz")))
    assert labels.shape == image.shape and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_default_model_refuses_what_it_was_not_made_for(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HC_DEFAULT_MODEL", str(model["zip"]))
    image, _ = make_case(3)
    ct = np.where(image < 50, -1000.0, image).astype(np.float32)  # air at -1000 HU around the body
    cases = {
        "ct": (_write(ct, tmp_path / "ct.nii.gz"), r"looks like CT, not MR \(\d+% of the voxels"),
        "synthetic_ct": (_write(np.asarray(synthetic_case(0, 0, "ct").image, np.float32), tmp_path / "sct.nii.gz",
                                (1.5, 1.5, 2.0)), r"looks like CT, not MR \(4\d% of the voxels"),
        "slice": (_write(image[:1], tmp_path / "slice.nii.gz"), r"only 1 slice\(s\).*single 2D slice"),
        "few": (_write(image[:3], tmp_path / "few.nii.gz"), r"only 3 slice\(s\).*at least 5"),
        "2d": (_write(image[0], tmp_path / "flat.nii.gz", SPACING_XYZ[:2]), "expected a 3D image"),
    }
    for name, (path, match) in cases.items():
        code, out, err = _predict(["-i", path, "-o", tmp_path / f"out_{name}", "-device", "cpu"])
        lines = err.strip().splitlines()
        assert code == 1 and lines[-1].startswith(f"error: {path}: "), (name, err)
        assert "the default model is for tiny synthetic MR test volumes" in lines[-1], (name, err)
        assert re.search(match, lines[-1]), (name, lines[-1])
        assert not (tmp_path / f"out_{name}").exists() or not any((tmp_path / f"out_{name}").iterdir())
    two = tmp_path / "two"
    two.mkdir()
    for c in (0, 1):
        _write(image, two / f"p_{c:04d}.nii.gz")
    code, _, err = _predict(["-i", two, "-o", tmp_path / "out_two", "-device", "cpu"])
    assert code == 1 and "2 channel files, the default model reads 1" in err, err


def test_missing_default_model_and_explicit_model_unchanged(model, tmp_path, monkeypatch):
    monkeypatch.setenv("HC_DEFAULT_MODEL", str(tmp_path / "absent.zip"))
    image, _ = make_case(1)
    path = _write(image, tmp_path / "x.nii.gz")
    code, _, err = _predict(["-i", path, "-o", tmp_path / "o", "-device", "cpu"])
    assert code == 1 and "no default model" in err and "-m MODEL" in err
    # with -m the input is not screened: a CT-like scan is predicted as before
    ct = _write(np.where(image < 50, -1000.0, image).astype(np.float32), tmp_path / "ct.nii.gz")
    code, _, err = _predict(["-i", ct, "-o", tmp_path / "o2", "-m", model["zip"], "-device", "cpu", "--quiet"])
    assert code == 0, err


def test_shipped_model_card_and_file(shared_data, tmp_path, monkeypatch):
    """The shipped model loads and segments one real MS-CMRSeg scan (skips until the file is added)."""
    from heartcascade.inference.pretrained import DEFAULT_MODEL_NAME, PRETRAINED_DIR, model_card

    monkeypatch.delenv("HC_DEFAULT_MODEL", raising=False)
    card = model_card()
    assert card["name"] == DEFAULT_MODEL_NAME and card["input"]["modality"] == "mr"
    assert {"trained_on", "recipe", "measured", "limits", "purpose"} <= set(card)
    shipped = PRETRAINED_DIR / f"{DEFAULT_MODEL_NAME}.zip"
    if not shipped.is_file():
        pytest.skip(f"{shipped} is not in this checkout yet (scripts/train_pretrained.py makes it)")
    # small enough to ship in the wheel: the weights alone (3.0 M float32 parameters, 10.6 MiB zipped), no
    # optimizer state or extra checkpoints
    assert shipped.stat().st_size < 16 * 2**20
    scan = shared_data / "mscmrseg2019_bssfp" / "image_3.nii.gz"
    code, _, err = _predict(["-i", scan, "-o", tmp_path / "out", "-device", "cpu", "--quiet"])
    assert code == 0, err
    pred = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "image_3.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "mscmrseg2019_bssfp" / "label_3.nii.gz")))
    for code_value in (200, 500, 600):  # Myo, LV, RV in the data's own codes
        a, b = pred == code_value, np.rint(ref) == code_value
        dice = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        assert dice > 0.5, (code_value, dice)


def test_train_pretrained_script_dry_run(tmp_path):
    """scripts/train_pretrained.py lists the product's commands in order (training it is too slow for CI)."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_pretrained.py"
    result = subprocess.run([sys.executable, str(script), "--work", str(tmp_path / "w"), "--dry-run",
                             "--measure-heldout", "--budget", "5m", "--cross-centre", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [line.split()[1].rsplit("/", 1)[-1] for line in result.stdout.splitlines() if line.startswith("$ ")]
    assert commands == ["hc_import", "hc_plan_and_preprocess", "hc_train", "hc_train", "hc_export_model",
                        "hc_predict", "hc_evaluate"]
    assert "hc_train 30 all --no-validation --time-budget 5m" in result.stdout
    assert "hc_train 30 0 --splits" in result.stdout  # cases 1-20 for the held-out measurement
    assert "--preset default" in result.stdout and "-f all" in result.stdout
    assert not (tmp_path / "w" / "cine_mr_lv_myo_rv.zip").exists()
