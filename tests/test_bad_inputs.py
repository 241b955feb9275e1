"""Bad inputs and faults, run through the real console commands as subprocesses.

Each bad input must give exit code 1, exactly one line naming the file (on stderr; hc_verify_dataset lists
its problems on stdout), no traceback, no output under a final name, inputs byte-identical afterwards,
and the good cases of the same batch still done. Kills are real SIGKILLs of hc_predict and hc_train;
the rerun must give identical results and leave no temporary files.
See documentation/checks.md for the checks per command.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _training_fixture import SPACING_XYZ, make_case, make_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATASET_ID = 961
MODULES = {"hc_predict": "predict", "hc_evaluate": "evaluate", "hc_verify_dataset": "verify_dataset",
           "hc_plan_and_preprocess": "plan_and_preprocess", "hc_train": "train", "hc_export_model": "export_model",
           "hc_install_model": "install_model", "hc_overlay": "overlay"}
#: a few iterations per step, checkpoints every 2 iterations (the hc_train kill test)
SHORT_TRAINING = {"training": {"validation_interval_epochs": 1, "checkpoint_interval_iterations": 2, "steps": [
    {"step": 1, "epochs": 1, "iterations_per_epoch": 3}, {"step": 2, "epochs": 1, "iterations_per_epoch": 2},
    {"step": 3, "epochs": 1, "iterations_per_epoch": 3}, {"step": 4, "epochs": 1, "iterations_per_epoch": 3}]}}


# --------------------------------------------------------------------------------------------------
# running the commands


def command(name: str) -> list[str]:
    """The console script next to this interpreter, else ``python -m heartcascade.cli.<module>``."""
    script = Path(sys.executable).parent / name
    if script.is_file() and os.access(script, os.X_OK):
        return [sys.executable, str(script)]
    return [sys.executable, "-m", f"heartcascade.cli.{MODULES[name]}"]


def environment(roots: dict[str, Path]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HC_N_PROC_DA="0", HC_RAW=str(roots["raw"]),
               HC_PREPROCESSED=str(roots["pre"]), HC_RESULTS=str(roots["res"]),
               HC_CACHE=str(roots.get("cache", Path(roots["res"]).parent / "hc_cache")))
    return env


def run(name: str, *args, roots: dict[str, Path], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command(name) + [str(a) for a in args], env=environment(roots), capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess, *names: str, stream: str = "stderr") -> None:
    """Exit 1, no traceback, and each of ``names`` on exactly one line of ``stream``."""
    text = getattr(proc, stream)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    for name in names:
        hits = [line for line in text.splitlines() if name in line]
        assert len(hits) == 1, (name, text[-3000:])


def snapshot(folder: Path) -> dict[str, str]:
    """Bytes of every file (links by their target) under ``folder``: inputs must stay identical."""
    out = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "link:" + os.readlink(p)
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[key] = "dir"
    return out


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


# --------------------------------------------------------------------------------------------------
# building bad files


def write(array: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.0), compress: bool = True) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), compress)
    return path


def truncate(src: Path, dest: Path, fraction: float = 0.5) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: int(len(data) * fraction)])
    return dest


def flip_byte(src: Path, dest: Path, position: int) -> Path:
    data = bytearray(src.read_bytes())
    data[position] ^= 0xFF
    dest.write_bytes(bytes(data))
    return dest


def set_pixdim(src_nii: Path, dest: Path, value: float) -> Path:
    """Copy an uncompressed or gzipped NIfTI-1 with pixdim[1] set to ``value``."""
    gz = src_nii.name.endswith(".gz")
    data = bytearray(gzip.decompress(src_nii.read_bytes()) if gz else src_nii.read_bytes())
    data[80:84] = struct.pack("<f", value)
    dest.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    return dest


def with_value(image: np.ndarray, value: float) -> np.ndarray:
    out = image.astype(np.float32).copy()
    out[out.shape[0] // 2, 10, 10] = value
    return out


# --------------------------------------------------------------------------------------------------
# fixtures: one planned + preprocessed tiny dataset and an untrained model made from its plans


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    root = tmp_path_factory.mktemp("bad_inputs")
    roots = {k: root / k for k in ("raw", "pre", "res")}
    for p in roots.values():
        p.mkdir()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for key, var in (("raw", "HC_RAW"), ("pre", "HC_PREPROCESSED"), ("res", "HC_RESULTS")):
            mp.setenv(var, str(roots[key]))
        pre = make_dataset(roots["raw"], num_cases=3, dataset_id=DATASET_ID)
    torch.set_num_threads(threads)
    from heartcascade.model import from_plans
    from heartcascade.planning.plans import load_plans

    plans = load_plans(pre / "plans.json")
    torch.manual_seed(0)
    nets = from_plans.build_networks("cascade", plans)
    fold = roots["res"] / pre.name / "cascade" / "fold_all"
    fold.mkdir(parents=True)
    torch.save({"format_version": 1, "configuration": "cascade", "plans": plans.to_dict(),
                "networks": {k: v.state_dict() for k, v in nets.items()}}, fold / "checkpoint_final.pth")
    (fold / "plans.json").write_text(json.dumps(plans.to_dict()))
    image, label = make_case(7)
    return {"root": root, "roots": roots, "pre": pre, "raw": roots["raw"] / pre.name, "image": image,
            "label": label, "model": fold.parent}


def predict(world, inp: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return run("hc_predict", "-i", inp, "-o", out, "-m", world["model"], "-f", "all", "--device", "cpu", "--quiet",
               *extra, roots=world["roots"])


def bad_image_files(folder: Path, image: np.ndarray) -> dict[str, Path]:
    """Bad prediction inputs, keyed by what is wrong; every one must fail alone."""
    folder.mkdir(parents=True, exist_ok=True)
    src = folder.parent / f"{folder.name}_sources"
    src.mkdir(exist_ok=True)
    good_gz = write(image, src / "g.nii.gz")
    good_nii = write(image, src / "g.nii", compress=False)
    good_mha = write(image, src / "g.mha", compress=False)
    good_nrrd = write(image, src / "g.nrrd", compress=False)
    size = len(good_gz.read_bytes())
    bad = {
        "truncated nii.gz": truncate(good_gz, folder / "trunc_gz_0000.nii.gz"),
        "truncated nii.gz (90%)": truncate(good_gz, folder / "trunc_gz90_0000.nii.gz", 0.9),
        "truncated nii": truncate(good_nii, folder / "trunc_nii_0000.nii"),
        "truncated mha": truncate(good_mha, folder / "trunc_mha_0000.mha"),
        "truncated nrrd": truncate(good_nrrd, folder / "trunc_nrrd_0000.nrrd"),
        "gzip CRC damaged": flip_byte(good_gz, folder / "crc_0000.nii.gz", size - 6),
        "gzip data damaged": flip_byte(good_gz, folder / "flip_0000.nii.gz", size // 2),
        "empty file": folder / "empty_0000.nii.gz",
        "junk bytes": folder / "junk_0000.nii.gz",
        "junk mha header": folder / "junkhdr_0000.mha",
        "header only": folder / "hdronly_0000.nii.gz",
        "NaN nii.gz": write(with_value(image, np.nan), folder / "nan_gz_0000.nii.gz"),
        "Inf nii": write(with_value(image, np.inf), folder / "inf_nii_0000.nii", compress=False),
        "NaN mha": write(with_value(image, np.nan), folder / "nan_mha_0000.mha"),
        "-Inf nrrd": write(with_value(image, -np.inf), folder / "inf_nrrd_0000.nrrd"),
        "pixdim 0 nii": set_pixdim(good_nii, folder / "pix0_0000.nii", 0.0),
        "pixdim NaN nii.gz": set_pixdim(good_gz, folder / "pixnan_0000.nii.gz", float("nan")),
        "2D image": write(image[0], folder / "flat_0000.nii.gz", spacing=(2.0, 2.0)),
        "4D image": folder / "fourd_0000.nii.gz",
        "vector image": folder / "rgb_0000.mha",
        "dangling symlink": folder / "dangle_0000.nii.gz",
        "symlink loop": folder / "loop_0000.nii.gz",
        "folder named like an image": folder / "dir_0000.nii.gz",
        "two channels for a one-channel model": folder / "two_0001.nii.gz",
        "mhd without its raw file": folder / "noraw_0000.mhd",
    }
    (folder / "empty_0000.nii.gz").write_bytes(b"")
    (folder / "junk_0000.nii.gz").write_bytes(os.urandom(3000))
    (folder / "junkhdr_0000.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 4\nElementType = MET_NOPE\n")
    (folder / "hdronly_0000.nii.gz").write_bytes(gzip.compress(gzip.decompress(good_gz.read_bytes())[:352]))
    four = sitk.JoinSeries([sitk.GetImageFromArray(image)] * 2)
    sitk.WriteImage(four, str(folder / "fourd_0000.nii.gz"))
    rgb = sitk.GetImageFromArray(np.zeros(image.shape + (3,), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(folder / "rgb_0000.mha"))
    (folder / "dangle_0000.nii.gz").symlink_to(folder / "nowhere.nii.gz")
    (folder / "loop_0000.nii.gz").symlink_to(folder / "loop_0000.nii.gz")
    (folder / "dir_0000.nii.gz").mkdir()
    shutil.copyfile(good_gz, folder / "two_0000.nii.gz")
    shutil.copyfile(good_gz, folder / "two_0001.nii.gz")
    write(image, folder / "noraw_0000.mhd", compress=False)
    (folder / "noraw_0000.raw").unlink()
    return bad


# --------------------------------------------------------------------------------------------------
# hc_predict


def test_predict_batch_of_bad_inputs_beside_good_ones(world):
    inp = world["root"] / "predict_in"
    bad = bad_image_files(inp, world["image"])
    assert len(bad) >= 25
    shutil.copyfile(world["raw"] / "imagesTr" / "tiny_000_0000.nii.gz", inp / "good1_0000.nii.gz")
    write(world["image"], inp / "good2_0000.nii.gz")
    before = snapshot(inp)
    out = world["root"] / "predict_out"
    proc = predict(world, inp, out)
    one_line_error(proc, *{p.name for p in bad.values()})
    assert snapshot(inp) == before
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["good1.nii.gz", "good2.nii.gz"]
    failures = (out / "failures.csv").read_text().splitlines()
    assert failures[0] == "case,error" and len(failures) == len(bad) + 1
    assert sitk.ReadImage(str(out / "good2.nii.gz")).GetSize() == tuple(reversed(world["image"].shape))
    assert "2 predicted" in proc.stderr and f"{len(bad)} failed" in proc.stderr


@pytest.mark.parametrize("what", ["truncated", "nan", "pixdim0"])
def test_predict_single_bad_file(world, what):
    folder = world["root"] / f"single_{what}"
    folder.mkdir()
    good = write(world["image"], folder / "src.nii.gz")
    path = {"truncated": lambda: truncate(good, folder / "t_0000.nii.gz"),
            "nan": lambda: write(with_value(world["image"], np.nan), folder / "t_0000.nii.gz"),
            "pixdim0": lambda: set_pixdim(good, folder / "t_0000.nii.gz", 0.0)}[what]()
    out = folder / "out"
    proc = predict(world, path, out)
    one_line_error(proc, str(path))
    assert [p.name for p in out.iterdir()] == ["failures.csv"]


def test_predict_output_path_problems_fail_before_any_work(world, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write(world["image"], inp / "a_0000.nii.gz")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out in (a_file, a_file / "sub"):
        start = time.perf_counter()
        proc = predict(world, inp, out)
        one_line_error(proc, str(a_file))
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert a_file.read_text() == "keep me"
    missing = tmp_path / "missing_0000.nii.gz"
    one_line_error(predict(world, missing, tmp_path / "o2"), str(missing))
    assert time.perf_counter() - start < 60


def test_predict_input_folder_as_output_folder(world, tmp_path):
    inp = tmp_path / "same"
    inp.mkdir()
    write(world["image"], inp / "a_0000.nii.gz")
    before = snapshot(inp)
    first = predict(world, inp, inp)
    assert first.returncode == 0, first.stderr
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(inp / "a.nii.gz")))
    again = predict(world, inp, inp)
    assert again.returncode == 0 and "1 skipped" in again.stdout, again.stdout + again.stderr
    forced = predict(world, inp, inp, "--overwrite")
    assert forced.returncode == 0 and "1 predicted" in forced.stdout, forced.stderr
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(inp / "a.nii.gz"))), label)
    outputs = {"a.nii.gz", "measures.csv", "itksnap_labels.txt"}  # what hc_predict writes beside the label map
    assert {k: v for k, v in snapshot(inp).items() if k not in outputs} == before
    # a plain file whose output would replace it: failed, the input untouched
    plain = tmp_path / "plain"
    plain.mkdir()
    write(world["image"], plain / "scan.nii.gz")
    before = snapshot(plain)
    proc = predict(world, plain, plain)
    one_line_error(proc, "scan.nii.gz")
    assert {k: v for k, v in snapshot(plain).items() if k != "failures.csv"} == before


def test_predict_probabilities_completed_on_rerun(world, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write(world["image"], inp / "a_0000.nii.gz")
    write(world["image"][:, ::-1].copy(), inp / "b_0000.nii.gz")
    out = tmp_path / "out"
    assert predict(world, inp, out, "--save-probabilities").returncode == 0
    npz = (out / "a.npz").read_bytes()
    # the state a kill -9 or a full disk left: label map without its .npz, zero-byte hidden temp files
    (out / "a.npz").unlink()
    (out / ".a.npz.x1y2z3.tmp.npz").write_bytes(b"")
    (out / ".b.nii.gz.q9w8e7.tmp.nii.gz").write_bytes(b"")
    proc = predict(world, inp, out, "--save-probabilities")
    assert proc.returncode == 0 and "1 predicted, 1 skipped" in proc.stdout, proc.stdout + proc.stderr
    assert (out / "a.npz").is_file() and temp_files(out) == []
    with np.load(out / "a.npz") as new, np.load(__import__("io").BytesIO(npz)) as old:
        assert np.array_equal(new["probabilities"], old["probabilities"])


def test_predict_sigkill_mid_batch_then_rerun(world, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        write(world["image"] + rng.normal(0, 5, world["image"].shape).astype(np.float32), inp / f"c{i}_0000.nii.gz")
    reference = tmp_path / "reference"
    assert predict(world, inp, reference, "--save-probabilities").returncode == 0
    out = tmp_path / "out"
    argv = command("hc_predict") + ["-i", str(inp), "-o", str(out), "-m", str(world["model"]), "-f", "all",
                                    "--device", "cpu", "--quiet", "--save-probabilities"]
    proc = subprocess.Popen(argv, env=environment(world["roots"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "c1.nii.gz").exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("c*.nii.gz"))
    assert len(done) < 5, "the kill came too late to test anything"
    rerun = predict(world, inp, out, "--save-probabilities")
    assert rerun.returncode == 0, rerun.stderr
    assert temp_files(out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    for p in reference.glob("*.nii.gz"):
        assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(p))),
                              sitk.GetArrayFromImage(sitk.ReadImage(str(out / p.name))))


def test_full_or_read_only_disk(world, tmp_path):
    """A real read-only and a real full file system (tmpfs), where this user may mount one."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root (read-only and full-disk cases are unit-tested in test_image_io)")
    inp = tmp_path / "in"
    inp.mkdir()
    write(world["image"], inp / "a_0000.nii.gz")
    mounts = []
    try:
        for name, options in (("ro", "ro,size=1m"), ("full", "size=12k"), ("full_pre", "size=96k")):
            point = tmp_path / name
            point.mkdir()
            if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "none", str(point)],
                              capture_output=True).returncode != 0:
                pytest.skip("mount -t tmpfs is not permitted here")
            mounts.append(point)
        proc = predict(world, inp, mounts[0] / "out")
        one_line_error(proc, str(mounts[0] / "out"))
        assert len(proc.stderr.strip().splitlines()) == 1
        proc = predict(world, inp, mounts[1], "--save-probabilities")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "no space left on device" in proc.stderr, proc.stderr
        # nothing half-written under a final name (failures.csv is complete where it fitted)
        assert [p.name for p in mounts[1].iterdir() if p.name != "failures.csv"] == []
        # preprocessing: plans fit, the arrays do not -> each case fails naming the file, none looks complete
        proc = run("hc_plan_and_preprocess", "-d", DATASET_ID, "--no-progress", "-np", 1,
                   roots=dict(world["roots"], pre=mounts[2]))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "no space left on device: " in proc.stderr and "requested and" not in proc.stderr, proc.stderr
        assert not list((mounts[2] / world["pre"].name / "data").glob("*_properties.json"))
        assert temp_files(mounts[2]) == []
    finally:
        for point in mounts:
            subprocess.run(["umount", str(point)], capture_output=True)


# --------------------------------------------------------------------------------------------------
# hc_evaluate


def test_evaluate_bad_inputs(world, tmp_path):
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    label = world["label"]
    for name in ("a", "b"):
        write(label, ref / f"{name}.nii.gz")
        write(label, pred / f"{name}.nii.gz")
    labels = "1:LV,2:Myo,3:RV"

    def evaluate(*extra):
        return run("hc_evaluate", "-ref", ref, "-pred", pred, "--labels", labels, "--quiet", *extra,
                   roots=world["roots"])

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    one_line_error(evaluate("-o", a_file / "summary.json"), str(a_file))
    one_line_error(evaluate("-o", ref), str(ref))
    before = snapshot(tmp_path)
    bad_pred = truncate(ref / "b.nii.gz", pred / "b.nii.gz")
    proc = evaluate()
    one_line_error(proc, str(bad_pred))
    write(label, pred / "b.nii.gz")
    bad_ref = write(with_value(label, np.nan), ref / "b.nii.gz")
    one_line_error(evaluate(), str(bad_ref))
    bad_ref = set_pixdim(pred / "a.nii.gz", ref / "b.nii.gz", 0.0)
    one_line_error(evaluate(), str(bad_ref))
    assert not (pred / "summary.json").exists()
    assert set(snapshot(tmp_path)) == set(before)


# --------------------------------------------------------------------------------------------------
# hc_verify_dataset and hc_plan_and_preprocess


def copy_dataset(world, dataset_id: int, name: str) -> Path:
    dest = world["roots"]["raw"] / f"Dataset{dataset_id:03d}_{name}"
    shutil.copytree(world["raw"], dest, symlinks=True)
    return dest


def test_verify_reports_each_bad_case(world):
    raw = copy_dataset(world, 962, "VerifyBad")
    img_dir, lab_dir = raw / "imagesTr", raw / "labelsTr"
    image, label = world["image"], world["label"]
    names = []
    truncate(lab_dir / "tiny_000.nii.gz", lab_dir / "tiny_000.nii.gz")
    names.append("labelsTr/tiny_000.nii.gz")
    write(with_value(label, np.nan), lab_dir / "tiny_001.nii.gz", spacing=SPACING_XYZ)
    names.append("labelsTr/tiny_001.nii.gz")
    set_pixdim(img_dir / "tiny_002_0000.nii.gz", img_dir / "tiny_002_0000.nii.gz", 0.0)
    names.append("imagesTr/tiny_002_0000.nii.gz")
    write(image[:2, :4, :4].copy(), img_dir / "small_0000.nii.gz")
    write(label[:2, :4, :4].copy(), lab_dir / "small.nii.gz")
    names.append("imagesTr/small_0000.nii.gz")
    write(image, img_dir / "nochannel.nii.gz")
    names.append("imagesTr/nochannel.nii.gz")
    data = json.loads((raw / "dataset.json").read_text())
    data["numTraining"] = 4
    (raw / "dataset.json").write_text(json.dumps(data))
    before = snapshot(raw)
    proc = run("hc_verify_dataset", "-d", 962, "--no-progress", roots=world["roots"])
    one_line_error(proc, *[str(raw / n) + ":" for n in names], stream="stdout")
    assert "too small for the network" in proc.stdout
    assert snapshot(raw) == before


def test_preprocess_refuses_unpaired_training_files(world):
    raw = copy_dataset(world, 963, "NoChannel")
    shutil.move(raw / "imagesTr" / "tiny_002_0000.nii.gz", raw / "imagesTr" / "tiny_002.nii.gz")
    before = snapshot(raw)
    proc = run("hc_plan_and_preprocess", "-d", 963, "--no-progress", "-np", 1, roots=world["roots"])
    one_line_error(proc, "tiny_002.nii.gz")
    assert snapshot(raw) == before
    shutil.move(raw / "imagesTr" / "tiny_002.nii.gz", raw / "imagesTr" / "tiny_002_0000.nii.gz")
    write(world["label"], raw / "labelsTr" / "orphan.nii.gz")
    one_line_error(run("hc_plan_and_preprocess", "-d", 963, "--no-progress", "-np", 1, roots=world["roots"]),
                   "orphan.nii.gz")


def test_preprocess_bad_cases_fail_alone_and_never_change_the_plan(world):
    raw = copy_dataset(world, 964, "BadCases")
    img_dir, lab_dir = raw / "imagesTr", raw / "labelsTr"
    image, label = make_case(3)
    write(image, img_dir / "tiny_003_0000.nii.gz", spacing=SPACING_XYZ)
    truncate(write(label, raw / "l.nii.gz", spacing=SPACING_XYZ), lab_dir / "tiny_003.nii.gz")
    (raw / "l.nii.gz").unlink()
    write(with_value(image, np.inf), img_dir / "tiny_004_0000.nii.gz", spacing=SPACING_XYZ)
    write(label, lab_dir / "tiny_004.nii.gz", spacing=SPACING_XYZ)
    write(image[:2, :4, :4].copy(), img_dir / "tiny_005_0000.nii.gz", spacing=SPACING_XYZ)
    write(label[:2, :4, :4].copy(), lab_dir / "tiny_005.nii.gz", spacing=SPACING_XYZ)
    before = snapshot(raw)
    proc = run("hc_plan_and_preprocess", "-d", 964, "--no-progress", "-np", 1, "--preset", "demo",
               roots=world["roots"])
    one_line_error(proc, "tiny_003.nii.gz", "tiny_004_0000.nii.gz", "tiny_005_0000.nii.gz")
    assert "preprocessed: 3 case(s)" in proc.stdout
    assert snapshot(raw) == before
    out = world["roots"]["pre"] / raw.name
    from heartcascade.preprocessing import storage

    assert storage.list_cases(out / "data") == ["tiny_000", "tiny_001", "tiny_002"]
    plans = json.loads((out / "plans.json").read_text())
    clean = json.loads((world["pre"] / "plans.json").read_text())
    assert plans["settings"] == clean["settings"]
    assert set(plans["report"]) == set(clean["report"])
    for key in set(plans["report"]) - {"dataset"}:
        assert plans["report"][key] == clean["report"][key], key
    assert set(plans["report"]["dataset"]["excluded_cases"]) == {"tiny_005"}


def test_preprocess_corrupt_plans_and_damaged_arrays(world):
    raw = copy_dataset(world, 965, "Damaged")
    pre_args = ("hc_plan_and_preprocess", "-d", 965, "--no-progress", "-np", 1, "--preset", "demo")
    assert run(*pre_args, roots=world["roots"]).returncode == 0
    out = world["roots"]["pre"] / raw.name
    plans = out / "plans.json"
    text = plans.read_text()
    plans.write_text(text[: len(text) // 2])
    proc = run("hc_plan_and_preprocess", "-d", 965, "--no-progress", "-np", 1, roots=world["roots"])
    one_line_error(proc, str(plans))
    assert "--overwrite" in proc.stderr and plans.read_text() == text[: len(text) // 2]
    plans.write_text(text)
    array = out / "data" / "tiny_001_image.npy"
    good = array.read_bytes()
    array.write_bytes(good[: len(good) // 2])
    (array.parent / f".{array.name}.k1ll3d.tmp.npy").write_bytes(b"")  # what a kill -9 mid-write leaves
    proc = run(*pre_args, roots=world["roots"])
    assert proc.returncode == 0 and "preprocessed: 1 case(s), skipped (up to date): 2" in proc.stdout, proc.stdout
    assert array.read_bytes() == good and temp_files(out) == []


def test_preprocess_read_only_output_root(world, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions (test_full_or_read_only_disk covers a read-only mount)")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        roots = dict(world["roots"], pre=ro / "pre")
        one_line_error(run("hc_plan_and_preprocess", "-d", DATASET_ID, "--no-progress", roots=roots), str(ro / "pre"))
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------------------------------
# hc_train


def test_train_sigkill_mid_step_then_continue(world, tmp_path):
    import torch

    override = json.dumps(SHORT_TRAINING)
    args = [DATASET_ID, "all", "--device", "cpu", "--num-workers", "0", "--no-validation", "--quiet"]
    ref_roots = dict(world["roots"], res=tmp_path / "ref")
    done = run("hc_train", *args, "--plans-override", override, roots=ref_roots)
    assert done.returncode == 0, done.stderr[-3000:]
    roots = dict(world["roots"], res=tmp_path / "killed")
    fold = roots["res"] / world["pre"].name / "cascade" / "fold_all"
    proc = subprocess.Popen(command("hc_train") + [str(a) for a in args] + ["--plans-override", override],
                            env=environment(roots), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = fold / "checkpoint_latest.pth"
        if latest.exists() and torch.load(latest, weights_only=False).get("step") == "3":
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (fold / "checkpoint_final.pth").exists(), "the kill came too late to test anything"
    (fold / ".checkpoint_latest.pth.k1ll3d.tmp.pth").write_bytes(b"")  # as if killed inside a checkpoint write
    resumed = run("hc_train", *args, "--continue", roots=roots)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert temp_files(fold) == []
    a = torch.load(tmp_path / "ref" / world["pre"].name / "cascade" / "fold_all" / "checkpoint_final.pth",
                   weights_only=False)
    b = torch.load(fold / "checkpoint_final.pth", weights_only=False)
    for net in ("net1", "net2"):
        for key, value in a["networks"][net].items():
            assert torch.equal(value, b["networks"][net][key]), (net, key)


def test_train_damaged_preprocessed_array(world, tmp_path):
    pre = world["roots"]["pre"]
    copy = tmp_path / "pre"
    shutil.copytree(pre, copy)
    array = copy / world["pre"].name / "data" / "tiny_002_coarse_image.npy"
    array.write_bytes(array.read_bytes()[:100])
    roots = dict(world["roots"], pre=copy, res=tmp_path / "res")
    proc = run("hc_train", DATASET_ID, "all", "--device", "cpu", "--num-workers", "0", "--no-validation", "--quiet",
               "--plans-override", json.dumps(SHORT_TRAINING), roots=roots)
    one_line_error(proc, str(array))


# --------------------------------------------------------------------------------------------------
# model archives (issue #23): every archive is untrusted


class _Payload:
    """A pickle payload: loading it without weights_only would run a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def tag_of(pid: int) -> str:
    from heartcascade.utils.processes import host_code

    return f"hc{pid}-{host_code()}"


MEMBER = "Dataset961_TinyTrain/cascade/fold_all/"


@pytest.fixture(scope="module")
def archive(world):
    """The world's model exported with the real command."""
    path = world["root"] / "model.zip"
    proc = run("hc_export_model", "-d", DATASET_ID, "-c", "cascade", "-f", "all", "-o", path, roots=world["roots"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path


def rezip(src: Path, dest: Path, replace: dict | None = None, manifest: dict | None = None,
          links: dict | None = None, drop: tuple = ()) -> Path:
    """A copy of archive ``src`` with members replaced (bytes) or added, manifest fields changed, symbolic
    link members added (name -> target) and members dropped."""
    import zipfile

    replace, links = dict(replace or {}), dict(links or {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            if name in drop or name in links:
                continue
            data = zin.read(name)
            if name == "heartcascade_model.json" and manifest is not None:
                data = json.dumps({**json.loads(data), **manifest}).encode()
            zout.writestr(name, replace.pop(name, data))
        for name, data in replace.items():
            zout.writestr(name, data)
        for name, target in links.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zout.writestr(info, target)
    return dest


def evil_checkpoint(world, marker: Path, **changes) -> bytes:
    """A checkpoint of the world's model, with ``changes`` to its plans or a pickle payload (marker given)."""
    import io

    import torch

    state = torch.load(world["model"] / "fold_all" / "checkpoint_final.pth", weights_only=True)
    state["plans"] = {**state["plans"], **changes}
    if marker is not None:
        state["payload"] = _Payload(marker)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_archive_naming_a_folder_outside_results_is_refused(world, archive, tmp_path):
    """Defect 1: the manifest's configuration (or dataset) as a path; member names with ../ or absolute."""
    import zipfile

    outside = tmp_path / "outside"
    (outside / ".cache").mkdir(parents=True)
    (outside / ".cache" / "keep.txt").write_text("mine")
    roots = dict(world["roots"], res=tmp_path / "res")
    before = snapshot(tmp_path)
    cases = {
        "abs_configuration": {"configuration": str(outside)},  # the reproduction of issue #23
        "dotdot_dataset": {"dataset": "../outside"},
    }
    for name, fields in cases.items():
        evil = tmp_path / f"{name}.zip"
        with zipfile.ZipFile(evil, "w") as zf:
            zf.writestr("heartcascade_model.json", json.dumps({
                "format": "heartcascade-model", "format_version": 1, "dataset": "Dataset001_SyntheticCT",
                "configuration": "cascade", "folds": [], "plans_version": 3, **fields}))
            zf.writestr("README.md", "hello")
        before[evil.name] = hashlib.sha256(evil.read_bytes()).hexdigest()
        one_line_error(run("hc_install_model", evil, roots=roots), str(evil))
    for name in ("../../outside/x.json", "/tmp/x.json"):
        evil = rezip(archive, tmp_path / "members.zip", replace={name: b"{}"})
        proc = run("hc_install_model", evil, roots=roots)
        one_line_error(proc, "unexpected member")
        evil.unlink()
    assert snapshot(tmp_path) == before  # nothing created or renamed anywhere, HC_RESULTS included


def test_broken_archive_never_replaces_a_working_model(world, archive, tmp_path):
    """Defect 2: checkpoints, links, pickle payloads and missing folds are checked before anything is
    replaced, with --overwrite too; the installed model keeps predicting."""
    roots = dict(world["roots"], res=tmp_path / "res")
    proc = run("hc_install_model", archive, roots=roots)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = roots["res"] / "Dataset961_TinyTrain" / "cascade"
    installed = snapshot(config)
    marker = tmp_path / "payload_ran"
    ckpt = MEMBER + "checkpoint_final.pth"
    broken = {
        "plans_version_4": rezip(archive, tmp_path / "v4.zip", replace={ckpt: evil_checkpoint(world, None,
                                                                                             plans_version=4)}),
        "link_dataset_json": rezip(archive, tmp_path / "link.zip", links={MEMBER + "dataset.json": "/etc/passwd"}),
        "pickle_payload": rezip(archive, tmp_path / "pickle.zip", replace={ckpt: evil_checkpoint(world, marker)}),
        "missing_fold": rezip(archive, tmp_path / "missing.zip", manifest={"folds": ["all", "3"]}),
        "deep_json": rezip(archive, tmp_path / "deep.zip", replace={MEMBER + "plans.json": b"[" * 50000}),
    }
    reasons = {"plans_version_4": "plans_version 4", "link_dataset_json": "symbolic link",
               "pickle_payload": "cannot read checkpoint", "missing_fold": "fold 3 is listed",
               "deep_json": "nested deeper"}
    for what, path in broken.items():
        proc = run("hc_install_model", path, "--overwrite", roots=roots)
        one_line_error(proc, str(path))
        assert reasons[what] in proc.stderr, proc.stderr
        assert snapshot(config) == installed, what
        assert not marker.exists(), what
    image = tmp_path / "in" / "c_0000.nii.gz"
    image.parent.mkdir()
    write(world["image"], image, spacing=SPACING_XYZ)
    proc = run("hc_predict", "-i", image.parent, "-o", tmp_path / "out", "-d", DATASET_ID, "--device", "cpu",
               "--quiet", roots=roots)
    assert proc.returncode == 0 and (tmp_path / "out" / "c.nii.gz").is_file(), proc.stderr[-2000:]


def test_zip_bomb_is_refused_before_unpacking(world, archive, tmp_path):
    """Defect 4: an archive unpacking to far more than it weighs fails in one line (install and predict -m)."""
    import zipfile

    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        with zout.open(MEMBER + "checkpoint_best.pth", "w") as fh:
            block = bytes(2**20)
            for _ in range(256):
                fh.write(block)
    assert bomb.stat().st_size < 2 * 2**20
    roots = dict(world["roots"], res=tmp_path / "res", cache=tmp_path / "cache")
    one_line_error(run("hc_install_model", bomb, roots=roots), "zip bomb")
    image = tmp_path / "in" / "c_0000.nii.gz"
    image.parent.mkdir()
    write(world["image"], image, spacing=SPACING_XYZ)
    one_line_error(run("hc_predict", "-i", image.parent, "-o", tmp_path / "out", "-m", bomb, "--device", "cpu",
                       "--quiet", roots=roots), "zip bomb")
    assert not roots["res"].exists() or not any(roots["res"].rglob("*"))
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_leftovers_of_killed_runs_are_removed_and_models_cached(world, archive, tmp_path):
    """Defect 6: what kill -9 leaves beside an export, in the configuration folder (install) and in the
    model cache (predict -m) is removed by the next run; live processes' files stay; predict -m unpacks a
    given archive once."""
    dead, live = tag_of(dead_pid()), tag_of(os.getpid())
    out = tmp_path / "m.zip"
    stale_export = tmp_path / f".m.zip.{dead}.x1.tmp.zip"
    live_export = tmp_path / f".m.zip.{live}.x2.tmp.zip"
    for p in (stale_export, live_export):
        p.write_bytes(b"half")
    assert run("hc_export_model", "-d", DATASET_ID, "-f", "all", "-o", out, roots=world["roots"]).returncode == 0
    assert not stale_export.exists() and live_export.exists()

    roots = dict(world["roots"], res=tmp_path / "res", cache=tmp_path / "cache")
    config = roots["res"] / "Dataset961_TinyTrain" / "cascade"
    (config / f".hc_install_{dead}_x1" / "fold_all").mkdir(parents=True)
    assert run("hc_install_model", out, roots=roots).returncode == 0
    assert sorted(p.name for p in config.iterdir()) == ["fold_all"]

    # a kill between the two renames of a fold swap: the old fold is put back
    fold = config / "fold_all"
    aside = config / f".fold_all.old.{dead}"
    os.replace(fold, aside)
    proc = run("hc_install_model", out, roots=roots)  # refused (fold exists again) after the repair
    one_line_error(proc, "already exist")
    assert fold.is_dir() and not aside.exists()

    models = tmp_path / "cache" / "models"
    (models / f".hc_unpack_{dead}_x1").mkdir(parents=True)
    image = tmp_path / "in" / "c_0000.nii.gz"
    image.parent.mkdir()
    write(world["image"], image, spacing=SPACING_XYZ)
    for n in (1, 2):
        proc = run("hc_predict", "-i", image.parent, "-o", tmp_path / f"out{n}", "-m", out, "--device", "cpu",
                   "--quiet", roots=roots)
        assert proc.returncode == 0, proc.stderr[-2000:]
        entries = sorted(models.iterdir())
        assert len(entries) == 1 and not entries[0].name.startswith("."), entries
        if n == 1:
            first = entries[0].stat().st_ino
    assert entries[0].stat().st_ino == first  # the second run used the cached copy


# --------------------------------------------------------------------------------------------------
# concurrent runs (issue #23): one run per fold and per preprocessed dataset


def fake_lock(guarded: Path, pid: int, command_line: str) -> Path:
    """The lock file a run of ``pid`` on this host holds (utils/run_lock.py's format)."""
    from heartcascade.utils.processes import process_start, this_host
    from heartcascade.utils.run_lock import lock_path

    lock = lock_path(guarded)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": this_host(), "start": process_start(pid),
                                "command": command_line, "since": time.time()}))
    return lock


def test_one_run_per_fold_and_dataset_and_plans_identity(world, tmp_path):
    """Defects 3 and 5: while a real hc_train runs, a second hc_train of the fold and hc_plan_and_preprocess
    of its dataset fail fast naming it; after its kill -9 its lock is stale and the next run takes it;
    hc_train under a re-planning is refused; --continue refuses data preprocessed with other plans."""
    from heartcascade.utils.run_lock import lock_path

    roots = dict(world["roots"], res=tmp_path / "res")
    fold = roots["res"] / world["pre"].name / "cascade" / "fold_all"
    lock = lock_path(fold)
    base = [DATASET_ID, "all", "--device", "cpu", "--num-workers", "0", "--no-validation", "--quiet"]
    args = base + ["--plans-override", json.dumps(SHORT_TRAINING)]
    long_run = json.loads(json.dumps(SHORT_TRAINING))
    long_run["training"]["steps"][0]["iterations_per_epoch"] = 100000
    first = subprocess.Popen(command("hc_train") + [str(a) for a in base] + ["--plans-override", json.dumps(long_run)],
                             env=environment(roots), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and first.poll() is None:
            if lock.is_file() and json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()[-3000:]
        proc = run("hc_train", *args, "--seed", 7, roots=roots)
        one_line_error(proc, f"pid {first.pid}")
        proc = run("hc_plan_and_preprocess", "-d", DATASET_ID, "--no-progress", "-np", 1, "--overwrite",
                   "--preset", "paper", roots=roots)
        one_line_error(proc, f"pid {first.pid}")
        assert first.poll() is None, "the first training must outlive the checks"
    finally:
        first.kill()
        first.wait()
    assert lock.is_file()  # left by the kill -9: stale now
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        pre_lock = fake_lock(world["pre"], holder.pid, "hc_plan_and_preprocess -d 961 --overwrite")
        one_line_error(run("hc_train", *args, roots=roots), f"pid {holder.pid}")
        pre_lock.unlink()
    finally:
        holder.kill()
        holder.wait()
    proc = run("hc_train", *args, roots=roots)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not lock.exists()

    import torch

    recorded = torch.load(fold / "checkpoint_latest.pth", weights_only=True)["data_plans_hash"]
    pre = tmp_path / "pre"
    shutil.copytree(world["roots"]["pre"], pre)
    plans_file = pre / world["pre"].name / "plans.json"
    plans = json.loads(plans_file.read_text())
    plans["settings"]["sampling"]["max_locations_per_class"] += 1
    plans_file.write_text(json.dumps(plans))
    proc = run("hc_train", *base, "--continue", roots=dict(roots, pre=pre))
    one_line_error(proc, recorded)
    assert "other plans" in proc.stderr


# --------------------------------------------------------------------------------------------------
# no traceback for any input (issue #23, defect 7) and the security cases that were already right


def test_hostile_dataset_json_and_plans_values(world, tmp_path):
    raw = copy_dataset(world, 966, "Hostile")
    data = json.loads((raw / "dataset.json").read_text())
    for what, text in (("numTraining", json.dumps({**data, "numTraining": "four"})),
                       ("nested", json.dumps({**data, "extra": 0})[:-1] + ', "deep": ' + "[" * 100000 + "]" * 100000
                        + "}")):
        (raw / "dataset.json").write_text(text)
        for name in ("hc_verify_dataset", "hc_plan_and_preprocess"):
            proc = run(name, "-d", 966, "--no-progress", roots=world["roots"])
            stream = "stdout" if name == "hc_verify_dataset" else "stderr"
            one_line_error(proc, str(raw / "dataset.json"), stream=stream)
            assert ("numTraining" if what == "numTraining" else "nested deeper") in getattr(proc, stream)
    roots = dict(world["roots"], res=tmp_path / "res")
    base = [DATASET_ID, "all", "--device", "cpu", "--num-workers", "0", "--no-validation", "--quiet"]
    proc = run("hc_train", *base, "--plans-override", json.dumps({"training": {"steps": {"1": {"batch_size": 10**6}}}}),
               roots=roots)
    one_line_error(proc, "training.steps[1].batch_size")
    proc = run("hc_train", *base, "--plans-override", json.dumps({"training": {"steps": {"1": {"lr": -1}}}}),
               roots=roots)
    one_line_error(proc, "lr")
    out_dir = tmp_path / "existing_folder"
    out_dir.mkdir()
    image = write(world["image"], tmp_path / "c.nii.gz", spacing=SPACING_XYZ)
    label = write(world["label"], tmp_path / "l.nii.gz", spacing=SPACING_XYZ)
    one_line_error(run("hc_overlay", "-i", image, "-s", label, "-o", out_dir, roots=world["roots"]), str(out_dir))
    one_line_error(run("hc_overlay", "-i", image, "-s", label, "-o", f"{out_dir}/new_folder/", roots=world["roots"]),
                   "new_folder")


def test_pickle_payloads_are_refused_everywhere(world, tmp_path):
    """torch.load(weights_only=True) in hc_predict, hc_export_model and hc_train --continue."""
    marker = tmp_path / "payload_ran"
    roots = dict(world["roots"], res=tmp_path / "res")
    fold = roots["res"] / world["pre"].name / "cascade" / "fold_all"
    fold.mkdir(parents=True)
    for name in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        (fold / name).write_bytes(evil_checkpoint(world, marker))
    image = tmp_path / "in" / "c_0000.nii.gz"
    image.parent.mkdir()
    write(world["image"], image, spacing=SPACING_XYZ)
    one_line_error(run("hc_predict", "-i", image.parent, "-o", tmp_path / "out", "-m", fold.parent, "-f", "all",
                       "--device", "cpu", "--quiet", roots=roots), "checkpoint_final.pth")
    one_line_error(run("hc_export_model", "-d", DATASET_ID, "-f", "all", "-o", tmp_path / "m.zip", roots=roots),
                   "checkpoint_final.pth")
    one_line_error(run("hc_train", DATASET_ID, "all", "--device", "cpu", "--num-workers", "0", "--no-validation",
                       "--quiet", "--continue", roots=roots), "checkpoint_latest.pth")
    assert not marker.exists() and not (tmp_path / "m.zip").exists()


def test_concurrent_predictions_and_reinstalls(world, archive, tmp_path):
    """Already right, kept so: two hc_predict into one folder give identical valid outputs, also while the
    model is re-installed under them (each fold folder is swapped in whole)."""
    roots = dict(world["roots"], res=tmp_path / "res")
    assert run("hc_install_model", archive, roots=roots).returncode == 0
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        write(world["image"], inp / f"c{i}_0000.nii.gz", spacing=SPACING_XYZ)
    args = ["-i", inp, "-d", DATASET_ID, "--device", "cpu", "--quiet"]
    assert run("hc_predict", *args, "-o", tmp_path / "ref", roots=roots).returncode == 0
    env = environment(roots)
    preds = [subprocess.Popen(command("hc_predict") + [str(a) for a in args] + ["-o", str(tmp_path / "both")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for _ in range(2):
        proc = run("hc_install_model", archive, "--overwrite", roots=roots)
        assert proc.returncode == 0, proc.stderr[-2000:]
    for p in preds:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
    for i in range(2):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ref" / f"c{i}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "both" / f"c{i}.nii.gz")))
        assert np.array_equal(a, b)
    assert temp_files(tmp_path / "both") == [] and sorted(p.name for p in (roots["res"] / world["pre"].name /
                                                                          "cascade").iterdir()) == ["fold_all"]
