"""``hc_predict``'s own code (:func:`heartcascade.cli.predict.main`) with the ROI pinned to a reference box.

Usage (the benchmark runs it as a child process, like the console script)::

    python -m heartcascade.benchmark.predict_child --reference-label LABEL -- -i IN -o OUT -m MODEL ...

See :mod:`heartcascade.benchmark.roi_patch` for why.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m heartcascade.benchmark.predict_child")
    parser.add_argument("--reference-label", required=True)
    args = parser.parse_args(argv)
    from heartcascade.benchmark.roi_patch import ReferenceBoxRoi
    from heartcascade.cli import predict

    return predict.main(rest, roi_rule=ReferenceBoxRoi.from_file(args.reference_label))


if __name__ == "__main__":
    sys.exit(main())
