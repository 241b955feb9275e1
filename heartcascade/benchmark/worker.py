"""Run benchmark sections in this (fresh) process: ``python -m heartcascade.benchmark.worker JOB.json``.

Records go to the original stdout as JSON lines; everything else the libraries print (progress bars,
log lines, C-level output) is redirected to stderr, so stdout stays parseable. An unexpected exception
becomes a ``{"benchmark": <section>, "error": ...}`` record and exit status 1.
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

from heartcascade.utils.errors import HCError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as fh:
        job = json.load(fh)
    out = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)  # library prints (and C code writing to fd 1) end up on stderr
    sys.stdout = sys.stderr
    threads = job.get("threads")
    if threads:
        import torch  # deferred: torch, imported after fd 1 points at stderr, so nothing printed on import reaches the records

        torch.set_num_threads(int(threads))

    def emit(**record) -> None:
        out.write(json.dumps(record, default=_plain) + "\n")
        out.flush()

    from heartcascade.benchmark.sections import SECTIONS  # deferred: torch and the measured libraries, imported after fd 1 points at stderr, so nothing printed on import reaches the records

    # one section, or several in order ("sections"); a section's "bench_case" record feeds the next ones
    names = job.get("sections") or [job["section"]]

    def emit_and_capture(**record) -> None:
        if record.get("bench_case"):
            job["case"] = record["bench_case"]
        emit(**record)

    for name in names:
        try:
            SECTIONS[name](job, emit_and_capture)
        except HCError as exc:
            emit(benchmark=name, error=str(exc))
            return 1
        except Exception as exc:  # noqa: BLE001 - reported as a record, the other sections go on
            traceback.print_exc(file=sys.stderr)
            emit(benchmark=name, error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:500]}")
            return 1
    return 0


def _plain(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
