#!/usr/bin/env python
"""Does the data pipeline outpace training? Batches/s of each loader vs the time of one training step.

For every curriculum step (and the baseline with ``--config baseline``) this builds the same loader
and augmenter the trainer uses, on the dataset's real preprocessed cases and plans, and measures:

* ``batches_per_s``: batches delivered per second by the MultiThreadedAugmenter with ``--workers``
  processes (after ``--warmup`` batches; 0 workers = in-process);
* ``sample_ms``: milliseconds one worker needs per batch (in-process measurement, no queue);
* ``train_step_s``: seconds of one optimisation step (forward, backward, Adam) on ``--device``
  (``train_step_cpu_s``: CPU time of one step, on CPU runs; robust to other load on the machine);
* ``outpaces``: ``batches_per_s * train_step_s >= 1``, i.e. the GPU/CPU never waits for data.

One JSON object per line on stdout, e.g.::

    {"step": "3", "input": "subvolumes", "batch_size": 2, "workers": 8, "batches_per_s": 41.2,
     "sample_ms": 95.1, "train_step_s": 0.21, "outpaces": true}

Usage::

    python scripts/benchmark_loader.py 1 --fold 0 --workers 8 --batches 50 --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset")
    p.add_argument("--fold", default="0")
    p.add_argument("--config", default="cascade", choices=("cascade", "baseline"))
    p.add_argument("--steps", default=None, help="comma separated steps (default: all)")
    p.add_argument("--workers", type=int, default=None, help="augmentation workers (default: as training)")
    p.add_argument("--batches", type=int, default=50,
                   help="batches to time per loader (the first few come from the augmenter's queue)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=5, help="training steps to time per step type")
    p.add_argument("--device", default="auto")
    p.add_argument("--plans-override", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from heartcascade.training.dataloading import BatchStream
    from heartcascade.training.trainer import Trainer
    from heartcascade.utils.errors import HCError

    try:
        trainer = Trainer(args.dataset, args.fold, configuration=args.config, device=args.device, progress=False,
                          num_workers=args.workers, plans_override=args.plans_override, predict_validation=False)
        trainer.setup()
    except HCError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    step_names = trainer.step_names if args.steps is None else [s for s in args.steps.split(",") if s in trainer.step_names]
    workers = trainer.num_workers
    for step_name in step_names:
        st = trainer.steps[step_name]
        trainer.prepare_step(step_name)
        # per-batch cost in-process
        loader = trainer.build_loader(step_name)
        t0 = time.perf_counter()
        n_local = max(3, min(10, args.batches))
        for _ in range(n_local):
            loader.generate_train_batch()
        sample_ms = 1000 * (time.perf_counter() - t0) / n_local
        # throughput through the augmenter
        stream = BatchStream(trainer.build_loader(step_name), trainer.plans.augmentation, workers)
        try:
            for _ in range(args.warmup):
                batch = next(stream)
            t0 = time.perf_counter()
            for _ in range(args.batches):
                batch = next(stream)
            rate = args.batches / (time.perf_counter() - t0)
            # training step time on the device
            trainer.build_optimizer(step_name)  # the trainer's Adam (lr, weight decay) and AMP scaler
            trainer.train_step(step_name, batch)  # warm-up
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.train_steps):
                trainer.train_step(step_name, next(stream))
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            step_s = (time.perf_counter() - t0) / args.train_steps
            cpu_s = None
            if trainer.device.type == "cpu":
                t0 = time.process_time()
                trainer.train_step(step_name, next(stream))
                cpu_s = time.process_time() - t0
        finally:
            stream.close()
        print(json.dumps({"step": step_name, "input": st.input, "batch_size": st.batch_size,
                          "patch_shape": batch.get("patch_shape"), "workers": workers,
                          "batches_per_s": round(rate, 2), "sample_ms": round(sample_ms, 1),
                          "train_step_s": round(step_s, 4), "train_step_cpu_s": None if cpu_s is None else round(cpu_s, 4),
                          "outpaces": bool(rate * step_s >= 1.0),
                          "device": str(trainer.device)}), flush=True)
        trainer.release_step(step_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
