"""The records of ``scripts/device_check.sh`` besides hc_benchmark's own (see documentation/benchmarks.md).

The script runs hc_benchmark twice on one work folder (eager with AMP, then ``--compile``) and calls
this module to print what a reader of a GPU check wants first, as JSON lines:

* ``python -m heartcascade.benchmark.device_check setup ...``: one ``device_check_setup`` record (the
  interpreter, how it was obtained, torch, the device);
* ``python -m heartcascade.benchmark.device_check summary --eager E.jsonl --compile C.jsonl ...``: per
  curriculum step and mode a ``device_check_training`` record, then ``device_check_predict``, ``device_check_nnunet`` and
  ``device_check_summary`` (what is missing, and the exit status the script returns).

Anything the runs did not produce is reported as missing with the reason the runs gave (an error
record, a timeout, the time cap), never left out silently.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from heartcascade.benchmark.jsonlines import json_records

EXIT_OK, EXIT_INCOMPLETE, EXIT_SETUP, EXIT_TIME_CAP = 0, 1, 2, 3


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (other lines are ignored)."""
    p = Path(path)
    return json_records(p.read_text()) if p.is_file() else []


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _errors(records: Iterable[dict[str, Any]], benchmarks: Sequence[str]) -> list[str]:
    return [f"{r['benchmark']}: {r['error']}" for r in records if r.get("benchmark") in benchmarks and "error" in r]


def training_records(records: list[dict[str, Any]], steps: Sequence[str], compiled: bool,
                     reason: str | None) -> list[dict[str, Any]]:
    """One ``device_check_training`` record per step: step time, loader rate, ``outpaces``, GPU peak."""
    mine = [r for r in records if r.get("benchmark") == "training_step" and bool(r.get("compile")) == compiled]
    errors = _errors(records, ("training", "training_step", "prepare", "dataset", "preprocessing"))
    out = []
    for step in steps:
        rec = next((r for r in mine if str(r.get("step")) == step), None)
        base: dict[str, Any] = {"benchmark": "device_check_training", "step": step, "compile": compiled}
        if rec is None or not _positive(rec.get("step_s")):
            why = (rec or {}).get("skipped") or (errors[-1] if errors else None) or reason or "no record"
            out.append({**base, "missing": str(why)})
            continue
        out.append({**base, "amp": rec.get("amp"), "input": rec.get("input"), "batch_size": rec.get("batch_size"),
                    "step_s": rec["step_s"], "step_s_each": rec.get("step_s_each"), "warmup_s": rec.get("warmup_s"),
                    "loader_batches_per_s": rec.get("loader_batches_per_s"), "outpaces": rec.get("outpaces"),
                    "gpu_peak_allocated_gb": rec.get("gpu_peak_allocated_gb"),
                    "plans_predicted_peak_gb": rec.get("plans_predicted_peak_gb")})
    return out


def predict_record(records: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
    """hc_predict file to file (child process) with its peak GPU memory, and the in-process split."""
    cli = next((r for r in records if r.get("benchmark") == "predict_cli" and "error" not in r), None)
    inproc = next((r for r in records if r.get("benchmark") == "predict_inprocess" and "error" not in r), None)
    base: dict[str, Any] = {"benchmark": "device_check_predict"}
    if cli is None:
        errors = _errors(records, ("predict_cli", "prepare", "dataset", "preprocessing", "model"))
        return {**base, "missing": errors[-1] if errors else (reason or "no predict_cli record")}
    out = {**base, "roi": cli.get("roi"), "input_size_xyz": cli.get("input_size_xyz"), "wall_s": cli.get("wall_s"),
           "peak_rss_gb": cli.get("peak_rss_gb"), "gpu_peak_allocated_gb": cli.get("gpu_peak_allocated_gb"),
           "gpu_peak_reserved_gb": cli.get("gpu_peak_reserved_gb"), "predictor_case_s": cli.get("predictor_case_s")}
    if inproc is not None:
        out.update(inprocess_predict_s=inproc.get("predict_s"),
                   inprocess_predict_preprocessed_s=inproc.get("predict_preprocessed_s"),
                   inprocess_timings=inproc.get("timings"),
                   inprocess_gpu_peak_allocated_gb=inproc.get("gpu_peak_allocated_gb"))
    return out


def nnunet_record(records: list[dict[str, Any]], reason: str | None) -> dict[str, Any]:
    """nnU-Net v2's ``predict_single_npy_array`` on the same volume and its ratio to heartcascade."""
    base: dict[str, Any] = {"benchmark": "device_check_nnunet"}
    pred = next((r for r in records if r.get("benchmark") == "nnunet_predict" and "error" not in r), None)
    if pred is not None:
        return {**base, "nnunetv2": pred.get("nnunetv2"), "predict_s": pred.get("predict_s"),
                "extrapolated": pred.get("extrapolated"),
                "heartcascade_predict_preprocessed_s": pred.get("heartcascade_predict_preprocessed_s"),
                "ratio_nnunet_over_heartcascade": pred.get("ratio_nnunet_over_heartcascade"),
                "gpu_peak_allocated_gb": pred.get("gpu_peak_allocated_gb")}
    info = next((r for r in records if r.get("benchmark") == "nnunet"), None)
    if info is not None and info.get("skipped"):
        return {**base, "skipped": info["skipped"]}
    errors = _errors(records, ("nnunet", "nnunet_predict"))
    return {**base, "missing": errors[-1] if errors else (reason or "no nnunet record")}


def summarise(eager: list[dict[str, Any]], compiled: list[dict[str, Any]], steps: Sequence[str],
              compile_steps: Sequence[str], cut: dict[str, str], wall_s: float, time_cap_s: float,
              smoke: bool) -> list[dict[str, Any]]:
    """The script's own records from the records of its two runs (eager with AMP, ``--compile``);
    ``cut`` maps a run (``eager``, ``compile``) to why it was cut short or not run."""
    out = training_records(eager, steps, False, cut.get("eager"))
    out += training_records(compiled, compile_steps, True, cut.get("compile"))
    out.append(predict_record(eager, cut.get("eager")))
    out.append(nnunet_record(eager, cut.get("eager")))
    missing = [f"{r['benchmark']}{' step ' + r['step'] if 'step' in r else ''}"
               f"{' compile' if r.get('compile') else ''}: {r['missing']}" for r in out if "missing" in r]
    status = EXIT_OK if not missing else (EXIT_TIME_CAP if any("time cap" in v for v in cut.values()) else EXIT_INCOMPLETE)
    out.append({"benchmark": "device_check_summary", "smoke": smoke, "wall_s": round(wall_s, 1),
                "time_cap_s": time_cap_s, "complete": not missing, "missing": missing,
                "error_records": sum(1 for r in eager + compiled if "error" in r), "exit_status": status})
    return out


def setup_record(python: str, how: str, setup_s: float, device: str) -> dict[str, Any]:
    import torch  # deferred: torch, the summary subcommand needs none; check reports a broken torch in one line

    rec: dict[str, Any] = {"benchmark": "device_check_setup", "python": python, "python_version": platform.python_version(),
                           "how": how, "setup_s": round(setup_s, 1), "torch": str(torch.__version__),
                           "cuda_available": torch.cuda.is_available(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        rec.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 1024 ** 3, 1), cuda=torch.version.cuda)
    return rec


def check_imports() -> None:
    """Import what the measurements need, so a broken setup fails here, in one line, not mid-run."""
    import acvl_utils.cropping_and_padding.bounding_boxes  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import batchgenerators  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import cc3d  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import SimpleITK  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import torch  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line

    import heartcascade.benchmark.runner  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import heartcascade.inference.predictor  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line
    import heartcascade.training.trainer  # noqa: F401  # deferred: the check itself, a broken install fails here and is reported in one line


def resolve_device(name: str) -> str:
    """``auto`` → cuda when torch sees a GPU, else cpu; an explicit cuda without one is an error."""
    import torch  # deferred: torch, the summary subcommand needs none; check reports a broken torch in one line

    name = name.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"device {name}: torch {torch.__version__} sees no CUDA device")
    return name


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m heartcascade.benchmark.device_check")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("check", help="import the requirements, then print the device a name resolves to "
                                      "(auto: cuda if available)")
    s.add_argument("--device", default="auto")
    s = sub.add_parser("setup", help="print the device_check_setup record")
    s.add_argument("--how", required=True)
    s.add_argument("--setup-s", type=float, required=True)
    s.add_argument("--device", required=True)
    s = sub.add_parser("summary", help="print the summary records of the two runs; exit with its status")
    s.add_argument("--eager", required=True, help="records of the eager (AMP) run")
    s.add_argument("--compile", required=True, help="records of the --compile run")
    s.add_argument("--steps", default="1,2,3,4")
    s.add_argument("--compile-steps", default="1,2,3,4")
    s.add_argument("--cut", action="append", default=[], metavar="RUN=REASON",
                   help="a run that was cut short (eager or compile) and why")
    s.add_argument("--started", type=float, required=True, help="the script's start, seconds since the epoch")
    s.add_argument("--time-cap", type=float, required=True)
    s.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.command == "check":
        try:
            check_imports()
        except Exception as exc:  # noqa: BLE001 - any broken install: one line for the script's error
            raise SystemExit(f"cannot import the requirements with {sys.executable}: {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:300]}")
        print(resolve_device(args.device))
        return 0
    if args.command == "setup":
        print(json.dumps(setup_record(sys.executable, args.how, args.setup_s, args.device)), flush=True)
        return 0
    cut = dict(item.split("=", 1) for item in args.cut)
    records = summarise(read_records(args.eager), read_records(args.compile), [s for s in args.steps.split(",") if s],
                        [s for s in args.compile_steps.split(",") if s], cut, time.time() - args.started,
                        args.time_cap, args.smoke)
    for rec in records:
        print(json.dumps(rec), flush=True)
    return int(records[-1]["exit_status"])


if __name__ == "__main__":
    sys.exit(main())
