"""Synthetic hearts: determinism, anatomy, appearance, geometry, and the hc_make_synthetic command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from heartcascade.cli import make_synthetic
from heartcascade.dataset import synthetic as S
from heartcascade.dataset.synthetic import anatomy as A
from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS, load_dataset
from heartcascade.dataset.image_io import Geometry, choose_slice_axis, label_array, read_image

FACE = ndimage.generate_binary_structure(3, 1)
IN_PLANE = np.zeros((3, 3, 3), bool)
IN_PLANE[1, 1, :] = IN_PLANE[1, :, 1] = True
LV, MYO, RV, LA, RA, AA, PA = range(1, 8)


def contacts(label: np.ndarray, a: int, b: int) -> int:
    """Voxels of ``b`` face-adjacent to ``a``."""
    return int((ndimage.binary_dilation(label == a, FACE) & (label == b)).sum())


def centroid_si(case: S.SyntheticCase, value: int) -> float:
    """Physical superior-inferior coordinate (LPS z) of a structure's centroid."""
    z, y, x = np.nonzero(case.label == value)
    index = np.array([x.mean(), y.mean(), z.mean()])
    g = case.geometry
    matrix = np.asarray(g.direction).reshape(3, 3) * np.asarray(g.spacing)[None, :]
    return float((np.asarray(g.origin) + matrix @ index)[2])


@pytest.fixture(scope="module")
def cases() -> dict[tuple[str, int], S.SyntheticCase]:
    return {(m, seed): S.make_case(seed, 0, m, "small", keep_classes=True) for m in ("ct", "mr") for seed in (0, 1, 2)}


def test_same_seed_same_bytes_different_seed_differs():
    a = S.make_case(11, 2, "ct", "small")
    b = S.make_case(11, 2, "ct", "small")
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert a.geometry == b.geometry
    for other in (S.make_case(12, 2, "ct", "small"), S.make_case(11, 3, "ct", "small")):
        assert other.image.shape != a.image.shape or not np.array_equal(other.image, a.image)
    m1, m2 = S.make_case(5, 0, "mr", "small"), S.make_case(5, 0, "mr", "small")
    assert m1.image.tobytes() == m2.image.tobytes() and m1.label.tobytes() == m2.label.tobytes()


@pytest.mark.parametrize("modality", ["ct", "mr"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_anatomy(cases, modality, seed):
    case = cases[(modality, seed)]
    label = case.label
    assert label.dtype == np.uint8 and set(np.unique(label)) == set(range(8))
    counts = np.bincount(label.ravel(), minlength=8)
    assert counts[1:].min() >= 300, counts
    # every structure is one piece
    for value in range(1, 8):
        assert ndimage.label(label == value)[1] == 1, value
    # LV blood pool wrapped by myocardium: >= 90% of its outer boundary touches Myo
    lv = label == LV
    shell = ndimage.binary_dilation(lv, FACE) & ~lv
    assert (label[shell] == MYO).mean() >= 0.9
    # ... and the myocardium is at least ~2 voxels thick in-plane: the second ring is still mostly Myo
    ring1 = ndimage.binary_dilation(lv, IN_PLANE)
    ring2 = ndimage.binary_dilation(ring1, IN_PLANE) & ~ring1
    assert (label[ring2] == MYO).mean() >= 0.85
    # RV against the septum, great vessels on their ventricles, atria joined to the LV/RV side
    assert contacts(label, RV, MYO) >= 50
    assert contacts(label, LV, AA) > 0 and contacts(label, RV, PA) > 0
    assert contacts(label, LV, LA) > 0
    # atria superior to the ventricles
    ventricles = max(centroid_si(case, LV), centroid_si(case, RV))
    assert min(centroid_si(case, LA), centroid_si(case, RA)) > ventricles
    # great vessels rise above the atria
    assert min(centroid_si(case, AA), centroid_si(case, PA)) > centroid_si(case, LV)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ct_intensities_in_hu(cases, seed):
    case = cases[("ct", seed)]
    img, cls = case.image.astype(float), case.classes
    assert case.image.dtype == np.int16
    med = {c: float(np.median(img[cls == c])) for c in np.unique(cls)}
    assert 250 <= med[A.LV] <= 450 and 250 <= med[A.AA] <= 450
    assert 50 <= med[A.MYO] <= 180
    assert med[A.LUNG] < -600 and -160 <= med[A.FAT] <= -40
    assert med[A.BONE] > 500
    assert med[A.AIR] < -900
    assert img.min() >= -1024


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mr_bright_blood_dark_myocardium(cases, seed):
    case = cases[("mr", seed)]
    img, cls = case.image.astype(float), case.classes
    assert img.min() >= 0
    lv, myo = np.median(img[cls == A.LV]), np.median(img[cls == A.MYO])
    assert lv > 2.5 * myo
    assert np.median(img[cls == A.LUNG]) < 0.2 * lv
    assert np.median(img[cls == A.FAT]) > 1.5 * myo


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_small_geometry(modality):
    for seed in range(6):
        rng = S.case_rng(seed, 0)
        grid = S.sample_layout(rng, modality, "small").grid
        g = grid.geometry()
        assert g.direction in S.DIRECTIONS
        assert choose_slice_axis(g.spacing, g.direction) == 2      # the z index axis is the slice axis
        assert 64 <= g.size[0] == g.size[1] <= 96
        if modality == "ct":
            assert 1.5 <= g.spacing[0] <= 2.5 and g.spacing[0] <= g.spacing[2] <= 2.5 and 32 <= g.size[2] <= 64
        else:
            assert 1.25 <= g.spacing[0] <= 1.6 and 3.0 <= g.spacing[2] <= 5.0


def test_full_layout_is_mmwhs_scale():
    g = S.sample_layout(S.case_rng(0, 0), "ct", "full").grid.geometry()
    assert g.size[:2] == (512, 512) and 170 <= g.size[2] <= 260
    assert 0.4 <= g.spacing[0] <= 0.5 and 0.6 <= g.spacing[2] <= 0.7


def test_make_synthetic_command(hc_roots, capsys):
    args = ["-d", "7", "-n", "2", "--n-test", "1", "--seed", "4", "--modality", "mr"]
    assert make_synthetic.main(args) == 0
    folder = hc_roots["raw"] / "Dataset007_SyntheticMR"
    info = load_dataset(folder)
    assert info.labels == MMWHS_LABELS and info.num_training == 2 and info.channel_names == {"0": "MR"}
    assert [c.case_id for c in info.training_cases()] == ["case_000", "case_001"]
    assert [c.case_id for c in info.test_cases()] == ["case_002"]
    assert (folder / "labelsTs" / "case_002.nii.gz").is_file()
    expected = S.make_case(4, 1, "mr", "small")
    image = read_image(folder / "imagesTr" / "case_001_0000.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(image), expected.image)
    assert Geometry.of(image) == expected.geometry
    label = read_image(folder / "labelsTr" / "case_001.nii.gz")
    assert np.array_equal(label_array(label), expected.label)
    # refuses to overwrite; --overwrite replaces; no hidden temporary folders are left behind
    capsys.readouterr()
    assert make_synthetic.main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dataset 7 already exists") and "\n" not in err
    assert make_synthetic.main(args + ["--overwrite"]) == 0
    assert load_dataset(folder).num_training == 2
    assert [p.name for p in hc_roots["raw"].iterdir()] == ["Dataset007_SyntheticMR"]
    # replacing under another name leaves one folder for the id
    assert make_synthetic.main(["-d", "7", "-n", "1", "--overwrite"]) == 0
    assert [p.name for p in hc_roots["raw"].iterdir()] == ["Dataset007_SyntheticCT"]


def _crop_label_map(source: Path, dest: Path, stride: int = 3) -> None:
    """A smaller copy of a real MM-WHS map (heart region, every ``stride``-th voxel), geometry kept right."""
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayViewFromImage(image)
    z, y, x = (np.nonzero(array.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
    cropped = image[int(x.min()) - 20:int(x.max()) + 20:stride, int(y.min()) - 20:int(y.max()) + 20:stride,
                    int(z.min()):int(z.max()) + 1:stride]
    sitk.WriteImage(cropped, str(dest), True)


def test_from_labels(shared_data, hc_roots, tmp_path):
    maps = tmp_path / "maps"
    maps.mkdir()
    source = shared_data / "mmwhs_ct_labels" / "ct_train_1005_label.nii.gz"
    _crop_label_map(source, maps / source.name)
    assert make_synthetic.main(["-d", "8", "-n", "5", "--from-labels", str(maps), "--seed", "2"]) == 0
    folder = hc_roots["raw"] / "Dataset008_SyntheticLabelsCT"
    data = json.loads((folder / "dataset.json").read_text())
    assert {int(k): v for k, v in data["label_codes"].items()} == MMWHS_CODES
    assert data["labels"] == MMWHS_LABELS and data["numTraining"] == 1
    written = read_image(folder / "labelsTr" / "ct_train_1005.nii.gz")
    original = sitk.ReadImage(str(maps / source.name))
    assert Geometry.of(written) == Geometry.of(original)
    codes = sitk.GetArrayFromImage(original)
    assert np.array_equal(label_array(written), S.remap_mmwhs(codes, "map"))
    image = sitk.GetArrayFromImage(read_image(folder / "imagesTr" / "ct_train_1005_0000.nii.gz")).astype(float)
    lab = label_array(written)
    assert 250 <= np.median(image[lab == LV]) <= 450 and np.median(image[lab == MYO]) < 200
    assert (image < -600).mean() > 0.05            # lungs/air around the heart
    # a map with a value that is not an MM-WHS code is refused
    bad = sitk.GetArrayFromImage(original)
    bad[0, 0, 0] = 333
    broken = sitk.GetImageFromArray(bad)
    broken.CopyInformation(original)
    sitk.WriteImage(broken, str(maps / "zz_label.nii.gz"))
    assert make_synthetic.main(["-d", "9", "-n", "2", "--from-labels", str(maps)]) == 1
