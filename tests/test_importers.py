"""MM-WHS conversion and generic paired-folder import (exact geometry, label codes, refusals)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade.cli import convert_mmwhs, import_dataset
from heartcascade.dataset import synthetic as S
from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS, load_dataset
from heartcascade.dataset.image_io import Geometry, label_array, read_image
from heartcascade.dataset.importers import glob_regex, parse_codes, plan_labels, remap_labels
from heartcascade.utils.errors import HCError

CODES = {205: 2, 420: 4, 500: 1, 550: 5, 600: 3, 820: 6, 850: 7}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------

def write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def crop_label_map(source: Path, stride: int = 3) -> sitk.Image:
    """Heart region of a real MM-WHS map at every ``stride``-th voxel (SimpleITK keeps the geometry right)."""
    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayViewFromImage(image)
    z, y, x = (np.nonzero(array.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
    return image[int(x.min()) - 10:int(x.max()) + 10:stride, int(y.min()) - 10:int(y.max()) + 10:stride,
                 int(z.min()):int(z.max()) + 1:stride]


def mmwhs_case(label: sitk.Image, folder: Path, stem: str, seed: int, with_label: bool = True) -> None:
    """Write ``{stem}_label.nii.gz`` (codes as given) and a CT image synthesised around it."""
    codes = sitk.GetArrayFromImage(label)
    case = S.make_case_from_label_array(S.remap_mmwhs(codes, stem, unknown_to_background=True),
                                        Geometry.of(label), seed)
    image = sitk.GetImageFromArray(case.image)
    image.CopyInformation(label)
    sitk.WriteImage(image, str(folder / f"{stem}_image.nii.gz"), True)
    if with_label:
        sitk.WriteImage(label, str(folder / f"{stem}_label.nii.gz"), True)


def error_line(err: str) -> str:
    """The command's final stderr line (progress bars and warnings come before it); never a traceback."""
    assert "Traceback" not in err
    return err.strip().splitlines()[-1].split("\r")[-1]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# codes and patterns
# ---------------------------------------------------------------------------------------------------

def test_codes_follow_mmwhs_order():
    codes = parse_codes("200:Myo,500:LV,600:RV")
    labels, code_to_label, label_codes = plan_labels(codes)
    assert labels == {"background": 0, "LV": 1, "Myo": 2, "RV": 3}
    assert code_to_label == {200: 2, 500: 1, 600: 3}
    assert label_codes == {1: 500, 2: 200, 3: 600}
    labels, _, label_codes = plan_labels(parse_codes("7:scar,1:lv,2:Myo,8:edema"))
    assert labels == {"background": 0, "LV": 1, "Myo": 2, "scar": 3, "edema": 4}
    for bad in ("500", "x:LV", "0:LV", "500:LV,500:RV", "500:", "500:background"):
        with pytest.raises(HCError):
            parse_codes(bad)


def test_remap_labels():
    array = np.array([0, 500, 205, 421, 850], dtype=np.int16)
    messages = []
    out = remap_labels(array, CODES, "f.nii.gz", stray={421: 4}, warn_fn=messages.append)
    assert out.tolist() == [0, 1, 2, 4, 7] and out.dtype == np.uint8
    assert len(messages) == 1 and "421" in messages[0] and "LA" in messages[0]
    with pytest.raises(HCError, match=r"f.nii.gz: unknown label values 999"):
        remap_labels(np.array([0, 999, 500]), CODES, "f.nii.gz")
    assert remap_labels(np.array([0, 999, 500]), CODES, "f", unknown_to_background=True,
                        warn_fn=messages.append).tolist() == [0, 0, 1]


def test_glob_regex_captures_wildcards():
    assert glob_regex("image_*.nii.gz").match("image_12.nii.gz").groups() == ("12",)
    assert glob_regex("*/img_?.nii").match("p1/img_3.nii").groups() == ("p1", "3")
    assert glob_regex("image_[169].nii.gz").match("image_6.nii.gz").groups() == ("6",)
    assert glob_regex("image_*.nii.gz").match("image_1.nii") is None


# ---------------------------------------------------------------------------------------------------
# generic import
# ---------------------------------------------------------------------------------------------------

def test_import_pairs_float_labels_and_refusals(hc_roots, tmp_path, capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for key in ("a", "b", "c"):
        write(rng.normal(100, 10, (6, 8, 8)).astype(np.float32), src / "img" / f"scan_{key}.nii.gz")
    for key in ("a", "b"):  # float64 labels with integral values are accepted
        write(rng.choice([0.0, 200.0, 500.0], (6, 8, 8)), src / "seg" / f"scan_{key}_gt.nii.gz")
    before = snapshot(src)
    args = ["-i", str(src), "-d", "3", "--images", "img/scan_*.nii.gz", "--labels", "seg/scan_*_gt.nii.gz",
            "--codes", "500:LV,200:Myo", "--name", "Toy"]
    assert import_dataset.main(args) == 0
    err = capsys.readouterr().err
    assert "imagesTs" in err and "guessed as MR" in err
    folder = hc_roots["raw"] / "Dataset003_Toy"
    info = load_dataset(folder)
    assert info.labels == {"background": 0, "LV": 1, "Myo": 2} and info.label_codes == {1: 500, 2: 200}
    assert info.channel_names == {"0": "MR"} and info.num_training == 2
    assert [c.case_id for c in info.training_cases()] == ["Toy_a", "Toy_b"]
    assert [c.case_id for c in info.test_cases()] == ["Toy_c"]
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(src / "seg" / "scan_b_gt.nii.gz")))
    written = label_array(read_image(folder / "labelsTr" / "Toy_b.nii.gz"))
    assert np.array_equal(written, np.select([source == 500, source == 200], [1, 2], 0))
    assert snapshot(src) == before                    # inputs untouched

    capsys.readouterr()
    assert import_dataset.main(args) == 1            # id taken
    assert "already exists" in capsys.readouterr().err
    # non-integral label values: one-line error naming the file; nothing written
    write(np.full((6, 8, 8), 0.5), src / "seg" / "scan_c_gt.nii.gz")
    assert import_dataset.main(args[:3] + ["4"] + args[4:]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "scan_c_gt.nii.gz" in err and "non-integral" in err
    assert not any(p.name.startswith("Dataset004") for p in hc_roots["raw"].iterdir())
    assert not any(p.name.startswith(".") for p in hc_roots["raw"].iterdir())   # temp folder removed
    # unknown code → error, unless mapped to background
    write(np.full((6, 8, 8), 300.0), src / "seg" / "scan_c_gt.nii.gz")
    assert import_dataset.main(args[:3] + ["4"] + args[4:]) == 1
    assert "300" in capsys.readouterr().err
    assert import_dataset.main(args[:3] + ["4"] + args[4:] + ["--unknown-to-background"]) == 0
    # a label without an image is an error
    write(np.zeros((6, 8, 8), np.uint8), src / "seg" / "scan_z_gt.nii.gz")
    assert import_dataset.main(args[:3] + ["5"] + args[4:]) == 1
    assert "scan_z_gt.nii.gz" in capsys.readouterr().err


def test_import_refuses_to_replace_its_own_input(hc_roots, tmp_path, capsys):
    folder = hc_roots["raw"] / "Dataset006_Old"
    write(np.zeros((4, 4, 4), np.float32), folder / "image_1.nii.gz")
    write(np.zeros((4, 4, 4), np.uint8), folder / "label_1.nii.gz")
    args = ["-i", str(folder), "-d", "6", "--images", "image_*.nii.gz", "--labels", "label_*.nii.gz",
            "--codes", "1:LV", "--modality", "mr", "--overwrite"]
    assert import_dataset.main(args) == 1
    assert "--overwrite would replace" in capsys.readouterr().err
    assert (folder / "image_1.nii.gz").is_file()


def test_import_mscmrseg_keeps_geometry_exactly(shared_data, hc_roots):
    src = shared_data / "mscmrseg2019_bssfp"
    # cases 1, 6 and 9 have differently signed direction matrices
    directions = {n: np.sign(np.round(read_image(src / f"image_{n}.nii.gz").GetDirection(), 6)) for n in (1, 6, 9)}
    assert len({tuple(d) for d in directions.values()}) == 3
    before = snapshot(src)
    rc = import_dataset.main(["-i", str(src), "-d", "2", "--images", "image_[169].nii.gz", "--labels",
                              "label_[169].nii.gz", "--codes", "200:Myo,500:LV,600:RV", "--modality", "mr",
                              "--name", "MSCMRSeg"])
    assert rc == 0
    folder = hc_roots["raw"] / "Dataset002_MSCMRSeg"
    data = json.loads((folder / "dataset.json").read_text())
    assert data["labels"] == {"background": 0, "LV": 1, "Myo": 2, "RV": 3}
    assert data["label_codes"] == {"1": 500, "2": 200, "3": 600} and data["numTraining"] == 3
    for n in (1, 6, 9):
        src_image, src_label = read_image(src / f"image_{n}.nii.gz"), read_image(src / f"label_{n}.nii.gz")
        image = read_image(folder / "imagesTr" / f"MSCMRSeg_00{n}_0000.nii.gz")
        label = read_image(folder / "labelsTr" / f"MSCMRSeg_00{n}.nii.gz")
        assert Geometry.of(image) == Geometry.of(src_image)          # exact, not within a tolerance
        assert Geometry.of(label) == Geometry.of(src_label)
        assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(src_image))
        codes = sitk.GetArrayFromImage(src_label)
        assert np.array_equal(label_array(label), np.select([codes == 500, codes == 200, codes == 600], [1, 2, 3], 0))
    assert snapshot(src) == before


# ---------------------------------------------------------------------------------------------------
# MM-WHS
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def cropped_maps(shared_data) -> dict[str, sitk.Image]:
    return {n: crop_label_map(shared_data / "mmwhs_ct_labels" / f"ct_train_{n}_label.nii.gz") for n in ("1002", "1012")}


def test_convert_mmwhs(cropped_maps, hc_roots, tmp_path, capsys):
    release = tmp_path / "MM-WHS"
    (release / "ct_train").mkdir(parents=True)
    (release / "ct_test").mkdir()
    stray = cropped_maps["1012"]
    codes = sitk.GetArrayFromImage(stray)
    la = np.argwhere(codes == 420)[:5]
    codes[tuple(la.T)] = 421                                  # the known MM-WHS slip
    stray_map = sitk.GetImageFromArray(codes)
    stray_map.CopyInformation(stray)
    mmwhs_case(cropped_maps["1002"], release / "ct_train", "ct_train_1001", seed=1)
    mmwhs_case(stray_map, release / "ct_train", "ct_train_1002", seed=2)
    mmwhs_case(cropped_maps["1002"], release / "ct_test", "ct_test_2001", seed=3, with_label=False)
    before = snapshot(release)

    assert convert_mmwhs.main(["-i", str(release), "-d", "10"]) == 0
    err = capsys.readouterr().err
    assert "ct_train_1002_label.nii.gz: 5 voxels with value 421 mapped to LA" in err
    folder = hc_roots["raw"] / "Dataset010_MMWHSCT"
    info = load_dataset(folder)
    assert info.labels == MMWHS_LABELS and info.label_codes == MMWHS_CODES and info.modality == "ct"
    assert [c.case_id for c in info.training_cases()] == ["ct_1001", "ct_1002"]
    assert [(c.case_id, c.label) for c in info.test_cases()] == [("ct_2001", None)]
    written = label_array(read_image(folder / "labelsTr" / "ct_1002.nii.gz"))
    expected = np.zeros_like(written)
    for code, label in CODES.items():
        expected[codes == code] = label
    expected[codes == 421] = 4
    assert np.array_equal(written, expected) and written.max() == 7
    source_image = release / "ct_train" / "ct_train_1002_image.nii.gz"
    assert (folder / "imagesTr" / "ct_1002_0000.nii.gz").read_bytes() == source_image.read_bytes()
    source_label = read_image(release / "ct_train" / "ct_train_1002_label.nii.gz")
    assert Geometry.of(read_image(folder / "labelsTr" / "ct_1002.nii.gz")) == Geometry.of(source_label)
    assert snapshot(release) == before

    # an unknown value is a one-line error naming the file and the value; nothing is written
    codes[0, 0, :3] = 999
    broken = sitk.GetImageFromArray(codes)
    broken.CopyInformation(stray)
    sitk.WriteImage(broken, str(release / "ct_train" / "ct_train_1002_label.nii.gz"), True)
    capsys.readouterr()
    assert convert_mmwhs.main(["-i", str(release), "-d", "11"]) == 1
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: ") and "ct_train_1002_label.nii.gz" in err and "999 (3 voxels)" in err
    assert not (hc_roots["raw"] / "Dataset011_MMWHSCT").exists()
    assert convert_mmwhs.main(["-i", str(release), "-d", "11", "--unknown-to-background"]) == 0
    fixed = label_array(read_image(hc_roots["raw"] / "Dataset011_MMWHSCT" / "labelsTr" / "ct_1002.nii.gz"))
    assert fixed[0, 0, :3].tolist() == [0, 0, 0]
    # refusals: existing id, missing modality, no MM-WHS files
    assert convert_mmwhs.main(["-i", str(release), "-d", "11"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert convert_mmwhs.main(["-i", str(release), "-d", "12", "--modality", "mr"]) == 1
    assert "no MR files" in capsys.readouterr().err
    assert convert_mmwhs.main(["-i", str(tmp_path / "nothing"), "-d", "12"]) == 1
    os.remove(release / "ct_train" / "ct_train_1001_label.nii.gz")
    assert convert_mmwhs.main(["-i", str(release), "-d", "12", "--overwrite"]) == 1
    assert "ct_train_1001_image.nii.gz: training image without its label" in capsys.readouterr().err


def test_import_uncompressed_nifti_and_nan_image(hc_roots, tmp_path, capsys):
    import gzip

    src = tmp_path / "raw_nii"
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing((0.7, 0.8, 3.3))
    image.SetOrigin((1.25, -2.5, 30.0))
    image.SetDirection(direction)
    src.mkdir()
    sitk.WriteImage(image, str(src / "p1_img.nii"))
    label = sitk.GetImageFromArray(np.ones((4, 5, 6), np.uint8) * 3)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(src / "p1_seg.nii"))
    args = ["-i", str(src), "-d", "30", "--images", "*_img.nii", "--labels", "*_seg.nii", "--codes", "3:RV",
            "--modality", "ct"]
    assert import_dataset.main(args) == 0
    out = hc_roots["raw"] / "Dataset030_raw_nii" / "imagesTr" / "raw_nii_p1_0000.nii.gz"
    assert gzip.decompress(out.read_bytes()) == (src / "p1_img.nii").read_bytes()
    assert Geometry.of(read_image(out)) == Geometry.of(read_image(src / "p1_img.nii"))
    written = read_image(hc_roots["raw"] / "Dataset030_raw_nii" / "labelsTr" / "raw_nii_p1.nii.gz")
    assert label_array(written).max() == 1 and Geometry.of(written) == Geometry.of(read_image(src / "p1_seg.nii"))
    # NaN voxels (which SimpleITK's NIfTI reader would silently turn into 0) are refused
    nan = sitk.GetImageFromArray(np.where(np.arange(120).reshape(4, 5, 6) == 7, np.nan, 1.0).astype(np.float32))
    sitk.WriteImage(nan, str(src / "p2_img.nii"))
    sitk.WriteImage(label, str(src / "p2_seg.nii"))
    capsys.readouterr()
    assert import_dataset.main(args + ["--overwrite"]) == 1
    err = error_line(capsys.readouterr().err)
    assert "p2_img.nii: image contains 1 NaN/Inf voxels" in err
