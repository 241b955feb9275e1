"""nnU-Net v2 as a peer: its planner and predictor on the benchmark's volume, freshly initialised network.

Run by the benchmark as a child process with ``--nnunet-python`` (default: this interpreter), so
nnU-Net may live in a separate virtual environment: this file imports nothing from heartcascade when it
runs as a script (only nnunetv2, torch, numpy, SimpleITK). Following
``shared/notes/nnunet-as-a-peer.md``: its predictor and planner functions are called directly (no
``nnUNetv2_*`` command line tools, whose trainer lookup imports torchvision, broken with CPU torch), with
its default ``3d_fullres`` configuration, no test-time mirroring (heartcascade's default) and a freshly
initialised network (its ``get_network_from_plans``).

* GPU: the whole prediction of the volume in-process (``predict_single_npy_array``: preprocessing,
  sliding window, export to the original grid), timed after a warm-up, with peak GPU memory.
* CPU: a full prediction takes over an hour on 2 cores (~30 s per 64x192x192 tile), so its
  preprocessing is run and timed, the number of sliding-window tiles is counted with its own slicer,
  ONE tile forward is timed, and ``predict_s`` is **extrapolated** as preprocessing + tiles x tile time
  (``extrapolated: true``; Gaussian weighting, accumulation and export are not included).

Records: ``nnunet`` (skipped / plans) and ``nnunet_predict``.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def run_child(python: str, case, work: Path, device: str, env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    """Run this file with ``python`` on ``case`` (a BenchCase); returns its records."""
    from heartcascade.benchmark.memory import gb, run_measured  # deferred: heartcascade, absent from the --nnunet-python interpreter that runs this file as a script

    if shutil.which(python) is None and not Path(python).is_file():
        return [{"benchmark": "nnunet", "skipped": f"--nnunet-python {python}: no such interpreter"}]
    work.mkdir(parents=True, exist_ok=True)
    job = work / "job.json"
    job.write_text(json.dumps({"image": case.predict_input, "label": case.reference_label,
                               "dataset_dir": case.dataset_dir, "case_id": case.case_id, "work": str(work),
                               "device": device}))
    run = run_measured([python, str(Path(__file__).resolve()), str(job)], env=env, timeout=timeout)
    records = []
    for line in run.stdout.splitlines():
        if line.strip().startswith("{"):
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    if run.timed_out:
        records.append({"benchmark": "nnunet", "error": f"timed out after {timeout:.0f} s"})
    elif run.returncode != 0 and not any("error" in r or "skipped" in r for r in records):
        tail = " | ".join(run.stderr.strip().splitlines()[-3:])
        records.append({"benchmark": "nnunet", "error": f"exit status {run.returncode}: {tail[-400:]}"})
    for r in records:
        r.setdefault("process_peak_rss_gb", gb(run.peak_rss_bytes))
        r.setdefault("python", python)
    return records


# ---------------------------------------------------------------------------------------------------
# the child (no heartcascade imports below this line)


_OUT = None  # the original stdout; fd 1 is pointed at stderr so nnU-Net's own prints stay off it


def _emit(**record) -> None:
    out = _OUT or sys.stdout
    out.write(json.dumps(record, default=str) + "\n")
    out.flush()


def _peak_rss_gb() -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 3)
    except OSError:
        return None
    return None


def _make_raw(job: dict[str, Any], raw: Path) -> Path:
    """nnU-Net raw dataset: the benchmark dataset's files linked under its own naming (same format)."""
    src = Path(job["dataset_dir"])
    folder = raw / "Dataset971_HCBench"
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / sub).glob("*.nii.gz")):
            dest = folder / sub / f.name
            if not dest.exists():
                os.symlink(f.resolve(), dest)
    ds = json.loads((src / "dataset.json").read_text())
    nn_json = {"channel_names": ds["channel_names"], "labels": ds["labels"],
               "numTraining": len(list((folder / "labelsTr").glob("*.nii.gz"))), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(nn_json, indent=2))
    return folder


def child(job_path: str) -> int:
    global _OUT
    job = json.loads(Path(job_path).read_text())
    _OUT = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    work = Path(job["work"])
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / sub)  # nnunetv2.paths reads these at import
    try:
        import nnunetv2  # noqa: F401  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set; failing: reported as skipped
        import torch  # deferred: torch, runner.py imports this module and stays light for hc_benchmark --help
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install
        _emit(benchmark="nnunet", skipped=f"nnunetv2 is not importable with {sys.executable} "
                                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                                          f"install the optional extra 'nnunetv2' or pass --nnunet-python")
        return 0
    from importlib.metadata import version  # deferred: importlib.metadata (~20 ms), runner.py imports this module and stays light for hc_benchmark --help

    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set

    device = torch.device(job["device"] if job["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    info = {"nnunetv2": version("nnunetv2"), "nnunet_torch": str(torch.__version__)}
    _make_raw(job, work / "raw")
    t = time.perf_counter()
    extract_fingerprints([971], num_processes=2, check_dataset_integrity=False, clean=True, verbose=False)
    plan_experiments([971])
    plan_s = time.perf_counter() - t
    pre_dir = work / "preprocessed" / "Dataset971_HCBench"
    plans = PlansManager(str(pre_dir / "nnUNetPlans.json"))
    dataset_json = json.loads((pre_dir / "dataset.json").read_text())
    config = plans.get_configuration("3d_fullres")
    num_in = determine_num_input_channels(plans, config, dataset_json)
    label_manager = plans.get_label_manager(dataset_json)
    torch.manual_seed(0)
    network = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                     config.network_arch_init_kwargs_req_import, num_in,
                                     label_manager.num_segmentation_heads, allow_init=True, deep_supervision=False)
    params = sum(p.numel() for p in network.parameters())
    patch = [int(v) for v in config.patch_size]
    _emit(benchmark="nnunet", configuration="3d_fullres", patch_size=patch, batch_size=int(config.batch_size),
          spacing=[float(s) for s in config.spacing], parameters=int(params), fingerprint_and_plan_s=round(plan_s, 1),
          **info)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, config, [network.state_dict()], dataset_json, "nnUNetTrainer",
                                    None)
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # deferred: optional nnunetv2, imported after the nnUNet_* variables it reads are set

    t = time.perf_counter()
    img, props = SimpleITKIO().read_images([job["image"]])
    read_s = time.perf_counter() - t
    if device.type == "cuda":
        predictor.predict_single_npy_array(img, props, None, None, False)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        predictor.predict_single_npy_array(img, props, None, None, False)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
        _emit(benchmark="nnunet_predict", extrapolated=False, predict_s=round(total, 2), read_s=round(read_s, 2),
              tta=False, gpu_peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 1024 ** 3, 3),
              peak_rss_gb=_peak_rss_gb(), **info)
        return 0
    # CPU: preprocessing timed, tiles counted, one tile forward timed, the rest extrapolated
    preprocessor = config.preprocessor_class(verbose=False)
    t = time.perf_counter()
    data, _seg, _props = preprocessor.run_case_npy(img, None, props, plans, config, dataset_json)
    pre_s = time.perf_counter() - t
    slicers = predictor._internal_get_sliding_window_slicers(tuple(data.shape[1:]))
    tiles = len(slicers)
    network.eval()
    x = torch.randn((1, num_in) + tuple(patch))
    times = []
    with torch.inference_mode():
        for _ in range(2):
            t = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - t)
    tile_s = min(times)
    _emit(benchmark="nnunet_predict", extrapolated=True, predict_s=round(pre_s + tiles * tile_s, 1),
          preprocess_s=round(pre_s, 2), read_s=round(read_s, 2), preprocessed_shape=[int(s) for s in data.shape[1:]],
          tiles=tiles, tile_forward_s=[round(v, 2) for v in times], tile_s_used=round(tile_s, 2), tta=False,
          threads=torch.get_num_threads(), peak_rss_gb=_peak_rss_gb(),
          note="CPU: predict_s = preprocessing + tiles x one tile forward (Gaussian weighting, accumulation and "
               "export to the original grid not included)", **info)
    return 0


if __name__ == "__main__":
    sys.exit(child(sys.argv[1]))
