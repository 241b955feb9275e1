"""hc_verify_dataset: passes good datasets, reports every kind of bad input as one line naming the file."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade.cli import make_synthetic, verify_dataset
from heartcascade.dataset.dataset_json import MMWHS_LABELS
from heartcascade.dataset.image_io import Geometry
from heartcascade.dataset.verify import verify_dataset as verify
from heartcascade.dataset.writer import DatasetWriter

GEOMETRY = Geometry((16, 12, 6), (1.5, 1.5, 3.0), (-10.0, 20.0, -100.0), (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))


def make_toy(dataset_id: int = 1, cases: int = 3) -> Path:
    """A tiny valid CT dataset (6x12x16 voxels) built through the shared writer."""
    rng = np.random.default_rng(dataset_id)
    with DatasetWriter(dataset_id, "Toy") as out:
        for i in range(cases):
            image = rng.normal(0, 100, (6, 12, 16)).astype(np.int16)
            label = rng.integers(0, 8, (6, 12, 16)).astype(np.uint8)
            out.write_case(f"toy_{i:03d}", [image], label, GEOMETRY)
        out.write_case("toy_900", [image], label, GEOMETRY, test=True)
        return out.commit({"0": "CT"}, MMWHS_LABELS)


def write_like(array: np.ndarray, path: Path, spacing=None, origin=None) -> None:
    image = sitk.GetImageFromArray(array)
    GEOMETRY.apply_to(image) if array.ndim == 3 else None
    if spacing is not None:
        image.SetSpacing(spacing)
    if origin is not None:
        image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), True)


def run(dataset_id: int, capsys) -> tuple[int, list[str], str]:
    code = verify_dataset.main(["-d", str(dataset_id), "--no-progress"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out.strip().splitlines(), err


def test_good_datasets_pass(hc_roots, capsys):
    make_toy(1)
    code, lines, _ = run(1, capsys)
    assert code == 0 and lines == [f"{hc_roots['raw'] / 'Dataset001_Toy'}: OK (3 training + 1 test cases)"]
    assert make_synthetic.main(["-d", "2", "-n", "2", "--n-test", "1", "--modality", "mr"]) == 0
    capsys.readouterr()
    code, lines, _ = run(2, capsys)
    assert code == 0 and lines[-1].endswith("OK (2 training + 1 test cases)")


# each breakage: (what to do to a fresh toy dataset, file named in the problem, words in the problem)
def _label_9(folder: Path) -> None:
    label = np.zeros((6, 12, 16), np.uint8)
    label[2, 3, 4] = 9
    write_like(label, folder / "labelsTr" / "toy_001.nii.gz")


def _nan_image(folder: Path) -> None:
    image = np.zeros((6, 12, 16), np.float32)
    image[1, 1, 1] = np.nan
    write_like(image, folder / "imagesTr" / "toy_001_0000.nii.gz")


def _image_2d(folder: Path) -> None:
    write_like(np.zeros((12, 16), np.float32), folder / "imagesTr" / "toy_001_0000.nii.gz")


def _spacing(folder: Path) -> None:
    write_like(np.zeros((6, 12, 16), np.uint8), folder / "labelsTr" / "toy_001.nii.gz", spacing=(1.5, 1.5, 2.0))


def _origin(folder: Path) -> None:
    write_like(np.zeros((6, 12, 16), np.uint8), folder / "labelsTr" / "toy_001.nii.gz", origin=(-10.0, 25.0, -100.0))


def _missing_label(folder: Path) -> None:
    (folder / "labelsTr" / "toy_001.nii.gz").unlink()


def _extra_channel(folder: Path) -> None:
    shutil.copy(folder / "imagesTr" / "toy_001_0000.nii.gz", folder / "imagesTr" / "toy_001_0001.nii.gz")


def _two_channels_declared(folder: Path) -> None:
    data = json.loads((folder / "dataset.json").read_text())
    data["channel_names"] = {"0": "CT", "1": "CT2"}
    (folder / "dataset.json").write_text(json.dumps(data))
    for p in (folder / "imagesTr").glob("*_0000.nii.gz"):
        if p.name != "toy_001_0000.nii.gz":
            shutil.copy(p, p.with_name(p.name.replace("_0000", "_0001")))
    shutil.copy(folder / "imagesTs" / "toy_900_0000.nii.gz", folder / "imagesTs" / "toy_900_0001.nii.gz")


def _garbage(folder: Path) -> None:
    (folder / "imagesTr" / "toy_001_0000.nii.gz").write_bytes(b"this is not an image" * 50)


def _orphan_label(folder: Path) -> None:
    shutil.copy(folder / "labelsTr" / "toy_001.nii.gz", folder / "labelsTr" / "toy_777.nii.gz")


BREAKAGES = {
    "label value 9": (_label_9, "labelsTr/toy_001.nii.gz", ["label values 9", "not declared"]),
    "NaN image": (_nan_image, "imagesTr/toy_001_0000.nii.gz", ["NaN"]),
    "2D image": (_image_2d, "imagesTr/toy_001_0000.nii.gz", ["3D", "2D"]),
    "spacing": (_spacing, "labelsTr/toy_001.nii.gz", ["spacing", "toy_001_0000.nii.gz"]),
    "origin": (_origin, "labelsTr/toy_001.nii.gz", ["origin"]),
    "missing label": (_missing_label, "labelsTr/toy_001.nii.gz", ["missing label"]),
    "extra channel": (_extra_channel, "imagesTr/toy_001_0001.nii.gz", ["channel 1", "1 channel"]),
    "missing channel": (_two_channels_declared, "imagesTr/toy_001_0001.nii.gz", ["missing channel", "2 channel"]),
    "garbage bytes": (_garbage, "imagesTr/toy_001_0000.nii.gz", ["cannot read"]),
    "orphan label": (_orphan_label, "labelsTr/toy_777.nii.gz", ["label without images"]),
}


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_each_problem_is_one_line_naming_the_file(kind, hc_roots, capsys):
    folder = make_toy(3)
    breakage, name, words = BREAKAGES[kind]
    breakage(folder)
    code, lines, _ = run(3, capsys)
    assert code == 1
    assert len(lines) == 2, lines                       # the problem, then the summary
    problem, summary = lines
    assert problem.startswith(str(folder / name) + ": "), problem
    for word in words:
        assert word in problem, (word, problem)
    assert summary.startswith(f"{folder}: 1 problem(s)")


def test_all_problems_reported_together(hc_roots, capsys):
    folder = make_toy(4, cases=4)
    _label_9(folder)
    _garbage(folder)
    (folder / "labelsTr" / "toy_002.nii.gz").unlink()
    _orphan_label(folder)
    report = verify(folder, progress=False)
    assert len(report.problems) == 4 and not report.ok
    named = [line.split(": ")[0] for line in report.problems]
    assert sorted(Path(n).name for n in named) == ["toy_001.nii.gz", "toy_001_0000.nii.gz", "toy_002.nii.gz",
                                                   "toy_777.nii.gz"]


def test_missing_dataset_and_bad_json(hc_roots, capsys):
    assert verify_dataset.main(["-d", "42"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no raw dataset with id 42") and "\n" not in err
    folder = make_toy(5)
    (folder / "dataset.json").write_text("{not json")
    code, lines, _ = run(5, capsys)
    assert code == 1 and "dataset.json: not valid JSON" in lines[0]
