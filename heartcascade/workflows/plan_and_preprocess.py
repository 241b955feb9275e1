"""The plan-and-preprocess driver: fingerprint -> plans -> preprocessed cases, in worker processes.

Output, under ``HC_PREPROCESSED/DatasetXXX_Name/``::

    dataset.json                 copy of the raw dataset's
    dataset_fingerprint.json     planning/fingerprint.py
    plans.json                   planning/planner.py
    data/<case files>            preprocessing/storage.py

Re-running is cheap: the fingerprint is reused while the raw files are unchanged, an existing
``plans.json`` is kept (hand edits survive, and a warning names what its preset now plans differently) unless
``--overwrite`` or a different ``--preset`` / ``--gpu-memory-gb`` is given, and a case is skipped when its stored stamp (hash of the plans fields that
preprocessing depends on + size and mtime of its input files) matches. A case that fails is reported by
name; the others go on and the run ends with a non-zero status.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from heartcascade import paths
from heartcascade.dataset import image_io
from heartcascade.dataset.dataset_json import Case, DatasetInfo, load_dataset
from heartcascade.planning import fingerprint as fpmod
from heartcascade.planning import planner, presets
from heartcascade.planning.plans import (Plans, load_plans, parse_plans, plans_path, preprocess_settings,
                                         preprocessing_hash, save_plans, settings_differences)
from heartcascade.preprocessing import storage
from heartcascade.preprocessing.preprocess import preprocess_case, read_images
from heartcascade.utils.atomic import atomic_path, ensure_writable_dir
from heartcascade.utils.errors import HCError
from heartcascade.utils.progress import bars_enabled, progress_bar
from heartcascade.utils.run_lock import describe, live_holder, run_lock


@dataclass
class RunResult:
    """What a run did (the CLI prints it; tests inspect it)."""

    out_dir: Path
    plans: Plans
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def default_num_processes() -> int:
    return max(1, min(os.cpu_count() or 1, 4))


def case_stamp(case: Case, plans_hash: str) -> dict[str, Any]:
    return {"plans_hash": plans_hash, "inputs": fpmod.case_stamp(case)}


def case_is_current(folder: Path, case: Case, stamp: dict[str, Any]) -> bool:
    props_path = storage.case_files(folder, case.case_id)["properties"]
    if not props_path.is_file():
        return False
    try:
        props = storage.load_properties(folder, case.case_id)
    except HCError:
        return False
    if props.get("stamp") != stamp:
        return False
    return storage.damaged_files(folder, case.case_id) == []


def _process_one(job: tuple) -> tuple[str, str | None, float]:
    """Worker: preprocess and save one case; returns (case id, error message or None, seconds)."""
    case, settings, folder, stamp = job
    start = time.perf_counter()
    try:
        images = read_images(case.images)
        label = image_io.read_image(case.label) if case.label is not None else None
        result = preprocess_case(images, settings, label, case.case_id)
        del images, label
        result.properties["stamp"] = stamp
        storage.save_case(folder, case.case_id, result)
        return case.case_id, None, time.perf_counter() - start
    except HCError as exc:
        return case.case_id, str(exc), time.perf_counter() - start
    except MemoryError:
        return case.case_id, "out of memory (try fewer worker processes, -np)", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - a bad case must not stop the others
        return case.case_id, f"{type(exc).__name__}: {exc}", time.perf_counter() - start


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def preprocess_cases(cases: list[Case], plans: Plans, folder: Path, num_processes: int = 1,
                     overwrite: bool = False, progress: bool = True, result: RunResult | None = None) -> RunResult:
    """Preprocess ``cases`` into ``folder`` (skipping current ones unless ``overwrite``)."""
    result = result or RunResult(folder.parent, plans)
    folder.mkdir(parents=True, exist_ok=True)
    h = preprocessing_hash(plans)
    settings = preprocess_settings(plans)
    jobs = []
    for case in cases:
        stamp = case_stamp(case, h)
        if not overwrite and case_is_current(folder, case, stamp):
            result.skipped.append(case.case_id)
        else:
            jobs.append((case, settings, folder, stamp))

    bar = progress_bar(total=len(jobs), desc="preprocess", unit="case") if bars_enabled(progress) and jobs else None

    def record(cid: str, err: str | None, secs: float) -> None:
        result.seconds[cid] = secs
        if err is None:
            result.processed.append(cid)
        else:
            result.failed[cid] = err
            msg = f"error: case {cid}: {err}"
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr)
        if bar is not None:
            bar.update()

    if num_processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            record(*_process_one(job))
    else:
        threads = max(1, (os.cpu_count() or 1) // num_processes)
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(num_processes, len(jobs)), initializer=_init_worker, initargs=(threads,),
                      maxtasksperchild=8) as pool:
            for out in pool.imap_unordered(_process_one, jobs):
                record(*out)
    if bar is not None:
        bar.close()
    return result


def _copy_dataset_json(info: DatasetInfo, out_dir: Path) -> None:
    with atomic_path(out_dir / "dataset.json") as tmp:
        shutil.copyfile(info.folder / "dataset.json", tmp)


def _remove_stale(folder: Path, keep: set[str]) -> list[str]:
    stale = [cid for cid in storage.list_cases(folder) if cid not in keep]
    for cid in stale:
        storage.remove_case(folder, cid)
    return stale


def make_plans(info: DatasetInfo, out_dir: Path, dataset_id: int, preset_name: str | None,
               gpu_memory_gb: float | None, num_processes: int, overwrite: bool, progress: bool,
               machine: str | None = None) -> Plans:
    """Fingerprint (reused when current) and plans (reused unless overwrite or different arguments)."""
    preset = presets.load_preset(preset_name or presets.DEFAULT_PRESET)  # fail early on a bad name
    fingerprint = fpmod.get_fingerprint(info, out_dir, num_processes, overwrite, progress)
    path = plans_path(out_dir)
    if path.is_file() and not overwrite:
        try:
            existing = load_plans(path)
        except HCError as exc:  # never replace a (hand-edited) plan silently by one of another preset
            raise HCError(f"{exc}; re-plan with 'hc_plan_and_preprocess -d {dataset_id} --overwrite"
                          f"{' --preset ' + preset_name if preset_name else ''}' (this preprocesses every case "
                          f"again) or restore the file") from None
        same_preset = preset_name is None or existing.report.preset == preset.get("name")
        same_memory = gpu_memory_gb is None or abs(existing.report.memory.target_gb - gpu_memory_gb) < 1e-6
        same_machine = machine is None or existing.report.machine.kind == machine
        if same_preset and same_memory and same_machine:
            _warn_if_preset_changed(existing, path, info, fingerprint, dataset_id)
            return existing
    return save_plans(path, planner.plan_experiment(fingerprint, preset, info, dataset_id, gpu_memory_gb, machine))


def _warn_if_preset_changed(existing: Plans, path: Path, info: DatasetInfo, fingerprint: dict,
                            dataset_id: int) -> None:
    """A kept plans file is not silently stale: after an upgrade (or a preset edit) say which settings the
    same preset now plans differently (a hand edit shows up here too, and is kept)."""
    try:  # the kept plans stand on their own: a preset that is gone or no longer plans only skips the warning
        fresh = parse_plans(planner.plan_experiment(fingerprint, presets.load_preset(existing.report.preset), info,
                                                    dataset_id, existing.report.memory.target_gb,
                                                    existing.report.machine.kind), "re-planned")
    except HCError:
        return
    changed = settings_differences(existing, fresh)
    if changed:
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        print(f"warning: {path}: kept (hand edits survive), but preset '{existing.report.preset}' now plans "
              f"{', '.join(changed[:6])}{more} differently; re-plan with 'hc_plan_and_preprocess -d {dataset_id} "
              "--overwrite' to take them", file=sys.stderr)


def plan_and_preprocess(dataset_id: int | str, gpu_memory_gb: float | None = None, preset: str | None = None,
                        num_processes: int | None = None, plan_only: bool = False, overwrite: bool = False,
                        progress: bool = True, machine: str | None = None) -> RunResult:
    """The whole command (see module docstring)."""
    num = paths.parse_dataset_id(dataset_id)
    info = load_dataset(paths.raw_dataset_dir(num))
    unpaired = info.unpaired_training_files()
    if unpaired:  # every training case is preprocessed, or the run says which one is not
        more = f" (and {len(unpaired) - 1} more such file(s))" if len(unpaired) > 1 else ""
        raise HCError(unpaired[0] + more)
    out_dir = paths.preprocessed_root() / info.folder.name
    ensure_writable_dir(out_dir, "preprocessed dataset folder")
    with run_lock(out_dir, "hc_plan_and_preprocess"):
        check_no_training(out_dir)
        return _plan_and_preprocess(info, out_dir, num, gpu_memory_gb, preset, num_processes, plan_only, overwrite,
                                    progress, machine)


def check_no_training(out_dir: Path) -> None:
    """Refuse to rewrite plans or arrays that a running training of this dataset reads (its fold locks,
    utils/run_lock.py, under ``HC_RESULTS/<dataset>/<configuration>/``)."""
    results = paths.results_root() / out_dir.name
    for lock in sorted(results.glob("*/.fold_*.lock")) if results.is_dir() else []:
        holder = live_holder(lock.parent / lock.name[1:-len(".lock")])
        if holder is not None:
            raise HCError(f"{out_dir}: a training of this dataset reads it ({describe(holder)}); re-plan or "
                          "preprocess when it has finished")


def _plan_and_preprocess(info: DatasetInfo, out_dir: Path, num: int, gpu_memory_gb: float | None,
                         preset: str | None, num_processes: int | None, plan_only: bool, overwrite: bool,
                         progress: bool, machine: str | None) -> RunResult:
    num_processes = num_processes or default_num_processes()
    _copy_dataset_json(info, out_dir)
    plans = make_plans(info, out_dir, num, preset, gpu_memory_gb, num_processes, overwrite, progress, machine)
    result = RunResult(out_dir, plans)
    cases = info.training_cases()
    fingerprint = fpmod.load_fingerprint(out_dir / fpmod.FINGERPRINT_FILE)
    excluded = {cid: f"{entry['error']}" for cid, entry in (fingerprint.get("failed_cases") or {}).items()}
    small = fpmod.excluded_cases(fingerprint, plans.net2.K)
    for case in cases:  # refused, named once, and kept out of the data folder (training never sees them)
        if case.case_id in small:
            excluded[case.case_id] = f"{case.images[0]}: {small[case.case_id]}; remove the case from the dataset"
        if case.case_id in excluded:
            result.failed[case.case_id] = excluded[case.case_id]
            print(f"error: case {case.case_id}: {excluded[case.case_id]}", file=sys.stderr)
    if plan_only:
        return result
    folder = storage.data_dir(out_dir)
    _remove_stale(folder, {c.case_id for c in cases if c.case_id not in excluded})
    cases = [c for c in cases if c.case_id not in excluded]
    return preprocess_cases(cases, plans, folder, num_processes, overwrite, progress, result)
