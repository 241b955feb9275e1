#!/usr/bin/env python
"""Benchmark preprocessing (speed, peak memory), the storage format and the memory model.

Prints one JSON object per line. Not a test: run it by hand, e.g.

    .venv/bin/python scripts/benchmark_preprocessing.py                 # everything, CPU
    .venv/bin/python scripts/benchmark_preprocessing.py --only memory --device cuda   # memory model on a GPU

Sections:
* ``preprocess``: full-size CT cases (512 x 512 x 239 / 177, built from the MM-WHS label maps in
  ../shared/data/mmwhs_ct_labels: HU per structure, a body with lungs, noise) and an MS-CMRSeg bSSFP
  case (../shared/data/mscmrseg2019_bssfp, labels 200/500/600 stored as float64), preprocessed by the real
  driver with ``-np 2``; reports seconds per case, wall time and the peak RSS of the worker processes.
* ``storage``: the preprocessed CT image stored as memory-mapped .npy vs blosc2 (several chunkings):
  size, write time, warm and cold (page cache dropped with posix_fadvise) random reads of 64^3, 128^3,
  256^3 subvolumes and of 9-slice stacks.
* ``memory``: predicted vs measured peak memory of training steps (CPU: profiler allocation trace;
  CUDA: torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from heartcascade.dataset.dataset_json import MMWHS_CODES, MMWHS_LABELS, DatasetInfo, write_dataset_json  # noqa: E402
from heartcascade.dataset.image_io import Geometry, label_array, read_image, write_array  # noqa: E402

SHARED = Path(os.environ.get("HC_SHARED_DATA", REPO.parent / "shared" / "data"))


def emit(**record) -> None:
    print(json.dumps(record), flush=True)


def ct_like_from_labels(label_path: Path, seed: int) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """A CT-like int16 image around a real MM-WHS label map (HU per structure, body, lungs, noise)."""
    rng = np.random.default_rng(seed)
    img = read_image(label_path)
    codes = label_array(img, label_path)
    label = np.zeros(codes.shape, np.uint8)
    for new, code in MMWHS_CODES.items():
        label[codes == code] = new
    nz, ny, nx = label.shape
    sp = np.array(img.GetSpacing())  # x, y, z
    fg = np.argwhere(label > 0)
    cz, cy, cx = fg.mean(0)
    y, x = np.ogrid[:ny, :nx]
    dy, dx = (y - cy) * sp[1], (x - cx) * sp[0]
    body = (dx / 160.0) ** 2 + ((y - ny * 0.55) * sp[1] / 115.0) ** 2 <= 1.0
    lungs = (((np.abs(dx) - 75) / 55.0) ** 2 + (dy / 80.0) ** 2 <= 1.0) & body
    image = np.full(label.shape, -1000, np.float32)
    image[:, body] = 40.0
    image[:, lungs] = -820.0
    hu = {1: 330, 2: 120, 3: 300, 4: 320, 5: 290, 6: 360, 7: 310}
    for c, v in hu.items():
        image[label == c] = v
    image[:, int(ny * 0.95):, int(nx * 0.15): int(nx * 0.85)] = 150.0  # the table
    image += rng.normal(0, 25, image.shape).astype(np.float32)
    return image.astype(np.int16), label, Geometry.of(img)


def build_datasets(raw: Path) -> list[int]:
    ids = []
    ct_labels = sorted((SHARED / "mmwhs_ct_labels").glob("ct_train_*_label.nii.gz"))
    if ct_labels:
        folder = raw / "Dataset901_BenchCT"
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        # two cases from the 512x512x239 map (two workers run one each) + the 177-slice maps
        sources = [ct_labels[0], ct_labels[0]] + ct_labels[1:]
        for i, path in enumerate(sources):
            image, label, geom = ct_like_from_labels(path, i)
            cid = f"ct_{i:02d}"
            write_array(image, geom, folder / "imagesTr" / f"{cid}_0000.nii.gz")
            write_array(label, geom, folder / "labelsTr" / f"{cid}.nii.gz")
        write_dataset_json(DatasetInfo(folder, {"0": "CT"}, dict(MMWHS_LABELS), len(sources), ".nii.gz",
                                       label_codes=dict(MMWHS_CODES)))
        ids.append(901)
    mr = SHARED / "mscmrseg2019_bssfp"
    if (mr / "image_1.nii.gz").is_file():
        folder = raw / "Dataset902_BenchMR"
        for sub in ("imagesTr", "labelsTr"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for n in (1, 2):
            image = read_image(mr / f"image_{n}.nii.gz")
            lab_img = read_image(mr / f"label_{n}.nii.gz")
            codes = label_array(lab_img)
            label = np.zeros(codes.shape, np.uint8)
            for new, code in ((1, 200), (2, 500), (3, 600)):
                label[codes == code] = new
            import SimpleITK as sitk

            sitk.WriteImage(image, str(folder / "imagesTr" / f"mr_{n}_0000.nii.gz"), True)
            write_array(label, Geometry.of(lab_img), folder / "labelsTr" / f"mr_{n}.nii.gz")
        write_dataset_json(DatasetInfo(folder, {"0": "MR"}, {"background": 0, "Myo": 1, "LV": 2, "RV": 3}, 2,
                                       ".nii.gz", label_codes={1: 200, 2: 500, 3: 600}))
        ids.append(902)
    return ids


def _run_phase(did: int, num_processes: int, plan_only: bool) -> dict:
    """One driver run in this (fresh) process; reports the workers' peak RSS via RUSAGE_CHILDREN."""
    from heartcascade.workflows.plan_and_preprocess import plan_and_preprocess

    t = time.perf_counter()
    if plan_only:
        result = plan_and_preprocess(did, gpu_memory_gb=12, preset="paper", num_processes=num_processes,
                                     plan_only=True, progress=False)
    else:
        result = plan_and_preprocess(did, num_processes=num_processes, progress=False)
    return {"wall_seconds": round(time.perf_counter() - t, 2), "seconds": result.seconds, "failed": result.failed,
            "skipped": result.skipped, "processed": result.processed, "out_dir": str(result.out_dir),
            "K": result.plans.net2.K, "coarse_spacing": list(result.plans.net1.coarse_spacing),
            "worker_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2, 3),
            "main_peak_rss_gb": round(_vm_hwm_gb(), 3)}


def _vm_hwm_gb() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited from the parent at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024 ** 2
    return float("nan")


def _phase_subprocess(did: int, num_processes: int, plan_only: bool) -> dict:
    import subprocess

    cmd = [sys.executable, __file__, "--phase", str(did), "-np", str(num_processes)] + (["--plan-only"] if plan_only else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_single_case(raw: Path, pre: Path, did: int) -> None:
    """One case in this process, one thread: where the time goes."""
    import torch

    from heartcascade.dataset.dataset_json import load_dataset
    from heartcascade.planning.plans import load_plans, preprocess_settings
    from heartcascade.preprocessing import storage
    from heartcascade.preprocessing.preprocess import preprocess_case, read_images

    torch.set_num_threads(1)
    info = load_dataset(next(raw.glob(f"Dataset{did:03d}_*")))
    plans = load_plans(pre / info.folder.name)
    case = info.training_cases()[0]
    t0 = time.perf_counter()
    images = read_images(case.images)
    label = read_image(case.label)
    t1 = time.perf_counter()
    result = preprocess_case(images, preprocess_settings(plans), label, case.case_id)
    t2 = time.perf_counter()
    storage.save_case(pre / "single", case.case_id, result)
    t3 = time.perf_counter()
    emit(section="preprocess", dataset=info.folder.name, case=case.case_id, mode="in-process, 1 thread",
         read_s=round(t1 - t0, 2), preprocess_s=round(t2 - t1, 2), save_s=round(t3 - t2, 2),
         total_s=round(t3 - t0, 2), stored_shape=list(result.image.shape),
         coarse_shape=list(result.coarse_image.shape), loadavg=[round(v, 1) for v in os.getloadavg()])


def bench_preprocess(work: Path, num_processes: int) -> Path | None:
    raw, pre = work / "raw", work / "preprocessed"
    os.environ["HC_RAW"], os.environ["HC_PREPROCESSED"] = str(raw), str(pre)
    t = time.perf_counter()
    ids = build_datasets(raw)
    emit(section="preprocess", what="build synthetic inputs", seconds=round(time.perf_counter() - t, 1))
    ct_data = None
    for did in ids:
        plan = _phase_subprocess(did, num_processes, True)
        run = _phase_subprocess(did, num_processes, False)
        from heartcascade.planning import fingerprint as fpmod

        fp = fpmod.load_fingerprint(Path(run["out_dir"]) / fpmod.FINGERPRINT_FILE)
        shapes = {r["case_id"]: r["size_xyz"] for r in fp["cases"]}
        for cid, secs in sorted(run["seconds"].items()):
            emit(section="preprocess", dataset=Path(run["out_dir"]).name, case=cid, size_xyz=shapes.get(cid),
                 seconds=round(secs, 2), failed=run["failed"].get(cid))
        emit(section="preprocess", dataset=Path(run["out_dir"]).name, workers=num_processes, cases=len(run["seconds"]),
             wall_seconds=run["wall_seconds"], worker_peak_rss_gb=run["worker_peak_rss_gb"],
             main_peak_rss_gb=run["main_peak_rss_gb"], fingerprint_and_plan_seconds=plan["wall_seconds"],
             fingerprint_worker_peak_rss_gb=plan["worker_peak_rss_gb"], K=run["K"], coarse_spacing=run["coarse_spacing"],
             loadavg=[round(v, 1) for v in os.getloadavg()])
        again = _phase_subprocess(did, num_processes, False)
        emit(section="preprocess", dataset=Path(run["out_dir"]).name, rerun_seconds=again["wall_seconds"],
             skipped=len(again["skipped"]), processed=len(again["processed"]))
        bench_single_case(raw, pre, did)
        if did == 901:
            ct_data = Path(run["out_dir"]) / "data"
    return ct_data


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _reads(get, shape, edge, n, rng) -> float:
    c, D, H, W = shape
    d, h, w = (min(e, s) for e, s in zip(edge, (D, H, W)))
    t = time.perf_counter()
    for _ in range(n):
        z, y, x = rng.integers(0, D - d + 1), rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        np.asarray(get(z, y, x, d, h, w)).sum()
    return (time.perf_counter() - t) / n * 1000


def bench_storage(data_dir: Path | None, work: Path) -> None:
    from heartcascade.preprocessing import storage

    if data_dir is None or not storage.list_cases(data_dir):
        emit(section="storage", skipped="no CT case")
        return
    case = storage.load_case(data_dir, storage.list_cases(data_dir)[0], mmap=False)
    image = np.ascontiguousarray(case.image)
    seg = np.ascontiguousarray(case.seg)
    shape = image.shape
    edges = {"64^3": (64, 64, 64), "128^3": (128, 128, 128), "256^3": (256, 256, 256),
             "9 slices": (9, shape[2], shape[3])}
    out = work / "storage"
    out.mkdir(exist_ok=True)
    variants = [("npy (mmap)", None)] + [
        (f"blosc2 zstd clevel {cl}, chunks {ch}, blocks {bl}", (ch, bl, cl))
        for ch, bl, cl in (((1, 32, 128, 128), (1, 8, 32, 32), 5), ((1, 64, 64, 64), (1, 16, 16, 16), 5),
                           ((1, 16, shape[2], shape[3]), (1, 4, 64, 64), 1))]
    for name, cfg in variants:
        rng = np.random.default_rng(0)
        if cfg is None:
            path = out / "image.npy"
            t = time.perf_counter()
            np.save(path, image)
            write_s = time.perf_counter() - t
            arr = np.load(path, mmap_mode="r")
            seg_path = out / "seg.npy"
            np.save(seg_path, seg)
            seg_size = seg_path.stat().st_size
        else:
            import blosc2

            blosc2.set_nthreads(1)
            ch, bl, cl = cfg
            path = out / f"image_{len(name)}.b2nd"
            path.unlink(missing_ok=True)
            cparams = {"codec": blosc2.Codec.ZSTD, "clevel": cl, "filters": [blosc2.Filter.SHUFFLE]}
            t = time.perf_counter()
            blosc2.asarray(image, urlpath=str(path), chunks=ch, blocks=bl, cparams=cparams, mode="w")
            write_s = time.perf_counter() - t
            arr = blosc2.open(str(path), mode="r")
            seg_path = out / f"seg_{len(name)}.b2nd"
            seg_path.unlink(missing_ok=True)
            blosc2.asarray(seg, urlpath=str(seg_path), chunks=ch[1:], blocks=bl[1:], cparams=cparams, mode="w")
            seg_size = seg_path.stat().st_size
        reads = {}
        for label, edge in edges.items():
            _evict(path)
            cold = _reads(lambda z, y, x, d, h, w: arr[:, z:z + d, y:y + h, x:x + w], shape, edge, 3, rng)
            warm = _reads(lambda z, y, x, d, h, w: arr[:, z:z + d, y:y + h, x:x + w], shape, edge, 10, rng)
            reads[label] = {"cold_ms": round(cold, 1), "warm_ms": round(warm, 1)}
        emit(section="storage", format=name, image_shape=list(shape), image_mb=round(path.stat().st_size / 1e6, 1),
             raw_mb=round(image.nbytes / 1e6, 1), seg_mb=round(seg_size / 1e6, 2), write_seconds=round(write_s, 2),
             reads=reads)


def bench_memory(device: str) -> None:
    import torch

    from heartcascade.planning import memory_model as mm

    torch.manual_seed(0)
    net1 = {"in_channels": 1, "num_classes": 8, "base_features": 16, "max_features": 256, "dropout": 0.2}
    net2 = {"in_channels": 9, "num_classes": 8, "K": 9, "base_features": 32, "num_levels": 3, "recursions": 3,
            "max_features": 256}
    small = device == "cpu"
    configs = [
        ("net1", lambda: mm.check_net1(net1, 1, (32, 48, 48) if small else (128, 160, 160), device)),
        ("net2 step 4", lambda: mm.check_net2(net2, 1, (9, 96, 96) if small else (9, 480, 480), device)),
        ("cascade step 3", lambda: mm.check_cascade(net1, net2, "probabilities", 1, (24, 64, 64) if small else (64, 208, 208),
                                                    (0.5, 0.45, 0.45), device)),
    ]
    for name, fn in configs:
        t = time.perf_counter()
        r = fn()
        emit(section="memory", device=device, config=name, predicted_gb=round(r["predicted_gb"], 4),
             measured_gb=round(r["measured_gb"], 4), ratio=round(r["ratio"], 3),
             seconds=round(time.perf_counter() - t, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("preprocess", "storage", "memory"), action="append")
    parser.add_argument("-np", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--device", default="cpu", help="device for the memory section (cpu or cuda)")
    parser.add_argument("--keep", help="work folder to keep (default: a temporary folder)")
    parser.add_argument("--phase", type=int, help=argparse.SUPPRESS)  # internal: one driver run
    parser.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(_run_phase(args.phase, args.np, args.plan_only)))
        return 0
    sections = set(args.only or ("preprocess", "storage", "memory"))
    with tempfile.TemporaryDirectory(prefix="hc_bench_") as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = None
        if sections & {"preprocess", "storage"}:
            if not SHARED.is_dir():
                emit(section="preprocess", skipped=f"{SHARED} is absent")
            else:
                data = bench_preprocess(work, args.np)
        if "storage" in sections:
            bench_storage(data, work)
        if "memory" in sections:
            bench_memory(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
