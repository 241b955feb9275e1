"""The measurements, each run in a fresh worker process by :mod:`heartcascade.benchmark.worker`.

Every function takes the job parameters (a JSON-able dict built by the runner) and ``emit(**record)``,
which prints one JSON object per measurement. A fresh process per section keeps the peak-memory
numbers of one section free of another's allocations (and a crash in one section from stopping the
others).
"""
from __future__ import annotations

import gc
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from heartcascade.benchmark.data import BenchCase, build_case
from heartcascade.benchmark.memory import GiB, PeakRss, gb, gpu_peaks, gpu_reset, mem_available_bytes
from heartcascade.benchmark.roi_patch import ReferenceBoxRoi
from heartcascade.dataset import image_io
from heartcascade.dataset.dataset_json import load_dataset
from heartcascade.dataset.image_io import Geometry
from heartcascade.inference.predictor import Predictor, tune_host_allocator
from heartcascade.model import from_plans
from heartcascade.paths import preprocessed_dataset_dir, raw_dataset_dir
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import memory_model as mm
from heartcascade.planning.plans import Plans, cascade_kwargs, load_plans, net1_kwargs, net2_kwargs
from heartcascade.preprocessing import storage
from heartcascade.model.checkpoint import FORMAT_VERSION, save_checkpoint
from heartcascade.training.dataloading import BatchStream
from heartcascade.training.trainer import Trainer
from heartcascade.utils.atomic import atomic_write_json
from heartcascade.utils.device import resolve_device
from heartcascade.utils.errors import HCError
from heartcascade.workflows import plan_and_preprocess as prun

Emit = Callable[..., None]


def _round(v: float, digits: int = 3) -> float:
    return round(float(v), digits)


def _case(p: dict[str, Any]) -> BenchCase:
    return BenchCase.from_dict(p["case"])


def _pre_dir(case: BenchCase) -> Path:
    return preprocessed_dataset_dir(case.dataset_id, must_exist=True)


def _load_plans(case: BenchCase) -> Plans:
    return load_plans(_pre_dir(case) / "plans.json")


def _device(name: str):
    return resolve_device(name)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# dataset


def section_dataset(p: dict[str, Any], emit: Emit) -> None:
    t = time.perf_counter()
    shared = Path(p["shared_data"]) if p.get("shared_data") else None
    case = build_case(p["case_name"], shared, bool(p["quick"]))
    emit(benchmark="dataset", seconds=_round(time.perf_counter() - t, 1), bench_case=case.to_dict(),
         size_xyz=case.size_xyz, spacing_xyz=case.spacing_xyz, description=case.description)


# ---------------------------------------------------------------------------------------------------
# preprocessing


def plans_summary(p: Plans) -> dict[str, Any]:
    r = p.report
    steps = {str(s.step): {**{k: getattr(s, k) for k in ("batch_size", "patch_shape", "subvolume_shapes", "stack_shape")
                              if getattr(s, k) is not None},
                           "predicted_peak_gb": r.step_peak_gb(s)}
             for s in p.training.steps}
    return {"preset": r.preset, "K": p.net2.K, "net1_widths": r.net1.widths, "net1_coarse_spacing": p.net1.coarse_spacing,
            "net1_patch_shape": p.net1.patch_shape, "net2_widths": r.net2.widths,
            "net2_full_slice_shape": p.net2.full_slice_shape, "inference_z_chunk": p.inference.z_chunk,
            "memory_target_gb": r.memory.target_gb, "predicted_peak_gb": r.memory.predicted_peak_gb, "steps": steps}


def section_preprocessing(p: dict[str, Any], emit: Emit) -> None:
    """Fingerprint + plans (timed), then every training case preprocessed by the real driver (timed)."""
    case = _case(p)
    did, preset, nproc = case.dataset_id, p["preset"], int(p["num_processes"])
    if not p.get("timed", True):  # section skipped: only make sure the data and plans exist
        result = prun.plan_and_preprocess(did, preset=preset, num_processes=nproc, progress=False)
        if result.failed:
            raise HCError(f"preprocessing failed: {result.failed}")
        emit(benchmark="plans", **plans_summary(result.plans))
        return
    with PeakRss() as main_rss:
        t0 = time.perf_counter()
        plan = prun.plan_and_preprocess(did, preset=preset, num_processes=nproc, plan_only=True, overwrite=True,
                                        progress=False)
        plan_s = time.perf_counter() - t0
        info = load_dataset(raw_dataset_dir(did))
        cases = info.training_cases()
        folder = storage.data_dir(plan.out_dir)
        t1 = time.perf_counter()
        result = prun.preprocess_cases(cases, plan.plans, folder, nproc, overwrite=True, progress=False)
        pre_s = time.perf_counter() - t1
    if result.failed:
        raise HCError(f"preprocessing failed: {result.failed}")
    workers_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    fp = fpmod.load_fingerprint(Path(plan.out_dir) / fpmod.FINGERPRINT_FILE)
    sizes = {r["case_id"]: r.get("size_xyz") for r in fp.get("cases", [])}
    secs = result.seconds
    emit(benchmark="preprocessing", what="per case", workers=nproc, cases=len(secs),
         seconds_per_case_mean=_round(np.mean(list(secs.values())), 2),
         seconds_per_case_max=_round(max(secs.values()), 2),
         seconds={k: _round(v, 2) for k, v in sorted(secs.items())},
         size_xyz={k: sizes.get(k) for k in sorted(secs)},
         predicted_case_seconds=_round(secs.get(case.case_id, float("nan")), 2),
         preprocess_wall_s=_round(pre_s, 2), fingerprint_and_plan_s=_round(plan_s, 2),
         worker_peak_rss_gb=gb(workers_rss) if nproc > 1 and len(secs) > 1 else None,
         main_peak_rss_gb=gb(main_rss.peak), rss_method=main_rss.method)
    emit(benchmark="plans", **plans_summary(plan.plans))


# ---------------------------------------------------------------------------------------------------
# a model folder with a freshly initialised cascade


def section_model(p: dict[str, Any], emit: Emit) -> None:
    """``<results>/DatasetXXX/cascade/fold_0/checkpoint_final.pth`` with freshly initialised networks
    (the checkpoint contract of documentation/conventions.md), plus plans.json and dataset.json."""
    case = _case(p)
    plans = _load_plans(case)
    folder = Path(p["model_dir"]) / "fold_0"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(int(p.get("seed", 0)))
    nets = from_plans.build_networks("cascade", plans)
    state = {"format_version": FORMAT_VERSION, "configuration": "cascade", "plans": plans.to_dict(),
             "networks": {k: v.state_dict() for k, v in nets.items()}, "kind": "final", "finished": True,
             "note": "freshly initialised by hc_benchmark (untrained)"}
    save_checkpoint(folder / "checkpoint_final.pth", state)
    atomic_write_json(folder / "plans.json", plans.to_dict())
    shutil.copyfile(_pre_dir(case) / "dataset.json", folder / "dataset.json")
    emit(benchmark="model", model_dir=str(folder.parent),
         parameters={k: int(sum(q.numel() for q in v.parameters())) for k, v in nets.items()})


# ---------------------------------------------------------------------------------------------------
# memory model: planner prediction vs measurement


def shrink_to_fit(shape: Sequence[int], predict: Callable[[list[int]], float], limit: float,
                  mins: Sequence[int], multiples: Sequence[int], fixed: Sequence[int] = ()) -> list[int]:
    """Shrink the largest free axis by ~25% (keeping multiples/minimums) until ``predict(shape) <= limit``."""
    shape = [int(s) for s in shape]
    for _ in range(200):
        if predict(shape) <= limit:
            break
        free = [i for i in range(len(shape)) if i not in fixed and shape[i] > mins[i]]
        if not free:
            break
        i = max(free, key=lambda a: shape[a])
        new = max(int(mins[i]), int(shape[i] * 0.75) // multiples[i] * multiples[i])
        if new >= shape[i]:
            new = max(int(mins[i]), shape[i] - multiples[i])
        shape[i] = new
    return shape


def section_memory(p: dict[str, Any], emit: Emit) -> None:
    """memory_model.check_net1/check_cascade/check_net2 on the plans' networks and step shapes.

    On a GPU the plans' own shapes and batch sizes are measured (``torch.cuda.max_memory_allocated``). On
    the CPU (profiler allocation trace) a shape whose predicted CPU peak exceeds ``memory_check_max_gb`` is
    shrunk until it fits (``scaled: true`` in the record) -- a full-size check would be a multi-GB,
    multi-minute training step.
    """
    case = _case(p)
    device = _device(p["device"])
    backend = "cuda" if device.type == "cuda" else "cpu"
    plans = _load_plans(case)
    n1, n2 = net1_kwargs(plans), net2_kwargs(plans)
    n1["dilations"] = [d if isinstance(d, int) else tuple(d) for d in n1["dilations"]]
    mode = cascade_kwargs(plans)["input_mode"]
    props = storage.load_properties(storage.data_dir(_pre_dir(case)), case.case_id)
    factors = [float(f) for f in props["coarse_scale_factors"]]
    K, d2 = int(n2["K"]), plans.net2.required_divisor
    limit = float("inf") if backend == "cuda" else float(p["memory_check_max_gb"])
    s1, s2, s3, s4 = plans.training.steps  # the plans' own step entries (steps 1..4, validated)
    largest = lambda shapes: max((list(s) for s in shapes), key=lambda s: int(np.prod(s)))  # noqa: E731
    checks = [
        ("step1 net1 whole coarse volume", "net1", s1.batch_size, list(s1.patch_shape), s1),
        ("step2 net1 largest coarse subvolume", "net1", s2.batch_size, largest(s2.coarse_patch_shapes), s2),
        ("step3 cascade largest subvolume", "cascade", s3.batch_size, largest(s3.subvolume_shapes), s3),
        ("step4 net2 slice stack", "net2", s4.batch_size, list(s4.stack_shape), s4),
    ]
    for name, kind, batch, plan_shape, st in checks:
        if kind == "net1":
            pred = lambda s: mm.net1_memory(n1, batch, s, True, backend).peak_gb  # noqa: E731
            shape = shrink_to_fit(plan_shape, pred, limit, [16] * 3, [16] * 3)
        elif kind == "net2":
            pred = lambda s: mm.net2_memory(n2, batch, s, True, backend).peak_gb  # noqa: E731
            shape = shrink_to_fit(plan_shape, pred, limit, [K, d2, d2], [1, d2, d2], fixed=(0,))
        else:
            pred = lambda s: mm.cascade_memory(n1, n2, mode, batch, s, factors, True, backend).peak_gb  # noqa: E731
            shape = shrink_to_fit(plan_shape, pred, limit, [K, d2, d2], [1, d2, d2])
        t = time.perf_counter()
        if kind == "net1":
            r = mm.check_net1(n1, batch, shape, str(device))
        elif kind == "net2":
            r = mm.check_net2(n2, batch, shape, str(device))
        else:
            r = mm.check_cascade(n1, n2, mode, batch, shape, factors, str(device))
        emit(benchmark="memory_model", step=name, batch_size=batch, shape=shape, plan_shape=plan_shape,
             scaled=shape != plan_shape, predicted_gb=_round(r["predicted_gb"], 4), measured_gb=_round(r["measured_gb"], 4),
             ratio=_round(r["ratio"], 3), plans_predicted_peak_gb=plans.report.step_peak_gb(st),
             measured_with="torch.cuda.max_memory_allocated" if backend == "cuda" else "CPU profiler allocation trace",
             seconds=_round(time.perf_counter() - t, 1))
        gc.collect()


# ---------------------------------------------------------------------------------------------------
# loader throughput and training step time


def _collect(stream, n: int) -> list[dict[str, Any]]:
    return [next(stream) for _ in range(n)]


def section_training(p: dict[str, Any], emit: Emit) -> None:
    """Per curriculum step: loader batches/s (``loader``) and the time of a training iteration (``training``).

    Uses the trainer's own loaders, augmenter stream and iteration (forward, losses, backward, Adam) on a
    freshly initialised cascade built from the plans. Batches for the timed iterations are drawn first,
    so the step time excludes waiting for data (compare it with the loader's rate: ``outpaces``); they
    stay in memory meanwhile and are part of ``peak_rss_gb`` (``held_batches_gb`` says how much).
    """
    case = _case(p)
    want_loader, want_training = bool(p["loader"]), bool(p["training"])
    warmup, iters = int(p["train_warmup"]), int(p["train_iterations"])
    n_batches, loader_warmup = int(p["loader_batches"]), int(p["loader_warmup"])
    compiled = bool(p.get("compile"))
    # --amp overrides the plans' setting through the trainer's own override, so the iteration is unchanged
    override = {"amp": p["amp"]} if p.get("amp") else None
    try:
        trainer = Trainer(case.dataset_id, p.get("fold", "0"), configuration="cascade", device=p["device"],
                          progress=False, num_workers=p.get("workers"), predict_validation=False,
                          output_folder=Path(p["work"]) / "training" / case.name, seed=int(p.get("seed", 0)),
                          compile=compiled, plans_override=override)
        trainer.setup()
        step_names = [s for s in trainer.step_names if not p.get("steps") or s in p["steps"]]
    except AttributeError as exc:  # pragma: no cover - the public seams are tested with the trainer
        raise HCError(f"the Trainer API the benchmark uses changed ({exc}); update heartcascade/benchmark/sections.py")
    device = trainer.device
    workers = trainer.num_workers
    budget = mem_available_bytes()
    for step_name in step_names:
        st = trainer.steps[step_name]
        base = dict(case=case.name, step=step_name, input=st.input, batch_size=st.batch_size,
                    patch_shapes=[list(s) for s in st.shapes] if st.shapes else None)
        predicted = trainer.plans.report.step_peak_gb(st)
        too_big = (device.type == "cpu" and predicted is not None and budget is not None
                   and predicted * GiB > 0.8 * budget)
        precompute_s = None
        if st.input == "slice_stacks" and not too_big:
            t = time.perf_counter()
            trainer.prepare_step(step_name)
            precompute_s = time.perf_counter() - t
        batches: list[dict[str, Any]] = []
        if want_loader:
            loader = trainer.build_loader(step_name)
            n_local = max(2, min(5, n_batches))
            t = time.perf_counter()
            for _ in range(n_local):
                loader.generate_train_batch()
            sample_ms = 1000 * (time.perf_counter() - t) / n_local
            stream = BatchStream(trainer.build_loader(step_name), trainer.plans.augmentation, workers)
            try:
                _collect(stream, loader_warmup)
                t = time.perf_counter()
                got = _collect(stream, n_batches)
                rate = n_batches / (time.perf_counter() - t)
                if want_training and not too_big:
                    batches = got[:warmup + iters] + _collect(stream, max(0, warmup + iters - len(got)))
                del got  # only the batches of the timed iterations stay in memory
            finally:
                stream.close()
            emit(benchmark="loader", **base, workers=workers, batches_per_s=_round(rate, 2),
                 sample_ms_in_process=_round(sample_ms, 1), batches_timed=n_batches)
        else:
            rate = None
        if not want_training:
            _release(trainer, step_name)
            continue
        if too_big:
            emit(benchmark="training_step", **base, skipped=f"predicted peak {predicted:.1f} GB exceeds 80% of the "
                                                            f"{budget / GiB:.1f} GB available")
            _release(trainer, step_name)
            continue
        if not batches:
            stream = BatchStream(trainer.build_loader(step_name), trainer.plans.augmentation, workers)
            try:
                batches = _collect(stream, warmup + iters)
            finally:
                stream.close()
        training = trainer.build_optimizer(step_name)  # the trainer's Adam (lr, weight decay) and AMP scaler
        times, shapes = [], []
        held = sum(int(np.asarray(v).nbytes) for b in batches for v in b.values() if isinstance(v, np.ndarray))
        gc.collect()
        with PeakRss() as rss:
            gpu_reset(device)
            for batch in batches:
                _sync(device)
                t = time.perf_counter()
                trainer.train_step(step_name, batch)
                _sync(device)
                times.append(time.perf_counter() - t)
                shapes.append(list(np.asarray(batch["data"]).shape[2:]))
            gpu = gpu_peaks(device)
        timed = times[warmup:]
        emit(benchmark="training_step", **base, warmup_iterations=warmup, timed_iterations=len(timed),
             step_s=_round(np.mean(timed), 3) if timed else None, step_s_each=[_round(v, 3) for v in timed],
             warmup_s=[_round(v, 3) for v in times[:warmup]], input_shapes=shapes[warmup:],
             net1_precompute_s=None if precompute_s is None else _round(precompute_s, 2),
             loader_batches_per_s=None if rate is None else _round(rate, 2),
             outpaces=None if (rate is None or not timed) else bool(rate * float(np.mean(timed)) >= 1.0),
             peak_rss_gb=gb(rss.peak), held_batches_gb=gb(held), **gpu, plans_predicted_peak_gb=predicted,
             amp=trainer.plans.amp if device.type == "cuda" else "off", compile=compiled)
        del training, batches
        _release(trainer, step_name)


def _release(trainer, step_name: str) -> None:
    trainer.release_step(step_name)
    gc.collect()


# ---------------------------------------------------------------------------------------------------
# in-process prediction


def section_inprocess(p: dict[str, Any], emit: Emit) -> None:
    """Predictor.from_model_dir → read → preprocess → predict_preprocessed → write, each timed.

    ``predict_s`` = preprocess + predict_preprocessed: the in-process seconds without file I/O.
    On CUDA one untimed warm-up prediction runs first (cuDNN algorithm choice, allocator growth).
    """
    case = _case(p)
    tune_host_allocator()  # as hc_predict does
    roi_mode = p["roi"]
    roi_rule = None
    if roi_mode == "reference":
        roi_rule = ReferenceBoxRoi.from_file(case.reference_label)
    t = time.perf_counter()
    predictor = Predictor.from_model_dir(p["model_dir"], device=p["device"], tta=False, roi_rule=roi_rule)
    load_s = time.perf_counter() - t
    device = predictor.device
    plans = predictor.plans
    repeats = max(1, int(p.get("repeats", 1)))
    if device.type == "cuda":
        images = [image_io.read_image(case.predict_input)]
        image, props = predictor.preprocess(images, case.case_id)
        predictor.predict_preprocessed(image, props)
        del images, image
        torch.cuda.empty_cache()
    for r in range(repeats):
        gc.collect()
        with PeakRss() as rss:
            gpu_reset(device)
            t0 = time.perf_counter()
            images = [image_io.read_image(case.predict_input)]
            geometry = Geometry.of(images[0])
            t1 = time.perf_counter()
            image, props = predictor.preprocess(images, case.case_id)
            del images
            t2 = time.perf_counter()
            result = predictor.predict_preprocessed(image, props)
            _sync(device)
            t3 = time.perf_counter()
            gpu = gpu_peaks(device)
            labels = predictor.apply_codes(result.labels)
            out = Path(p["output_dir"]) / f"{case.case_id}_inprocess.nii.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            image_io.write_array(labels, geometry, out, reference=case.predict_input)
            t4 = time.perf_counter()
        roi = [list(b) for b in result.roi_box]
        shape = [int(n) for n in props["shape"]]
        emit(benchmark="predict_inprocess", roi=roi_mode, repeat=r, read_s=_round(t1 - t0, 2),
             preprocess_s=_round(t2 - t1, 2), predict_preprocessed_s=_round(t3 - t2, 2),
             predict_s=_round(t3 - t1, 2), write_s=_round(t4 - t3, 2), file_to_file_s=_round(t4 - t0, 2),
             model_load_s=_round(load_s, 2), timings={k: _round(v, 2) for k, v in result.timings.items()},
             preprocessed_shape=shape, roi_box=roi, roi_shape=[b - a for a, b in roi],
             roi_fraction=_round(np.prod([b - a for a, b in roi]) / max(1, np.prod(shape)), 3),
             z_chunk=getattr(predictor, "last_z_chunk", None), peak_rss_gb=gb(rss.peak), rss_method=rss.method,
             **gpu, plans_predicted_inference_peak_gb=plans.report.predicted_peak_gb("inference"),
             output=str(out))
        del result, labels, image


SECTIONS: dict[str, Callable[[dict[str, Any], Emit], None]] = {
    "dataset": section_dataset,
    "preprocessing": section_preprocessing,
    "model": section_model,
    "memory": section_memory,
    "training": section_training,
    "inprocess": section_inprocess,
}
