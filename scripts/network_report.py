#!/usr/bin/env python
"""Print parameter counts and CPU forward time per tile for Net1, Net2, the cascade and the baseline.

Why: planning needs a feel for how big each network is and how tile size drives cost, before any
GPU is involved. The default run uses the default constructor widths and small tiles (< 60 s on
2 CPU cores); ``--large`` adds bigger tiles.

    .venv/bin/python scripts/network_report.py [--classes 8] [--K 9] [--large] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heartcascade.networks import (  # noqa: E402
    BaselineUNet3D,
    Cascade,
    Net1,
    Net2,
    count_conv_layers,
    count_parameters,
    net2_input_channels,
)


def time_forward(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in seconds (the caller has already made a warm-up call)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=8, help="classes incl. background (MM-WHS: 8)")
    ap.add_argument("--K", type=int, default=9, help="Net2 slab size (odd)")
    ap.add_argument("--mode", choices=("probabilities", "labelmap"), default="probabilities", help="Net2 input form")
    ap.add_argument("--repeats", type=int, default=2, help="timed forwards per entry (median)")
    ap.add_argument("--large", action="store_true", help="also time larger tiles (slow on CPU)")
    args = ap.parse_args(argv)
    C, K = args.classes, args.K
    torch.manual_seed(0)

    net1 = Net1(1, C).eval()
    net2 = Net2(net2_input_channels(args.mode, C, 1), C, K).eval()
    cascade = Cascade(net1, net2, input_mode=args.mode, scale_factors=(0.5, 0.25, 0.25)).eval()
    baseline = BaselineUNet3D(1, C).eval()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {C} classes, K={K}, mode={args.mode}")
    print()
    print(f"{'network':<10} {'params':>12} {'conv layers':>12}  notes")
    print(f"{'Net1':<10} {count_parameters(net1):>12,} {count_conv_layers(net1):>12}  widths {net1.widths}, "
          f"dilations {net1.config['dilations']}, receptive field {net1.receptive_field()} coarse voxels")
    print(f"{'Net2':<10} {count_parameters(net2):>12,} {count_conv_layers(net2):>12}  widths {net2.widths}, "
          f"z-kernels {net2.z_kernels}, slice-wise ({net2.slicewise_kernel},1,1), R={net2.config['recursions']}")
    print(f"{'Cascade':<10} {count_parameters(cascade):>12,} {count_conv_layers(cascade):>12}")
    print(f"{'Baseline':<10} {count_parameters(baseline):>12,} {count_conv_layers(baseline):>12}  "
          f"widths {baseline.widths}")
    print()

    n1 = [(32, 32, 32), (32, 64, 64)] + ([(64, 96, 96)] if args.large else [])
    n2 = [(K, 64, 64), (K + 4, 128, 128)] + ([(K + 8, 256, 256)] if args.large else [])
    ca = [(K + 7, 64, 64), (K + 7, 128, 128)] + ([(K + 23, 256, 256)] if args.large else [])
    bl = [(32, 32, 32), (32, 64, 64)] + ([(64, 96, 96)] if args.large else [])
    print(f"{'network':<10} {'input tile (D,H,W)':<20} {'output':<22} {'forward s':>10} {'us/out voxel':>13}")
    with torch.inference_mode():
        for name, model, shapes, cin in (
            ("Net1", net1, n1, 1),
            ("Net2", net2, n2, net2.config["in_channels"]),
            ("Cascade", cascade, ca, 1),
            ("Baseline", baseline, bl, 1),
        ):
            for shape in shapes:
                x = torch.randn(1, cin, *shape)
                out = model(x)  # also the warm-up call
                out = out.net2_logits if name == "Cascade" else out
                sec = time_forward(lambda: model(x), args.repeats)
                vox = out[0, 0].numel()
                print(f"{name:<10} {str(shape):<20} {str(tuple(out.shape[2:])):<22} {sec:>10.3f} "
                      f"{1e6 * sec / vox:>13.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
