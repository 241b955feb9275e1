#!/usr/bin/env python
"""Step-4 loader cost per batch for a CT-sized case, for one or more source trees, interleaved.

A step-4 batch of the paper preset on a 512x512 CT is ``batch_size`` stacks of K = 9 full slices. This
script builds one synthetic case of that size in memory (random image, box-shaped labels of 7
structures, random float16 Net1 probabilities on a 144x240x240 coarse grid), makes batches with the
tree's ``SliceStackLoader`` and its batch transforms (the paper preset's augmentation: spatial,
flips, intensity) in-process -- i.e. what one loader worker does -- and, for trees whose loader hands
over source positions, also times reading Net1's probabilities at them on the CPU
(``upsample_at_points``, which the trainer runs on its device). Each tree runs in its own child
process, alternately, ``--rounds`` times, so load changes on a shared machine hit all trees alike;
the medians are printed as JSON lines and the ratio against the first tree.

    python scripts/benchmark_step4_loader.py --tree old=/path/to/old/checkout --tree new=. --rounds 3
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


def child(batches: int, batch_size: int) -> dict:
    import numpy as np
    import torch

    from heartcascade.training import dataloading as dl
    from heartcascade.training.augmentation import AugmentationParams, batch_transforms

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    D, H, W = 239, 512, 512
    seg = np.zeros((D, H, W), np.int16)
    for c in range(1, 8):
        seg[60 + c * 10:100 + c * 10, 150 + c * 20:250 + c * 20, 150:300] = c
    image = rng.standard_normal((1, D, H, W)).astype(np.float32)
    locations = {c: np.argwhere(seg == c)[::97] for c in range(1, 8)}
    probs = rng.random((8, 144, 240, 240)).astype(np.float16)
    fields = {"coarse_seg": np.zeros((144, 240, 240), np.int16)}
    old_loader = "net1_probs" in dl.TrainCase.__dataclass_fields__
    if old_loader:
        fields["net1_probs"] = probs
    case = dl.TrainCase("ct", image, seg, (0.625, 0.488, 0.488), locations, **fields)
    plans_aug = json.loads((Path(dl.__file__).resolve().parents[2] / "plans" / "paper.json").read_text())["augmentation"]
    params = AugmentationParams.from_dict(plans_aug)
    loader = dl.SliceStackLoader([case], batch_size, 0, [4], params, K=9, divisor=8)
    transform = batch_transforms(params, image_channels=1)
    loader.generate_train_batch()  # warm-up
    times, reads = [], []
    for _ in range(batches):
        t = time.perf_counter()
        batch = loader.generate_train_batch()
        if transform is not None:
            batch = transform(**batch)
        times.append(time.perf_counter() - t)
        if not old_loader:
            from heartcascade.inference.upsampling import upsample_at_points

            coarse = torch.from_numpy(probs)
            t = time.perf_counter()
            for b in range(batch_size):
                upsample_at_points(coarse, (D, H, W), torch.from_numpy(batch["data"][b, 1:4]))
            reads.append(time.perf_counter() - t)
    return {"batch_s": statistics.median(times), "batch_mb": round(batch["data"].nbytes / 2**20, 1),
            "device_read_cpu_s": statistics.median(reads) if reads else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", required=True, help="NAME=PATH of a source checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.batches, args.batch_size)))
        return 0
    trees = [t.split("=", 1) for t in args.tree]
    results: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for _ in range(args.rounds):
        for name, path in trees:
            env = {**os.environ, "PYTHONPATH": str(Path(path).resolve()), "OMP_NUM_THREADS": "1"}
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--tree", "x=.",
                                  "--batches", str(args.batches), "--batch-size", str(args.batch_size)],
                                 env=env, capture_output=True, text=True, check=True)
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = None
    for name, runs in results.items():
        batch_s = statistics.median(r["batch_s"] for r in runs)
        first = first or batch_s
        reads = [r["device_read_cpu_s"] for r in runs if r["device_read_cpu_s"] is not None]
        print(json.dumps({"tree": name, "batch_size": args.batch_size, "stack": [9, 512, 512],
                          "worker_s_per_batch": round(batch_s, 3), "batches_per_s_per_worker": round(1 / batch_s, 2),
                          "speedup_vs_first": round(first / batch_s, 2), "batch_mb": runs[0]["batch_mb"],
                          "device_read_on_cpu_s": round(statistics.median(reads), 3) if reads else None,
                          "loadavg": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
