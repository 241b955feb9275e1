#!/usr/bin/env python
"""Where CPU training time goes, and old-vs-new iteration rates measured as ratios in one run (issue #16).

Every measurement runs in a **fresh child process** (its own thread pools and environment), and the
variants are **interleaved** (A B B A A B ...) over ``--repeats`` rounds; the parent prints one JSON line
per child and a summary of medians and ratios. Absolute times on a shared 2-core machine are noisy; only
ratios within one run mean something.

Modes (``--mode``):

* ``phases``: per curriculum step, batches are drawn in-process first (untimed, identical in every
  variant: the loaders are seeded), then ``--iterations`` iterations of the product's own step
  (``TrainingSession.train_step``) are timed phase by phase -- host->tensor copy, forward, losses,
  backward, gradient clipping, optimizer -- through its ``mark`` hook. A variant may add a lever the
  product does not use on its networks (``channels_last``, ``compile``) to see whether it pays.
* ``step``: the product's own iteration (``TrainingSession.train_step``) on the same pre-drawn batches:
  the old-vs-new ratio of the compute alone (``--old-tree`` is today's code, e.g. ``git archive main``).
* ``pipeline``: the product's loop as ``hc_train`` runs it -- batches through ``BatchStream`` with the
  session's augmentation worker processes, ``train_step`` -- plus one validation (the real predictor,
  ``training.validation``) per step, timed: data wait, compute, validation seconds, and the CPU time of
  the whole process tree (main process + loader workers), i.e. iterations per wall-minute and per
  CPU-minute. The validation share assumes the plans' interval (one validation per
  ``validation_interval_epochs x iterations_per_epoch`` iterations).
* ``train``: a whole ``Trainer.run()`` (loader workers, validations, checkpoints; give fixed iteration
  counts with ``--plans-override``), then the hard Dice of the final networks on the fold's validation
  cases: the accuracy check at equal iterations.

Examples (documentation/benchmarks.md, "CPU training speed"):

    git archive main | tar -x -C /tmp/hc_main            # today's code
    HC_PREPROCESSED=/tmp/pre python scripts/profile_training.py --dataset 20 --mode pipeline \\
        --variants old,new --old-tree /tmp/hc_main --repeats 3 --iterations 6 --warmup 1
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: Named variants: environment, code tree and levers of the child.
#: ``threads`` None = what the code under test chooses itself; ``tree`` "old" = ``--old-tree``.
VARIANTS: dict[str, dict[str, Any]] = {
    "old": {"tree": "old"},                                   # today's code, its own settings
    "old_t1": {"tree": "old", "env": {"OMP_NUM_THREADS": "1"}},  # today's code on 1 thread (rounding only)
    "new": {"tree": "new"},                                   # this tree, its own settings
    "t2": {"tree": "new", "threads": 2},
    "t1": {"tree": "new", "threads": 1},
    "t2_passive": {"tree": "new", "threads": 2, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "t1_cl": {"tree": "new", "threads": 1, "channels_last": True},
    "t2_cl": {"tree": "new", "threads": 2, "channels_last": True},
    "t1_compile": {"tree": "new", "threads": 1, "compile": True},
    "t2_contig": {"tree": "new", "threads": 2, "contiguous": True},
    "t1_contig": {"tree": "new", "threads": 1, "contiguous": True},
    "t2_net1cl": {"tree": "new", "threads": 2},  # the product's default on the CPU: Net1 channels-last
    "t1_net1cl": {"tree": "new", "threads": 1},
    "w0_t2": {"tree": "new", "threads": 2, "workers": 0},
    "w1_t1": {"tree": "new", "threads": 1, "workers": 1},
    "w1_t2": {"tree": "new", "threads": 2, "workers": 1},
}


# ----------------------------------------------------------------------------------------------------
# CPU time of this process and its descendants (loader workers)

_TICK = os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
        except OSError:
            continue
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
    except OSError:
        return 0.0


class TreeCpu:
    """CPU seconds of this process (all threads), of its reaped children (``os.times``: loader workers
    joined at a step's end) and of its live descendants (``/proc``: loader workers still running)."""

    def sample(self) -> tuple[float, float]:
        """(own CPU s, descendants' CPU s)."""
        t = os.times()
        live = sum(_proc_cpu(pid) for pid in _descendants(os.getpid()))
        return t.user + t.system, t.children_user + t.children_system + live


# ----------------------------------------------------------------------------------------------------
# child


def _child(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    import numpy as np
    import torch

    from heartcascade.training.dataloading import BatchStream
    from heartcascade.training.session import TrainingSession

    workers = spec.get("workers")
    if args.mode == "train":
        _child_train(args, spec)
        return
    override = json.loads(args.plans_override) if args.plans_override else None
    # The session's own worker count (the loader of "phases"/"step" runs in-process regardless), so the
    # session picks the thread count it would pick in training; a variant's "threads" then overrides it.
    session = TrainingSession(args.dataset, args.fold, device="cpu", num_workers=workers,
                              plans_override=override, progress=False, predict_validation=False,
                              compile=bool(spec.get("compile")), output_folder=args.out)
    session.setup()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    for net in session.networks.values():
        if spec.get("channels_last"):  # every network, Net2 too
            net.to(memory_format=torch.channels_last_3d)
        if spec.get("contiguous"):  # undo the product's channels-last Net1
            net.to(memory_format=torch.contiguous_format)
    w = [p for p in session.networks["net1"].parameters() if p.dim() == 5 and p.shape[1] > 1][0]
    net1_format = "channels_last_3d" if w.is_contiguous(memory_format=torch.channels_last_3d) and not w.is_contiguous() \
        else "contiguous"
    plans = session.plans
    steps = [s for s in args.steps.split(",") if s in session.step_names]
    records = []
    tree_cpu = TreeCpu()
    for step in steps:
        st = session.steps[step]
        n_total = args.warmup + args.iterations
        rec: dict[str, Any] = {"step": step, "threads": torch.get_num_threads(),
                               "workers": session.num_workers if args.mode == "pipeline" else 0,
                               "memory_format_net1": net1_format}
        if args.mode in ("phases", "step"):
            stream = BatchStream(session.build_loader(step), plans.augmentation, 0)
            batches = [next(stream) for _ in range(n_total)]
            stream.close()
            session.build_optimizer(step)
            phases: dict[str, list[float]] = {"iteration": []}
            wall_t = cpu_t = warm_t = 0.0
            for i, batch in enumerate(batches):
                timed = i >= args.warmup
                c0, w0 = time.process_time(), time.perf_counter()
                ends = [("start", w0)]
                mark = (lambda phase: ends.append((phase, time.perf_counter()))) if args.mode == "phases" else None
                session.train_step(step, batch, mark=mark)
                if timed:
                    for (_, a), (phase, b) in zip(ends, ends[1:]):
                        phases.setdefault(phase, []).append(b - a)
                    wall_t += time.perf_counter() - w0
                    cpu_t += time.process_time() - c0
                    phases["iteration"].append(time.perf_counter() - w0)
                else:  # with "compile": the compilation
                    warm_t += time.perf_counter() - w0
            rec.update({"wall_s": wall_t, "cpu_s": cpu_t, "iterations": args.iterations, "warmup_s": warm_t,
                        "phases_ms": {k: 1000 * statistics.median(v) for k, v in phases.items() if v}})
        else:  # pipeline: the product's loop with its loader workers, then one validation
            from heartcascade.training.validation import validation_dice, validation_predictor
            training = session.build_optimizer(step)
            stream = BatchStream(session.build_loader(step), plans.augmentation, session.num_workers)
            wait = compute = 0.0
            try:
                for i in range(n_total):
                    if i == args.warmup:
                        own0, kids0 = tree_cpu.sample()
                        w0 = time.perf_counter()
                        wait = compute = 0.0
                    a = time.perf_counter()
                    batch = next(stream)
                    b = time.perf_counter()
                    session.train_step(step, batch)
                    c = time.perf_counter()
                    wait += b - a
                    compute += c - b
                wall_t = time.perf_counter() - w0
                own1, kids1 = tree_cpu.sample()
            finally:
                stream.close()
                session.release_step(step)
            target = "net1" if step in ("1", "2") else "cascade"
            v_own0, v0 = os.times(), time.perf_counter()
            predictor = validation_predictor(session.configuration, session.plans, session.networks, session.device)
            dice = validation_dice(predictor, session.val_cases, target, plans.num_classes)
            val_s = time.perf_counter() - v0
            v_own1 = os.times()
            val_cpu = (v_own1.user + v_own1.system) - (v_own0.user + v_own0.system)
            every = max(1, plans.training.validation_interval_epochs) * st.iterations_per_epoch
            rec.update({"wall_s": wall_t, "cpu_s": (own1 - own0) + (kids1 - kids0), "cpu_main_s": own1 - own0,
                        "cpu_workers_s": kids1 - kids0, "iterations": args.iterations, "data_wait_s": wait,
                        "compute_s": compute, "validation_s": val_s, "validation_cpu_s": val_cpu,
                        "validation_every": every, "val_cases": len(session.val_cases),
                        "val_dice_mean": float(np.nanmean(dice[1:]))})
        rec["it_per_wall_min"] = 60 * rec["iterations"] / rec["wall_s"]
        rec["it_per_cpu_min"] = 60 * rec["iterations"] / max(rec["cpu_s"], 1e-9)
        if "validation_s" in rec:  # one validation per `validation_every` iterations, amortised
            every = rec["validation_every"]
            rec["it_per_wall_min_with_val"] = 60 * every / (every * rec["wall_s"] / rec["iterations"] + rec["validation_s"])
            rec["it_per_cpu_min_with_val"] = 60 * every / (every * rec["cpu_s"] / rec["iterations"]
                                                           + rec["validation_cpu_s"])
        records.append(rec)
        print(json.dumps({"record": rec}), flush=True)


def _child_train(args: argparse.Namespace, spec: dict[str, Any]) -> None:
    """The whole curriculum as ``hc_train`` runs it (loader workers, validations, checkpoints; no final
    file prediction), then the hard Dice of the final networks on the fold's validation cases."""
    import numpy as np
    import torch

    from heartcascade.training.trainer import Trainer
    from heartcascade.training.validation import validation_dice, validation_predictor

    override = json.loads(args.plans_override) if args.plans_override else None
    if spec.get("threads"):
        override = dict(override or {})
        override.setdefault("training", {})["num_threads"] = int(spec["threads"])
    trainer = Trainer(args.dataset, args.fold, device="cpu", num_workers=spec.get("workers"), plans_override=override,
                      progress=False, predict_validation=False, output_folder=args.out,
                      steps=[int(s) for s in args.steps.split(",")])
    tree_cpu = TreeCpu()
    own0, kids0 = tree_cpu.sample()
    w0 = time.perf_counter()
    result = trainer.run()
    wall = time.perf_counter() - w0
    own1, kids1 = tree_cpu.sample()
    iterations = sum(trainer.iterations[s] for s in trainer.step_names)
    predictor = validation_predictor(trainer.configuration, trainer.plans, trainer.networks, trainer.device)
    dice = validation_dice(predictor, trainer.val_cases, "cascade", trainer.plans.num_classes)
    rec = {"step": "all", "threads_after": torch.get_num_threads(), "iterations": iterations, "wall_s": wall,
           "cpu_s": (own1 - own0) + (kids1 - kids0), "cpu_main_s": own1 - own0, "cpu_workers_s": kids1 - kids0,
           "seconds_per_iteration": result.seconds_per_iteration, "val_cases": len(trainer.val_cases),
           "final_dice_per_class": [None if np.isnan(d) else float(d) for d in dice],
           "final_dice_mean": float(np.nanmean(dice[1:]))}
    rec["it_per_wall_min"] = 60 * iterations / wall
    rec["it_per_cpu_min"] = 60 * iterations / rec["cpu_s"]
    print(json.dumps({"record": rec}), flush=True)


# ----------------------------------------------------------------------------------------------------
# parent


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="20")
    p.add_argument("--fold", default="0")
    p.add_argument("--steps", default="1,2,3,4")
    p.add_argument("--mode", choices=("phases", "step", "pipeline", "train"), default="phases")
    p.add_argument("--variants", default="old,new", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--old-tree", default=None, help="source tree of today's code (variant 'old')")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--plans-override", default=None)
    p.add_argument("--output", default=None, help="also append the JSON lines to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        _child(args, json.loads(args.child))
        return

    import tempfile
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"unknown variant {n}")
        if VARIANTS[n]["tree"] == "old" and not args.old_tree:
            raise SystemExit("variant 'old' needs --old-tree (e.g. git archive main | tar -x -C DIR)")
    out_file = open(args.output, "a") if args.output else None

    def emit(obj: dict[str, Any]) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if out_file:
            out_file.write(line + "\n")
            out_file.flush()

    results: dict[str, dict[str, list[dict[str, Any]]]] = {n: {} for n in names}
    work = Path(tempfile.mkdtemp(prefix="hc_profile_"))
    for rep in range(args.repeats):
        order = names if rep % 2 == 0 else list(reversed(names))
        for name in order:
            spec = VARIANTS[name]
            tree = Path(args.old_tree).resolve() if spec["tree"] == "old" else ROOT
            env = dict(os.environ)
            env.update(spec.get("env", {}))
            env["PYTHONPATH"] = str(tree)
            env["HC_RESULTS"] = str(work / "results")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec), "--dataset", args.dataset,
                   "--fold", args.fold, "--steps", args.steps, "--mode", args.mode, "--iterations",
                   str(args.iterations), "--warmup", str(args.warmup), "--out", str(work / f"{name}_{rep}")]
            if args.plans_override:
                cmd += ["--plans-override", args.plans_override]
            load0 = _loadavg()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tree))
            if proc.returncode != 0:
                emit({"variant": name, "repeat": rep, "error": proc.stderr[-3000:]})
                continue
            for line in proc.stdout.splitlines():
                if line.startswith('{"record"'):
                    rec = json.loads(line)["record"]
                    rec.update({"variant": name, "repeat": rep, "mode": args.mode, "dataset": args.dataset,
                                "loadavg": [load0, _loadavg()]})
                    results[name].setdefault(rec["step"], []).append(rec)
                    emit(rec)

    # summary: medians per variant and step, ratios against the first variant
    base = names[0]
    summary = []
    for step in (["all"] if args.mode == "train" else args.steps.split(",")):
        row: dict[str, Any] = {"summary": True, "mode": args.mode, "dataset": args.dataset, "step": step}
        for name in names:
            recs = results[name].get(step, [])
            if not recs:
                continue
            row[name] = {k: round(statistics.median(r[k] for r in recs), 2) for k in
                         ("it_per_wall_min", "it_per_cpu_min", "it_per_wall_min_with_val", "it_per_cpu_min_with_val")
                         if k in recs[0]}
            row[name]["n"] = len(recs)
            row[name]["threads"] = recs[0].get("threads")
            if "phases_ms" in recs[0]:
                row[name]["phases_ms"] = {k: round(statistics.median(r["phases_ms"][k] for r in recs), 2)
                                          for k in recs[0]["phases_ms"]}
            for k in ("data_wait_s", "compute_s", "validation_s", "val_dice_mean", "cpu_workers_s", "cpu_main_s",
                      "final_dice_mean", "wall_s", "cpu_s"):
                if k in recs[0]:
                    row[name][k] = round(statistics.median(r[k] for r in recs), 3)
            # paired ratios (same repeat) against the base variant, then their median
            if name != base:
                pairs = {r["repeat"]: r for r in results[base].get(step, [])}
                rw = [r["it_per_wall_min"] / pairs[r["repeat"]]["it_per_wall_min"] for r in recs if r["repeat"] in pairs]
                rc = [r["it_per_cpu_min"] / pairs[r["repeat"]]["it_per_cpu_min"] for r in recs if r["repeat"] in pairs]
                if rw:
                    row[name]["ratio_wall"] = round(statistics.median(rw), 3)
                    row[name]["ratio_cpu"] = round(statistics.median(rc), 3)
                for key in ("it_per_wall_min_with_val", "it_per_cpu_min_with_val"):
                    rv = [r[key] / pairs[r["repeat"]][key] for r in recs if r["repeat"] in pairs and key in r]
                    if rv:
                        row[name]["ratio_" + key.split("_min_")[0].replace("it_per_", "") + "_with_val"] = \
                            round(statistics.median(rv), 3)
        summary.append(row)
        emit(row)
    if out_file:
        out_file.close()


if __name__ == "__main__":
    main()
