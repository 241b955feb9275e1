"""Geometry must survive read → canonical → write exactly, whatever the orientation."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade import paths
from heartcascade.dataset import image_io
from heartcascade.dataset.image_io import Geometry
from heartcascade.utils.errors import HCError


def _image(size=(7, 6, 5), spacing=(0.7, 0.8, 2.5), direction=None, origin=(10.5, -3.25, 100.0), dtype=np.float32):
    arr = np.arange(np.prod(size[::-1]), dtype=dtype).reshape(size[::-1])
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    return img


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ ry @ rx).ravel())


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_write_reproduces_oblique_geometry(tmp_path, ending):
    img = _image(direction=_rotation(0.3, -0.5, 1.1))
    src = tmp_path / f"src{ending}"
    sitk.WriteImage(img, str(src))
    read = image_io.read_image(src)
    arr = image_io.image_array(read, src)
    out = tmp_path / f"out{ending}"
    image_io.write_array(arr.astype(np.int16), Geometry.of(read), out, reference=src)
    back = image_io.read_image(out)
    if ending == ".nrrd":  # NRRD stores spacing*direction; ITK renormalises, so allow one ulp
        assert Geometry.of(back).mismatch(Geometry.of(read), tol=1e-12) is None
    else:
        assert Geometry.of(back) == Geometry.of(read)
    assert np.array_equal(sitk.GetArrayFromImage(back), arr.astype(np.int16))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary file left behind"


def test_mscmrseg_round_trip_both_orientations(shared_data, tmp_path):
    folder = shared_data / "mscmrseg2019_bssfp"
    directions = {}
    for path in sorted(folder.glob("image_*.nii.gz")):
        img = sitk.ReadImage(str(path))
        directions.setdefault(tuple(np.sign(np.round(img.GetDirection(), 3))), path)
    assert len(directions) >= 2, "expected cases of at least two orientations"
    for path in list(directions.values())[:3]:
        img = image_io.read_image(path)
        label_path = folder / path.name.replace("image_", "label_")
        labels = image_io.label_array(image_io.read_image(label_path), label_path)
        assert set(np.unique(labels)) <= {0, 200, 500, 600}
        assert image_io.choose_slice_axis(img.GetSpacing(), img.GetDirection()) == 2
        canon = image_io.to_canonical(labels, 2)
        out = tmp_path / f"pred_{path.name}"
        image_io.write_array(image_io.from_canonical(canon, 2).astype(np.int16), Geometry.of(img), out, reference=path)
        back = sitk.ReadImage(str(out))
        assert Geometry.of(back) == Geometry.of(img)
        assert np.array_equal(sitk.GetArrayFromImage(back), labels)


def test_dicom_series_round_trip(tmp_path):
    img = _image(size=(8, 9, 4), spacing=(0.75, 0.75, 2.0), origin=(-50.0, 20.0, 7.0), dtype=np.int16)
    folder = tmp_path / "series"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1"
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        pos = img.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in (("0020|000e", uid + ".2"), ("0020|000d", uid + ".3"), ("0008|0060", "CT"),
                           ("0020|0032", "\\".join(f"{p:.6f}" for p in pos)), ("0020|0013", str(k)),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.75\\0.75"), ("0018|0050", "2.0")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    read = image_io.read_image(folder)
    assert read.GetSize() == img.GetSize()
    assert np.allclose(read.GetSpacing(), img.GetSpacing())
    assert np.allclose(read.GetOrigin(), img.GetOrigin())
    assert np.array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(img))
    out = tmp_path / "pred.nii.gz"
    image_io.write_array(np.zeros(sitk.GetArrayFromImage(read).shape, np.uint8), Geometry.of(read), out)
    assert Geometry.of(sitk.ReadImage(str(out))).mismatch(Geometry.of(read), tol=1e-6) is None


def test_slice_axis_choice():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    # anisotropic: the thick axis wins whatever the direction
    assert image_io.choose_slice_axis((1.25, 1.25, 8.0), identity) == 2
    assert image_io.choose_slice_axis((5.0, 1.0, 1.0), identity) == 0
    # near-isotropic CT: the index axis closest to superior-inferior
    assert image_io.choose_slice_axis((0.49, 0.49, 0.625), (1, 0, 0, 0, -1, 0, 0, 0, 1)) == 2
    # a volume stored with its S-I direction along index axis y (coronal stack)
    coronal = (1, 0, 0, 0, 0, 1, 0, -1, 0)
    assert image_io.choose_slice_axis((0.8, 0.8, 0.8), coronal) == 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_canonical_round_trip(axis):
    arr = np.random.default_rng(0).random((2, 5, 6, 7))
    canon = image_io.to_canonical(arr, axis)
    assert canon.shape[1] == (7, 6, 5)[axis]
    assert np.array_equal(image_io.from_canonical(canon, axis), arr)
    assert image_io.canonical_spacing((1.0, 2.0, 3.0), axis)[0] == (1.0, 2.0, 3.0)[axis]
    assert image_io.canonical_shape((7, 6, 5), axis) == canon.shape[1:]


def test_float_labels_integral_accepted_non_integral_rejected(tmp_path):
    good = sitk.GetImageFromArray(np.array([[[0.0, 200.0], [500.0, 600.0]]]))
    assert image_io.label_array(good).dtype == np.int32
    bad = sitk.GetImageFromArray(np.array([[[0.0, 1.5], [2.0, 3.0]]]))
    with pytest.raises(HCError, match="non-integral"):
        image_io.label_array(bad, "lab.nii.gz")


def test_bad_inputs_give_one_line_errors(tmp_path):
    garbage = tmp_path / "broken.nii.gz"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(HCError) as err:
        image_io.read_image(garbage)
    assert "broken.nii.gz" in str(err.value) and "\n" not in str(err.value)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.float32)), str(flat))
    with pytest.raises(HCError, match="expected a 3D image"):
        image_io.read_image(flat)
    nan = np.zeros((3, 4, 4), np.float32)
    nan[1, 1, 1] = np.nan
    with pytest.raises(HCError, match="NaN"):
        image_io.image_array(sitk.GetImageFromArray(nan), "nan.nii.gz")
    with pytest.raises(HCError, match="no such file"):
        image_io.read_image(tmp_path / "missing.nii.gz")


def test_dataset_paths(hc_roots, tmp_path):
    (hc_roots["raw"] / "Dataset007_Hearts").mkdir()
    assert paths.parse_dataset_id("Dataset007_Hearts") == 7
    assert paths.raw_dataset_dir(7).name == "Dataset007_Hearts"
    assert paths.preprocessed_dataset_dir(7) == hc_roots["preprocessed"] / "Dataset007_Hearts"
    with pytest.raises(HCError, match="no raw dataset with id 8"):
        paths.raw_dataset_dir(8)
    with pytest.raises(HCError):
        paths.parse_dataset_id("seven")


# ---------------------------------------------------------------------------------------------------
# damaged files, spacing, full disk and output folders (the end-to-end cases are in test_bad_inputs.py)


def _nifti(tmp_path, array, name="x.nii.gz", spacing=(1.0, 1.0, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path = tmp_path / name
    sitk.WriteImage(image, str(path), name.endswith(".gz"))
    return path


def test_raw_nifti_scan_finds_what_simpleitk_hides(tmp_path):
    import gzip
    import struct

    array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    good = _nifti(tmp_path, array)
    image_io.read_image(good)
    data = good.read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "h.nii.gz").write_bytes(gzip.compress(gzip.decompress(data)[:-4]))  # valid stream, short payload
    array[1, 2, 3] = np.nan
    _nifti(tmp_path, array, "n.nii")
    raw = bytearray(gzip.decompress(data))
    raw[80:84] = struct.pack("<f", 0.0)
    (tmp_path / "p.nii").write_bytes(bytes(raw))
    expected = {"t.nii.gz": "damaged or truncated", "h.nii.gz": "declares 480 bytes of voxel data, 476 are present",
                "n.nii": "1 NaN/Inf voxels", "p.nii": "pixdim (0, 1, 2)"}
    for name, words in expected.items():
        with pytest.raises(HCError, match=r"^" + str(tmp_path / name).replace(".", r"\.") + ": ") as info:
            image_io.read_image(tmp_path / name)
        assert words in str(info.value)
    # other formats: SimpleITK's own errors and non-finite voxels, one line each
    image_io.write_image(sitk.GetImageFromArray(array), tmp_path / "n.mha")
    with pytest.raises(HCError, match="n.mha: image contains 1 NaN/Inf"):
        image_io.read_image(tmp_path / "n.mha")
    with pytest.raises(HCError, match="invalid voxel spacing"):
        image_io.check_spacing((1.0, float("inf"), 1.0), "x")


def test_disk_full_and_output_folder_messages(tmp_path, monkeypatch):
    from heartcascade.utils import atomic

    target = tmp_path / "out" / "a.npy"
    with pytest.raises(HCError, match=f"^no space left on device: {target}$"):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError("288684 requested and 18400 written")  # numpy's short-write message, no errno
    assert list(target.parent.iterdir()) == []  # no temporary file, nothing under the final name
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(HCError, match="exists and is not a folder"):
        atomic.ensure_writable_dir(a_file)
    with pytest.raises(HCError, match="a part of the path is a file"):
        atomic.ensure_writable_dir(a_file / "sub")
    monkeypatch.setattr(atomic.tempfile, "mkstemp", lambda **kw: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    with pytest.raises(HCError, match="is not writable"):
        atomic.ensure_writable_dir(tmp_path / "ro")
    (tmp_path / ".x.nii.gz.abc.tmp.nii.gz").write_bytes(b"")
    assert atomic.remove_temp_files_of(tmp_path / "x.nii.gz") == 1
