"""The import graph follows the stage order of documentation/conventions.md.

Every ``heartcascade`` import (top-level or inside a function) is an edge between two subpackages; an
edge from a stage to a *later* one fails the test with the file and the import, so a new dependency
that points back up the data flow is caught where it is written.
"""
from __future__ import annotations

import ast
from pathlib import Path

import heartcascade

ROOT = Path(heartcascade.__file__).resolve().parent

#: Lowest first; a module may import its own stage and earlier ones. documentation/conventions.md
#: lists the same order with what each stage owns.
STAGES = ["__init__", "utils", "paths", "dataset", "networks", "preprocessing", "planning", "model", "losses",
          "inference", "evaluation", "training", "workflows", "benchmark", "cli"]

#: Modules that are console entry points although they live in a lower package: the benchmark's child
#: process runs ``hc_predict``'s own code (heartcascade.cli.predict) with a fixed ROI rule.
ENTRY_POINTS = {"benchmark/predict_child.py": "cli"}


def _stage(parts: list[str]) -> str:
    return parts[0] if parts else "__init__"


def _edges() -> list[tuple[str, str, str, int, str]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        src = ENTRY_POINTS.get(rel.as_posix(), _stage([p.removesuffix(".py") for p in rel.parts[:-1]] or
                                                      [rel.stem if rel.stem != "__init__" else "__init__"]))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
                if node.module == "heartcascade":
                    names = [f"heartcascade.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "heartcascade":
                    continue
                dst = _stage(parts[1:])
                if dst not in STAGES:  # ``from heartcascade import __version__`` and the like
                    dst = "__init__"
                out.append((src, dst, rel.as_posix(), node.lineno, name))
    return out


def test_every_package_has_a_stage():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    packages |= {p.stem for p in ROOT.glob("*.py") if p.stem != "__init__"}
    assert packages <= set(STAGES), sorted(packages - set(STAGES))


def test_no_import_points_back_up_the_stage_order():
    rank = {s: i for i, s in enumerate(STAGES)}
    bad = [f"{file}:{line}: {src} imports {name} ({dst} is a later stage)"
           for src, dst, file, line, name in _edges() if rank[dst] > rank[src]]
    assert not bad, "\n".join(bad)


def test_networks_depend_only_on_utils():
    bad = [f"{file}:{line}: {name}" for src, dst, file, line, name in _edges()
           if src == "networks" and dst not in ("networks", "utils")]
    assert not bad, "\n".join(bad)
