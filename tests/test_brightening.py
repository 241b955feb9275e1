"""Test-time brightening (inference/brightening.py, planner rule 13): the measure, the factor, the plans field.

The predictor's two passes are tested in test_inference.py (they need its tiny planned model).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from heartcascade.dataset.dataset_json import load_dataset
from heartcascade.dataset.image_io import read_image
from heartcascade.inference import brightening
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import presets
from heartcascade.planning.planner import plan_experiment
from heartcascade.planning.plans import BrighteningPlan, parse_plans
from heartcascade.preprocessing.preprocess import prepare_arrays
from heartcascade.utils.errors import HCError

from test_preprocessing import make_raw_dataset, simple_settings  # noqa: E402 - shared tiny-dataset helpers

RULE = BrighteningPlan(label=1, targets=(0.6,), max_factor=2.0, min_voxels=10)


def test_factor_lifts_the_blood_pool_to_the_target_and_no_further():
    assert brightening.brightening_factors([0.4], RULE) == [pytest.approx(1.5)]
    assert brightening.brightening_factors([0.6], RULE) is None      # bright enough: one pass
    assert brightening.brightening_factors([0.9], RULE) is None
    assert brightening.brightening_factors([0.05], RULE) == [2.0]    # never above max_factor
    assert brightening.brightening_factors(None, RULE) is None       # too few voxels of the class found
    two = BrighteningPlan(label=1, targets=(0.6, 0.3), max_factor=2.0, min_voxels=10)
    assert brightening.brightening_factors([0.7, 0.2], two) == [1.0, pytest.approx(1.5)]


def test_brighten_moves_a_uniform_class_exactly_to_the_target_and_keeps_the_range():
    rng = np.random.default_rng(0)
    image = rng.uniform(-1, 1, (1, 6, 20, 20)).astype(np.float32)
    labels = np.zeros(image.shape[1:], np.uint8)
    labels[2:4, 5:15, 5:15] = 1
    image[0][labels == 1] = 2 * 0.4 - 1  # the blood pool at 0.4 of the window
    measured = brightening.class_brightness(image, labels, 1, [(-1.0, 1.0)], RULE.min_voxels)
    assert measured == [pytest.approx(0.4)]
    factors = brightening.brightening_factors(measured, RULE)
    out = brightening.brighten(image, factors, [(-1.0, 1.0)])
    assert brightening.class_brightness(out, labels, 1, [(-1.0, 1.0)], 1) == [pytest.approx(0.6, abs=1e-5)]
    assert out.min() >= -1 and out.max() <= 1 and out.dtype == np.float32
    assert np.all(np.diff(np.sort(out.ravel())) >= 0)  # monotone: order of intensities kept
    assert (out >= image - 1e-6).all()  # a factor > 1 only brightens
    fraction, scaled = (image + 1) / 2, (out + 1) / 2  # linear below the top: contrast ratios are kept
    below = fraction * 1.5 < 0.99
    assert np.allclose(scaled[below], fraction[below] * 1.5, atol=1e-5)
    assert np.allclose(scaled[~below], np.minimum(fraction[~below] * 1.5, 1), atol=1e-5)  # the top stays the top
    assert brightening.class_brightness(image, labels, 2, [(-1.0, 1.0)], 1) is None  # class absent


def test_fingerprint_brightness_is_the_measure_prediction_takes(tmp_path):
    """The target (fingerprint) and the first pass (predictor) measure a class alike: on a training case,
    the fingerprint's class_brightness equals the predictor's measure on the normalised image."""
    info = make_raw_dataset(tmp_path, 5, "Bright", n_cases=2, modality="mr", spacing=(1.0, 1.0, 3.0),
                            size_xyz=(40, 36, 12))
    fp = fpmod.compute_fingerprint(load_dataset(info.folder), num_processes=1, progress=False)
    settings = simple_settings("mr", num_classes=4)
    for case in info.training_cases():
        record = next(r for r in fp["cases"] if r["case_id"] == case.case_id)
        image, seg, _ = prepare_arrays([read_image(case.images[0])], settings, read_image(case.label), case.case_id)
        for label in (1, 2, 3):
            expected = brightening.class_brightness(image, seg, label, [(-1.0, 1.0)], 1)
            assert record["class_brightness"][0][label] == pytest.approx(expected[0], abs=0.02), label
    medians = fp["class_brightness_median"][0]
    assert medians[1] == pytest.approx(np.median([r["class_brightness"][0][1] for r in fp["cases"]]))


def test_planner_writes_the_rule_only_where_the_preset_asks(tmp_path):
    info = make_raw_dataset(tmp_path, 6, "BrightPlan", n_cases=3, modality="mr", spacing=(1.0, 1.0, 3.0),
                            size_xyz=(40, 36, 12))
    dataset = load_dataset(info.folder)
    fp = fpmod.compute_fingerprint(dataset, num_processes=1, progress=False)
    preset = presets.load_preset("demo")
    off = plan_experiment(fp, preset, dataset, 6, gpu_memory_gb=2.0)
    assert off["settings"]["inference"]["brightening"] is None and parse_plans(off).inference.brightening is None
    asked = copy.deepcopy(preset)
    asked["inference"]["brightening"] = {"target_quantile": 25, "max_factor": 1.8, "min_voxels": 40}
    plans = parse_plans(plan_experiment(fp, asked, dataset, 6, gpu_memory_gb=2.0))
    rule = plans.inference.brightening
    medians = fp["class_brightness_median"][0]
    brightest = max(range(1, 4), key=lambda c: medians[c])
    assert rule.label == brightest and rule.max_factor == 1.8 and rule.min_voxels == 40
    values = [r["class_brightness"][0][brightest] for r in fp["cases"]]
    assert rule.targets == (pytest.approx(np.percentile(values, 25), abs=1e-4),)
    # CT (HU window: contrast timing, not rendering; measured on cine MR only) keeps one pass
    ct = make_raw_dataset(tmp_path / "ct", 9, "BrightCT", n_cases=2, modality="ct", spacing=(1.0, 1.0, 3.0),
                          size_xyz=(40, 36, 12))
    ct_info = load_dataset(ct.folder)
    ct_plans = plan_experiment(fpmod.compute_fingerprint(ct_info, num_processes=1, progress=False), asked, ct_info, 9,
                               gpu_memory_gb=2.0)
    assert ct_plans["settings"]["normalization"][0]["scheme"] == "ct_clip"
    assert ct_plans["settings"]["inference"]["brightening"] is None


def test_plans_field_is_checked_with_one_line_errors(tmp_path):
    info = make_raw_dataset(tmp_path, 7, "BrightBad", n_cases=2, modality="mr", spacing=(1.0, 1.0, 3.0),
                            size_xyz=(40, 36, 12))
    dataset = load_dataset(info.folder)
    plans = plan_experiment(fpmod.compute_fingerprint(dataset, num_processes=1, progress=False),
                            presets.load_preset("demo"), dataset, 7, gpu_memory_gb=2.0)
    good = {"label": 1, "targets": [0.6], "max_factor": 2.0, "min_voxels": 50}
    for bad, message in (({**good, "label": 4}, "brightening.label 4 is not a foreground class"),
                         ({**good, "targets": [0.6, 0.5]}, "one entry per input channel"),
                         ({**good, "targets": [1.5]}, "brightening.targets must be <= 1"),
                         ({**good, "max_factor": 1}, "brightening.max_factor must be > 1"),
                         ({**good, "gamma_min": 0.5}, "brightening has unknown key 'gamma_min'"),
                         ({**good, "extra": 1}, "brightening has unknown key 'extra'"),
                         ({"label": 1}, "brightening lacks field 'targets'"),
                         ([1], "brightening must be an object")):
        broken = copy.deepcopy(plans)
        broken["settings"]["inference"]["brightening"] = bad
        with pytest.raises(HCError, match=message) as err:
            parse_plans(broken, "p.json")
        assert "\n" not in str(err.value) and "inference.brightening" in str(err.value)
    plans["settings"]["inference"]["brightening"] = good
    assert parse_plans(plans).inference.brightening == BrighteningPlan(1, (0.6,), 2.0, 50)
