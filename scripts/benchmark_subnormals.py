#!/usr/bin/env python
"""How much subnormal floats cost a trained model on the CPU: seconds per training iteration and per forward
pass, with torch's flush-to-zero off and on, each in a fresh child process (the flag must be set before torch
starts its thread pool, so a child per variant; variants interleaved over ``--repeats`` rounds).

Networks: the trained Net1 and Net2 of a model zip (default: the shipped cine-MR model) and, as the
control, the same networks freshly initialised. Inputs are random tensors of the plans' step-1 patch and
step-4 stack shapes (Adam, the plans' batch sizes). Prints one line per child and the medians.

    python scripts/benchmark_subnormals.py                       # the shipped model, 2 threads
    python scripts/benchmark_subnormals.py -m model.zip --threads 1 --repeats 3

heartcascade sets the flag wherever it resolves its device (``utils/device.py::flush_denormals``);
documentation/benchmarks.md ("Subnormal numbers") has the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "heartcascade" / "pretrained" / "cine_mr_lv_myo_rv.zip"


def child(model: str, flush: bool, trained: bool, threads: int, iterations: int) -> dict:
    import torch

    torch.set_flush_denormal(flush)  # before any parallel op: the OpenMP threads inherit it
    torch.set_num_threads(threads)
    from heartcascade.inference.model_archive import extracted_model
    from heartcascade.inference.model_loading import build_networks, load_fold, resolve_fold_dirs

    with extracted_model(model) as (folder, _):
        _, fold_dir = resolve_fold_dirs(folder)[0]
        fold = load_fold(fold_dir)
    plans = fold.plans
    nets = fold.networks if trained else build_networks("cascade", plans)
    out: dict = {"flush": flush, "trained": trained, "threads": threads}
    shapes = {"net1": (plans.training.step(1).batch_size, plans.net1.in_channels, *plans.training.step(1).patch_shape),
              "net2": (plans.training.step(4).batch_size, plans.net2.in_channels, *plans.training.step(4).stack_shape)}
    for name, shape in shapes.items():
        torch.manual_seed(0)
        net = nets[name].train()
        x = torch.randn(shape)
        opt = torch.optim.Adam(net.parameters(), 1e-4)
        times = []
        for _ in range(iterations + 1):  # the first is warm-up
            t = time.perf_counter()
            loss = net(x).float().square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t)
        out[f"{name}_train_s"] = round(statistics.median(times[1:]), 4)
        net.eval()
        with torch.no_grad():
            t = time.perf_counter()
            for _ in range(iterations):
                net(x)
        out[f"{name}_forward_s"] = round((time.perf_counter() - t) / iterations, 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default=str(SHIPPED), help="a heartcascade model zip")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        flush, trained = (v == "1" for v in args.child.split(","))
        print(json.dumps(child(args.model, flush, trained, args.threads, args.iterations)))
        return 0
    rows: dict[tuple[bool, bool], list[dict]] = {}
    for _ in range(args.repeats):
        for trained in (True, False):
            for flush in (False, True):
                proc = subprocess.run([sys.executable, __file__, "-m", args.model, "--threads", str(args.threads),
                                       "--iterations", str(args.iterations), "--child",
                                       f"{int(flush)},{int(trained)}"], capture_output=True, text=True, check=True)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.setdefault((trained, flush), []).append(row)
    keys = ("net1_train_s", "net1_forward_s", "net2_train_s", "net2_forward_s")
    print(f"\nmedians over {args.repeats} round(s), {args.threads} thread(s), seconds")
    print(f"{'networks':<9} {'flush':<6} " + " ".join(f"{k:>15}" for k in keys))
    for (trained, flush), entries in sorted(rows.items(), reverse=True):
        print(f"{'trained' if trained else 'fresh':<9} {'on' if flush else 'off':<6} " +
              " ".join(f"{statistics.median(e[k] for e in entries):>15.4f}" for k in keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
