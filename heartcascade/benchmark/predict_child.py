"""``hc_predict``'s own code (:func:`heartcascade.cli.predict.main`) with the ROI pinned to a reference box.

Usage (the benchmark runs it as a child process, like the console script)::

    python -m heartcascade.benchmark.predict_child --reference-label LABEL -- -i IN -o OUT -m MODEL ...

See :mod:`heartcascade.benchmark.roi_patch` for why.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from heartcascade.benchmark.roi_patch import ReferenceBoxRoi
from heartcascade.cli import predict

# stderr line carrying this process's peak GPU memory (stdout and the log are hc_predict's own)
GPU_PEAK_TAG = "hc_benchmark gpu peak: "


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m heartcascade.benchmark.predict_child")
    parser.add_argument("--reference-label", required=True)
    args = parser.parse_args(argv)
    code = predict.main(rest, roi_rule=ReferenceBoxRoi.from_file(args.reference_label))
    report_gpu_peak()
    return code


def report_gpu_peak() -> None:
    """Peak GPU memory of the whole run (model load to last file written), when it used CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    gib = 1024 ** 3
    peak = {"gpu_peak_allocated_gb": round(torch.cuda.max_memory_allocated() / gib, 3),
            "gpu_peak_reserved_gb": round(torch.cuda.max_memory_reserved() / gib, 3)}
    print(GPU_PEAK_TAG + json.dumps(peak), file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
