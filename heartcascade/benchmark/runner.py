"""``hc_benchmark``: speed and memory of every stage, as JSON lines (see documentation/benchmarks.md).

Flow per case (``ct``: full-size 512x512x239 CT synthesised around a real MM-WHS label map, ``mr``: an
MS-CMRSeg bSSFP case; ``--quick``: small synthetic cases) -- every section in a fresh worker process
(:mod:`heartcascade.benchmark.worker`) so its peak memory is its own:

1. ``dataset``: build the raw dataset in the benchmark's own data roots (``<work>/raw``, reused when current);
2. ``preprocessing``: fingerprint + plans (real planner, ``--preset``) and every case preprocessed by the
   real driver, timed;
3. ``model``: a freshly initialised cascade from the plans saved as ``checkpoint_final.pth``;
4. ``memory``: the planner's memory model vs measured peaks (``memory_model.check_*``);
5. ``loader`` / ``training``: the trainer's loaders (batches/s) and iterations (seconds per step);
6. ``predict``: the ``hc_predict`` command, file to file, as a child process: wall time and peak RSS;
7. ``inprocess``: ``Predictor`` in-process: seconds per phase, peak RSS, peak GPU memory;
8. ``nnunet`` (``--compare-nnunet``): nnU-Net v2 on the same volume, see :mod:`.nnunet_compare`.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from heartcascade.benchmark.data import BenchCase
from heartcascade.benchmark.jsonlines import json_records
from heartcascade.benchmark.memory import ChildRun, gb, mem_available_bytes, run_measured
from heartcascade.utils.errors import HCError

REPO = Path(__file__).resolve().parents[2]
SECTION_NAMES = ("preprocessing", "memory", "loader", "training", "predict", "inprocess", "nnunet")
CASE_NAMES = ("ct", "mr")
# issue 8, CPU (2 cores): hc_predict file to file for the 512x512x239 CT
TARGET_CPU_PREDICT_S = 180.0
TARGET_CPU_PREDICT_RSS_GB = 4.0


def default_shared_data() -> Path:
    env = os.environ.get("HC_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@dataclass
class Options:
    device: str = "auto"
    cases: list[str] = field(default_factory=lambda: list(CASE_NAMES))
    shared_data: Path | None = None
    work: Path | None = None
    preset: str | None = None          # default: paper (demo with --quick)
    quick: bool = False
    compare_nnunet: bool = False
    nnunet_python: str | None = None
    skip: set[str] = field(default_factory=set)
    roi: str | None = None             # reference | net1 | both (default: reference; both with --quick)
    train_iterations: int | None = None
    train_warmup: int = 1
    amp: str | None = None             # bf16 | fp16 | none overrides the plans' amp (None: the plans')
    compile: bool = False              # torch.compile the trained networks, as hc_train --compile
    train_steps: list[str] | None = None
    loader_batches: int | None = None
    repeats: int = 1
    memory_check_max_gb: float = 1.5
    num_processes: int | None = None   # preprocessing workers (default 2; 1 with --quick)
    workers: int | None = None
    timeout_s: float = 3 * 3600
    seed: int = 0


def resolve_device_name(name: str) -> str:
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HCError(f"--device {name}: no CUDA device is available to torch {torch.__version__} (use cpu or auto)")
    if name != "cpu" and not name.startswith("cuda"):
        raise HCError(f"--device must be cpu, cuda or auto, got {name!r}")
    return name


def environment(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "torch_threads": torch.get_num_threads(), "mem_total_gb": None,
                            "mem_available_gb": gb(mem_available_bytes()), "cpu_model": None}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    info["mem_total_gb"] = round(int(line.split()[1]) / 1024 ** 2, 1)
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1024 ** 3, 1)
        info["cuda"] = torch.version.cuda
    try:
        import subprocess

        info["git_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def _hc_predict_command() -> tuple[list[str], str]:
    exe = Path(sys.executable).parent / "hc_predict"
    if exe.is_file():
        return [str(exe)], "hc_predict console script"
    found = shutil.which("hc_predict")
    if found:
        return [found], "hc_predict console script"
    return [sys.executable, "-m", "heartcascade.cli.predict"], "python -m heartcascade.cli.predict"


def _gpu_peak_line(stderr: str) -> dict[str, Any]:
    """The peak GPU memory :mod:`.predict_child` reports on stderr ({} when it did not use CUDA)."""
    from heartcascade.benchmark.predict_child import GPU_PEAK_TAG

    for line in reversed(stderr.splitlines()):
        if line.startswith(GPU_PEAK_TAG):
            try:
                return dict(json.loads(line[len(GPU_PEAK_TAG):]))
            except ValueError:
                return {}
    return {}


class Runner:
    def __init__(self, options: Options, out: Callable[[str], None] | None = None) -> None:
        import torch

        self.o = options
        self.out = out or (lambda line: print(line, flush=True))
        self.device = resolve_device_name(options.device)
        self.torch_version = str(torch.__version__)
        self.cpus = os.cpu_count() or 1
        self.preset = options.preset or ("demo" if options.quick else "paper")
        self.roi_modes = {"reference": ["reference"], "net1": ["net1"], "both": ["reference", "net1"]}[
            options.roi or ("both" if options.quick else "reference")]
        self.records: list[dict[str, Any]] = []
        self.failures = 0

    # -- output ---------------------------------------------------------------------------------
    def emit(self, benchmark: str, case: str | None = None, **values: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"benchmark": benchmark, "case": case, "device": self.device}
        record.update(values)
        record.update({"torch": self.torch_version, "cpus": self.cpus,
                       "loadavg": [round(v, 2) for v in os.getloadavg()], "quick": self.o.quick,
                       "preset": self.preset})
        self.records.append(record)
        if "error" in record:
            self.failures += 1
        self.out(json.dumps(record))
        return record

    # -- running sections ---------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"HC_RAW": str(self.work / "raw"), "HC_PREPROCESSED": str(self.work / "preprocessed"),
                    "HC_RESULTS": str(self.work / "results")})
        return env

    def section(self, name: str, case_name: str, sections: list[str] | None = None,
                **params: Any) -> list[dict[str, Any]]:
        """Run section ``name`` (or ``sections``, in order, in the same process) in a worker process."""
        job = {"section": name, "sections": sections, "device": self.device, "preset": self.preset,
               "quick": self.o.quick, "work": str(self.work), "seed": self.o.seed, "case_name": case_name, **params}
        jobs = self.work / "jobs"
        jobs.mkdir(parents=True, exist_ok=True)
        path = jobs / f"{case_name}_{name}.json"
        path.write_text(json.dumps(job, default=str))
        run = run_measured([sys.executable, "-m", "heartcascade.benchmark.worker", str(path)], env=self._env(),
                           timeout=self.o.timeout_s)
        records = json_records(run.stdout)
        if run.timed_out:
            records.append({"benchmark": name, "error": f"timed out after {self.o.timeout_s:.0f} s"})
        elif run.returncode != 0 and not any("error" in r for r in records):
            tail = " | ".join(run.stderr.strip().splitlines()[-3:])
            records.append({"benchmark": name, "error": f"worker exited with status {run.returncode}: {tail[-400:]}"})
        if run.returncode != 0:
            (self.work / "logs").mkdir(exist_ok=True)
            (self.work / "logs" / f"{case_name}_{name}.stderr.txt").write_text(run.stderr)
        out = []
        for rec in records:
            bench = rec.pop("benchmark", name)
            rec.pop("case", None)
            # whole worker tree, sampled (ru_maxrss is no use here: the sections reset the peak per measurement)
            rec.setdefault("worker_tree_peak_rss_sampled_gb", gb(run.sampled_peak_bytes))
            out.append(self.emit(bench, case_name, **rec))
        return out

    # -- hc_predict as a child process --------------------------------------------------------
    def predict_cli(self, case: BenchCase, model_dir: Path, roi: str) -> dict[str, Any]:
        out_dir = self.work / "predictions" / f"{case.name}_cli_{roi}"
        if out_dir.exists():
            shutil.rmtree(out_dir)
        args = ["-i", case.predict_input, "-o", str(out_dir), "-m", str(model_dir), "--device", self.device,
                "--overwrite"]
        if roi == "reference":
            cmd = [sys.executable, "-m", "heartcascade.benchmark.predict_child", "--reference-label",
                   case.reference_label, "--"] + args
            how = "heartcascade.cli.predict.main (hc_predict's code) with the ROI pinned to the reference heart box"
        else:
            base, how = _hc_predict_command()
            cmd = base + args
            how += " (ROI from the untrained Net1)"
        run: ChildRun = run_measured(cmd, env=self._env(), timeout=self.o.timeout_s)
        outputs = sorted(out_dir.glob("*.nii*")) if out_dir.is_dir() else []
        m = re.search(r"predicted in ([0-9.]+) s", run.stdout + run.stderr)
        gpu = _gpu_peak_line(run.stderr)
        values: dict[str, Any] = {
            "roi": roi, "how": how, "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "wall_s": round(run.wall_s, 2), "peak_rss_gb": gb(run.peak_rss_bytes),
            "tree_peak_rss_sampled_gb": gb(run.sampled_peak_bytes), "user_s": round(run.user_s, 1),
            "sys_s": round(run.sys_s, 1), "cpu_utilisation": round((run.user_s + run.sys_s) / max(run.wall_s, 1e-9), 2),
            "predictor_case_s": float(m.group(1)) if m else None, "returncode": run.returncode,
            "output": str(outputs[0]) if outputs else None, "input_size_xyz": case.size_xyz,
            # whole child process, CUDA only; not known for the unchanged console script (--roi net1)
            "gpu_peak_allocated_gb": gpu.get("gpu_peak_allocated_gb"),
            "gpu_peak_reserved_gb": gpu.get("gpu_peak_reserved_gb"),
        }
        if run.timed_out:
            values["error"] = f"timed out after {self.o.timeout_s:.0f} s"
        elif run.returncode != 0 or not outputs:
            tail = " | ".join((run.stderr or run.stdout).strip().splitlines()[-3:])
            values["error"] = f"hc_predict failed (status {run.returncode}): {tail[-400:]}"
        if case.name == "ct" and not self.o.quick and self.device == "cpu":
            values.update(target_wall_s=TARGET_CPU_PREDICT_S, target_peak_rss_gb=TARGET_CPU_PREDICT_RSS_GB,
                          meets_wall_target=run.wall_s <= TARGET_CPU_PREDICT_S,
                          meets_rss_target=(run.peak_rss_bytes / 1024 ** 3) <= TARGET_CPU_PREDICT_RSS_GB)
        return self.emit("predict_cli", case.name, **values)

    # -- nnU-Net ----------------------------------------------------------------------------------
    def nnunet(self, case: BenchCase, ours: dict[str, Any] | None) -> None:
        from heartcascade.benchmark import nnunet_compare

        python = self.o.nnunet_python or sys.executable
        work = self.work / "nnunet" / case.name
        records = nnunet_compare.run_child(python, case, work, self.device, self._env(), self.o.timeout_s)
        for rec in records:
            rec.pop("case", None)
            bench = rec.pop("benchmark", "nnunet")
            if bench == "nnunet_predict" and ours and rec.get("predict_s") and ours.get("predict_preprocessed_s"):
                rec["heartcascade_predict_preprocessed_s"] = ours["predict_preprocessed_s"]
                rec["heartcascade_roi"] = ours.get("roi")
                rec["ratio_nnunet_over_heartcascade"] = round(rec["predict_s"] / ours["predict_preprocessed_s"], 2)
            self.emit(bench, case.name, **rec)

    # -- everything -----------------------------------------------------------------------------
    def run(self) -> int:
        o = self.o
        t_start = time.perf_counter()
        tmp = None
        if o.work is None:
            tmp = tempfile.TemporaryDirectory(prefix="hc_benchmark_")
            self.work = Path(tmp.name)
        else:
            self.work = Path(o.work).resolve()
            self.work.mkdir(parents=True, exist_ok=True)
        try:
            shared = Path(o.shared_data) if o.shared_data else default_shared_data()
            self.emit("environment", None, work=str(self.work), shared_data=str(shared),
                      roi_modes=self.roi_modes, skip=sorted(o.skip), amp=o.amp or "plans", compile=o.compile,
                      **environment(self.device))
            for name in o.cases:
                self.run_case(name, shared)
            self.emit("summary", None, wall_s=round(time.perf_counter() - t_start, 1), failures=self.failures,
                      records=len(self.records))
        finally:
            if tmp is not None:
                tmp.cleanup()
        return 1 if self.failures else 0

    def run_case(self, name: str, shared: Path) -> None:
        o, skip = self.o, self.o.skip
        # dataset -> preprocessing -> model in one worker (each section measures its own peak RSS)
        model_dir = self.work / "models" / name / "cascade"
        need_model = not {"predict", "inprocess"} <= skip or ("nnunet" not in skip and o.compare_nnunet)
        prepare = ["dataset", "preprocessing"] + (["model"] if need_model else [])
        got = self.section("prepare", name, sections=prepare, shared_data=str(shared),
                           timed="preprocessing" not in skip,
                           num_processes=o.num_processes or (1 if o.quick else 2),
                           model_dir=str(model_dir))
        info = next((r for r in got if r.get("bench_case")), None)
        if info is None or any("error" in r for r in got):
            return
        case = BenchCase.from_dict(info["bench_case"])
        common = {"case": case.to_dict()}
        if "memory" not in skip:
            self.section("memory", name, memory_check_max_gb=o.memory_check_max_gb, **common)
        if not {"loader", "training"} <= skip:
            quick = o.quick
            self.section("training", name, loader="loader" not in skip, training="training" not in skip,
                         train_warmup=o.train_warmup,
                         train_iterations=o.train_iterations or (1 if quick else 2),
                         loader_batches=o.loader_batches or (2 if quick else 8),
                         loader_warmup=1 if quick else 2, steps=o.train_steps, workers=o.workers, amp=o.amp,
                         compile=o.compile, **common)
        if not need_model:
            return
        if "predict" not in skip:
            for roi in self.roi_modes:
                self.predict_cli(case, model_dir, roi)
        ours = None
        if "inprocess" not in skip:
            for roi in self.roi_modes:
                recs = self.section("inprocess", name, model_dir=str(model_dir), roi=roi, repeats=o.repeats,
                                    output_dir=str(self.work / "predictions" / f"{name}_inprocess"), **common)
                ours = ours or next((r for r in recs if r["benchmark"] == "predict_inprocess"), None)
        if o.compare_nnunet and "nnunet" not in skip:
            self.nnunet(case, ours)
