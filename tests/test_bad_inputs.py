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
           "hc_plan_and_preprocess": "plan_and_preprocess", "hc_train": "train"}
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
               HC_PREPROCESSED=str(roots["pre"]), HC_RESULTS=str(roots["res"]))
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
    torch.save({"format_version": 1, "configuration": "cascade", "plans": plans,
                "networks": {k: v.state_dict() for k, v in nets.items()}}, fold / "checkpoint_final.pth")
    (fold / "plans.json").write_text(json.dumps(plans))
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
    assert sorted(p.name for p in out.iterdir()) == ["good1.nii.gz", "good2.nii.gz"]
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
    assert list(out.iterdir()) == []


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
    assert {k: v for k, v in snapshot(inp).items() if k != "a.nii.gz"} == before
    # a plain file whose output would replace it: failed, the input untouched
    plain = tmp_path / "plain"
    plain.mkdir()
    write(world["image"], plain / "scan.nii.gz")
    before = snapshot(plain)
    proc = predict(world, plain, plain)
    one_line_error(proc, "scan.nii.gz")
    assert snapshot(plain) == before


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
        assert [p.name for p in mounts[1].iterdir()] == []  # nothing half-written under a final name
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
    assert set(plans) == set(clean)
    for key in set(plans) - {"dataset"}:
        assert plans[key] == clean[key], key
    assert set(plans["dataset"]["excluded_cases"]) == {"tiny_005"}


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
