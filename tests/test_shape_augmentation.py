"""The label-driven contraction of the LV cavity (training.shape_augmentation) and its plans option."""
from __future__ import annotations

import random

import numpy as np
import pytest

from heartcascade.planning.augmentation_plan import AugmentationParams
from heartcascade.training.augmentation import batch_transforms
from heartcascade.training.shape_augmentation import CavityContractionTransform, outer_after, radial_source
from heartcascade.utils.errors import HCError

CAVITY, WALL, RV = 1, 2, 3


def _heart(slices: int = 3, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """A short-axis phantom: a disc of cavity (radius 12) in a ring of wall (to 18), a right ventricle
    beside it, and an image whose value encodes the label (10 per label value) -- one empty slice at the end."""
    rows, cols = np.mgrid[:size, :size]
    r = np.hypot(rows - 48, cols - 40)
    plane = np.zeros((size, size), dtype=np.int16)
    plane[r < 18] = WALL
    plane[r < 12] = CAVITY
    plane[(np.abs(rows - 48) < 10) & (cols >= 60) & (cols < 72)] = RV
    seg = np.zeros((1, slices, size, size), dtype=np.int16)
    seg[0, :-1] = plane
    image = (10.0 * seg).astype(np.float32)
    return image, seg


def test_contraction_shrinks_the_cavity_keeps_the_wall_and_leaves_the_rest():
    image, seg = _heart()
    data, labels = image.copy(), seg.copy()
    CavityContractionTransform((0.5, 0.5), (CAVITY, WALL), p_per_sample=1.0).apply(data, labels, 0.5)
    before = [(seg[0, 0] == v).sum() for v in (CAVITY, WALL)]
    after = [(labels[0, 0] == v).sum() for v in (CAVITY, WALL)]
    assert after[0] == pytest.approx(0.25 * before[0], rel=0.15)  # the radius halved: a quarter of the area
    assert after[1] == pytest.approx(before[1], rel=0.1)  # the wall keeps its area (it thickens)
    assert set(np.unique(labels)) == set(np.unique(seg))  # no new label values
    cavity = labels[0, 0] == CAVITY  # still enclosed by the wall: no cavity pixel touches anything else
    near = np.zeros_like(cavity)
    for axis in (0, 1):
        for step in (-1, 1):
            near |= np.roll(cavity, step, axis=axis)
    assert set(np.unique(labels[0, 0][near])) <= {CAVITY, WALL}
    far = np.zeros(seg.shape[2:], dtype=bool)  # beyond twice the wall's radius nothing moves
    rows, cols = np.mgrid[:96, :96]
    far[np.hypot(rows - 48, cols - 40) > 2 * 18 + 2] = True
    np.testing.assert_array_equal(labels[0, 0][far], seg[0, 0][far])
    np.testing.assert_array_equal(data[0, 0][far], image[0, 0][far])
    np.testing.assert_array_equal(labels[0, -1], seg[0, -1])  # a slice without the cavity is left alone
    inside = labels[0, 0] == CAVITY  # the image moved with the labels
    assert np.abs(data[0, 0][inside] - 10.0 * CAVITY).max() < 5.0


def test_the_radial_map_is_increasing_and_fixes_its_knots():
    r = np.linspace(0, 60, 601)
    source = radial_source(r, 12.0, 18.0, 0.5)
    assert np.all(np.diff(source) > 0)
    assert radial_source(np.array([6.0]), 12.0, 18.0, 0.5)[0] == pytest.approx(12.0)  # cavity edge
    outer = outer_after(12.0, 18.0, 0.5)
    assert 6.0 < outer < 18.0 and outer ** 2 - 6.0 ** 2 == pytest.approx(18.0 ** 2 - 12.0 ** 2)
    assert radial_source(np.array([outer]), 12.0, 18.0, 0.5)[0] == pytest.approx(18.0)
    np.testing.assert_array_equal(source[r >= 36], r[r >= 36])


def test_batch_path_contracts_image_and_labels_together_and_is_seeded():
    image, seg = _heart()
    batch = {"data": np.concatenate([image, -image], axis=0)[None], "seg": seg[None]}
    params = AugmentationParams.from_dict({"p_cavity_contraction": 1.0, "cavity_contraction_range": [0.4, 0.8],
                                           "cavity_contraction_labels": [CAVITY, WALL]})
    transform = batch_transforms(params, image_channels=1)

    def run(seed: int) -> dict:
        np.random.seed(seed)
        random.seed(seed)
        return transform(**{k: v.copy() for k, v in batch.items()})

    out = run(0)
    assert (out["seg"] == CAVITY).sum() < 0.7 * (seg == CAVITY).sum()
    np.testing.assert_allclose(out["data"][0, 1], -out["data"][0, 0])  # every channel with the same map
    again = run(0)
    np.testing.assert_array_equal(out["seg"], again["seg"])
    np.testing.assert_array_equal(out["data"], again["data"])
    assert batch_transforms(AugmentationParams.from_dict({"cavity_contraction_labels": [CAVITY, WALL]}), 1) is None


def test_contraction_option_is_checked():
    with pytest.raises(HCError, match="cavity_contraction_labels is empty"):
        AugmentationParams.from_dict({"p_cavity_contraction": 0.3})
    with pytest.raises(HCError, match="cavity_contraction_range"):
        AugmentationParams.from_dict({"cavity_contraction_range": [0.0, 1.0]})
    with pytest.raises(HCError, match="two foreground label values"):
        AugmentationParams.from_dict({"cavity_contraction_labels": [1]})
    assert AugmentationParams.from_dict({"p_cavity_contraction": 0.3, "cavity_contraction_labels": [1, 2]})


def test_planner_finds_the_cavity_and_wall_by_name():
    from heartcascade.planning.planner import cavity_and_wall

    assert cavity_and_wall({"background": 0, "LV": 1, "Myo": 2, "RV": 3}) == [1, 2]
    assert cavity_and_wall({"background": 0, "myocardium": 4, "LV_blood_pool": 7, "LA": 1}) == [7, 4]
    assert cavity_and_wall({"background": 0, "heart": 1}) == []
