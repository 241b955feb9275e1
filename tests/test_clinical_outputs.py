"""Clinical outputs without a network: measures arithmetic on hand-made volumes, ED/ES pairing, case lists,
segment names/colours/codes and the label-map writers read back (seg.nrrd, ITK-SNAP, DICOM-SEG)."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import SimpleITK as sitk

from heartcascade.cli import measure as measure_cli
from heartcascade.dataset.image_io import Geometry
from heartcascade.dataset.segformats import format_of, write_segmentation
from heartcascade.dataset.segformats.itksnap import itksnap_label_text
from heartcascade.dataset.segformats.seg_nrrd import read_seg_nrrd_segments
from heartcascade.dataset.segments import segments_from_labels, structure_key
from heartcascade.evaluation import measures as M
from heartcascade.evaluation.measure_folders import label_names, read_case_table, run_measures
from heartcascade.inference.cases import discover_cases, read_case_list
from heartcascade.utils.errors import HCError

NAMES = {200: "Myo", 500: "LV", 600: "RV"}
SPACING = (2.0, 1.5, 10.0)  # mm, so one voxel is 30 mm^3 = 0.03 mL


def heart(lv: int, myo: int, rv: int, shape=(10, 20, 30)) -> np.ndarray:
    """A label map with exactly ``lv`` / ``myo`` / ``rv`` voxels of 500 / 200 / 600."""
    flat = np.zeros(int(np.prod(shape)), dtype=np.int16)
    flat[:lv] = 500
    flat[lv:lv + myo] = 200
    flat[lv + myo:lv + myo + rv] = 600
    return flat.reshape(shape)


def test_volumes_mass_and_function_by_hand():
    ed = M.measure_case("p1_ED", heart(1000, 500, 800), SPACING, NAMES)
    es = M.measure_case("p1_ES", heart(400, 550, 500), SPACING, NAMES)
    assert ed.volumes_ml == pytest.approx({"Myo": 15.0, "LV": 30.0, "RV": 24.0})
    assert ed.lv_mass_g == pytest.approx(15.0 * 1.05)
    f = M.PhasePair("p1", ed, es).function()
    assert f["lv_edv_ml"] == pytest.approx(30.0) and f["lv_esv_ml"] == pytest.approx(12.0)
    assert f["lv_sv_ml"] == pytest.approx(18.0) and f["lv_ef_pct"] == pytest.approx(60.0)
    assert f["rv_sv_ml"] == pytest.approx(9.0) and f["rv_ef_pct"] == pytest.approx(37.5)
    assert f["lv_mass_ed_g"] == pytest.approx(15.75)
    # an absent structure has volume 0; a structure the names do not know has no EF
    empty = M.measure_case("x", np.zeros((2, 2, 2), np.int16), (1, 1, 1), {1: "LV", 2: "thing"})
    assert empty.volumes_ml == {"LV": 0.0, "thing": 0.0} and empty.volume("rv") is None
    assert M.PhasePair("x", empty, empty).function()["lv_ef_pct"] is None  # EDV 0: no EF


def test_pairing_rules_and_file(tmp_path):
    m = {cid: M.measure_case(cid, heart(lv, 100, 100), SPACING, NAMES) for cid, lv in
         [("a_ED", 900), ("a_ES", 300), ("b_frame01", 200), ("b_frame07", 700), ("c_frame01", 500), ("lone", 5)]}
    pairs = {p: (ed, es) for p, ed, es in M.pair_by_name(m)}
    # frames: ED is the larger LV whatever the frame number; a patient with one frame is not paired
    assert pairs == {"a": ("a_ED", "a_ES"), "b": ("b_frame07", "b_frame01")}
    pairing = tmp_path / "pairs.csv"
    pairing.write_text("patient,ed,es\nq,b_frame01,lone\n")
    rows = M.read_pairing_file(pairing)
    assert rows == [("q", "b_frame01", "lone")]
    assert [p.patient for p in M.make_pairs(m, rows)] == ["q"]
    (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
    with pytest.raises(HCError, match="patient,ed,es"):
        M.read_pairing_file(tmp_path / "bad.csv")


def test_compare_errors_and_tables():
    ref = {c: M.measure_case(c, heart(lv, 500, 800), SPACING, NAMES) for c, lv in
           [("label_p_frame01", 1000), ("label_p_frame02", 400)]}
    pred = {c: M.measure_case(c, heart(lv, 600, 800), SPACING, NAMES) for c, lv in
            [("image_p_frame01", 1100), ("image_p_frame02", 400)]}
    errors = M.compare(ref, pred, M.make_pairs(ref))
    assert errors["LV_ml"] == (pytest.approx(1.5), 2)  # (3 + 0) / 2 mL
    assert errors["Myo_ml"] == (pytest.approx(3.0), 2)
    # EF 60 % against (33 - 12) / 33 = 63.64 %
    assert errors["lv_ef_pct"][0] == pytest.approx(100 * 21 / 33 - 60.0) and errors["lv_ef_pct"][1] == 1
    assert errors["rv_ef_pct"] == (pytest.approx(0.0), 1)
    rows = list(csv.DictReader(io.StringIO(M.function_table(M.make_pairs(ref)))))
    assert rows[0]["lv_ef_pct"] == "60.00" and rows[0]["ed_case"] == "label_p_frame01"


def write_labels(array: np.ndarray, path, spacing=SPACING):
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def test_hc_measure_folder_and_reference(tmp_path, capsys):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir(), pred.mkdir()
    write_labels(heart(1000, 500, 800), ref / "label_p1_frame01.nii.gz")
    write_labels(heart(400, 500, 500), ref / "label_p1_frame02.nii.gz")
    write_labels(heart(1000, 500, 800), pred / "image_p1_frame01.nii.gz")
    write_labels(heart(500, 500, 500), pred / "image_p1_frame02.nii.gz")
    (pred / "itksnap_labels.txt").write_text(itksnap_label_text(segments_from_labels(
        {"background": 0, "Myo": 1, "LV": 2, "RV": 3}, {1: 200, 2: 500, 3: 600})))
    assert label_names(pred) == NAMES
    code = measure_cli.main(["-i", str(pred), "-r", str(ref), "--labels", "200:Myo,500:LV,600:RV",
                             "-o", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and "2 cases, 1 ED/ES pairs" in out
    function = list(csv.DictReader((tmp_path / "out" / "cardiac_function.csv").open()))
    assert function[0]["lv_ef_pct"] == "50.00"  # (30 - 15) / 30
    comparison = {r["measure"]: r for r in csv.DictReader((tmp_path / "out" / "measures_comparison.csv").open())}
    assert comparison["lv_ef_pct"]["mean_abs_error"] == "10.000" and comparison["lv_ef_pct"]["n"] == "1"
    assert read_case_table(tmp_path / "out" / "measures.csv")["image_p1_frame02"].volume("lv") == pytest.approx(15.0)
    with pytest.raises(HCError, match="--labels"):
        run_measures(ref, tmp_path / "o2", label_names(ref))


def test_case_lists(tmp_path):
    for name in ("a.nii.gz", "b_0000.nii.gz"):
        write_labels(np.zeros((2, 3, 4), np.int16), tmp_path / name)
    (tmp_path / "list.txt").write_text("# cohort\na.nii.gz\n\nb_0000.nii.gz\nmissing.nii.gz\n")
    cases = {c.case_id: c for c in discover_cases(tmp_path / "list.txt")}
    assert sorted(cases) == ["a", "b", "missing"]
    assert cases["a"].error is None and "not found" in cases["missing"].error
    (tmp_path / "cases.csv").write_text("case,image\nfirst,a.nii.gz\nsecond,b_0000.nii.gz\n")
    assert [c.case_id for c in read_case_list(tmp_path / "cases.csv")] == ["first", "second"]
    (tmp_path / "two.csv").write_text("image_0000,image_0001\na.nii.gz,b_0000.nii.gz\n")
    two = read_case_list(tmp_path / "two.csv", num_channels=2)
    assert two[0].case_id == "a" and len(two[0].files) == 2 and two[0].error is None
    (tmp_path / "nohead.csv").write_text("path\na.nii.gz\n")
    with pytest.raises(HCError, match="no image column"):
        read_case_list(tmp_path / "nohead.csv")


def test_segments_names_colours_codes():
    segs = segments_from_labels({"background": 0, "Myo": 1, "LV": 2, "RV": 3, "scar": 4}, {1: 200, 2: 500, 3: 600})
    assert [(s.value, s.name) for s in segs] == [(200, "Myo"), (500, "LV"), (600, "RV"), (4, "scar")]
    lv = segs[1]
    assert lv.snomed == ("87878005", "Left ventricle") and lv.colour == (0.90, 0.10, 0.10)  # LV's colour everywhere
    assert segs[0].snomed[0] == "49848007" and segs[3].snomed is None
    assert structure_key("left ventricle") == "lv" and structure_key("LV_blood_pool") == "lv"
    text = itksnap_label_text(segs)
    assert '  500   230   26   26  1.00   1   1  "LV"' in text


def test_cli_format_choices_are_the_writers():
    from heartcascade.cli import predict as predict_cli
    from heartcascade.dataset.segformats import FORMAT_ENDINGS

    assert predict_cli.OUTPUT_FORMATS == tuple(FORMAT_ENDINGS)  # the CLI cannot import the writers (--help speed)


def test_seg_nrrd_and_nifti_writers_read_back(tmp_path):
    labels = heart(1000, 500, 800).astype(np.uint16)
    geometry = Geometry(tuple(reversed(labels.shape)), SPACING, (1.0, 2.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    segs = segments_from_labels({"background": 0, "Myo": 1, "LV": 2, "RV": 3}, {1: 200, 2: 500, 3: 600})
    path = tmp_path / "case.seg.nrrd"
    assert format_of(path) == "seg.nrrd" and format_of(tmp_path / "c.dcm") == "dicom-seg"
    write_segmentation(labels, geometry, path, segs)
    back = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(back), labels)
    assert Geometry.of(back).mismatch(geometry) is None
    assert read_seg_nrrd_segments(path) == NAMES
    assert back.GetMetaData("Segment1_Color") == "0.9 0.1 0.1"
    assert back.GetMetaData("Segment1_Layer") == "0"
    nz = np.nonzero(labels == 500)
    x0, x1, y0, y1, z0, z1 = (int(v) for v in back.GetMetaData("Segment1_Extent").split())
    assert (x0, x1, y0, y1, z0, z1) == (nz[2].min(), nz[2].max(), nz[1].min(), nz[1].max(), nz[0].min(), nz[0].max())
    assert "SCT^87878005^Left ventricle" in back.GetMetaData("Segment1_Tags")
    with pytest.raises(HCError, match="DICOM series"):
        write_segmentation(labels, geometry, tmp_path / "x.dcm", segs, reference=None)
