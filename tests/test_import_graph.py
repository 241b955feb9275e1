"""The import graph follows the stage order of documentation/conventions.md.

Every ``heartcascade`` import (top-level or inside a function) is an edge between two subpackages; an
edge from a stage to a *later* one fails the test with the file and the import, so a new dependency
that points back up the data flow is caught where it is written. An import inside a function says why
it is not at the module top (``# deferred:`` / ``# cycle:``), and importing a console command module
loads no heavy library, so ``--help`` stays instant.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
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


# ---------------------------------------------------------------------------------------------------
# Function-local imports (documentation/conventions.md, "Imports"): an import inside a function is kept
# only to break a real import cycle or to defer a heavy import on purpose, and then says so on its own
# line with ``# cycle: <why>`` or ``# deferred: <what>, <why>``.

MARKER = re.compile(r"#\s*(deferred|cycle):\s*\S")

#: Not yet reviewed against the rule: their function-local imports are neither moved nor marked yet.
#: Folders end in "/". Every module has been reviewed (issue #15); keep it empty.
NOT_YET_REVIEWED: tuple[str, ...] = ()


def _function_local_imports() -> list[tuple[str, int, str]]:
    """(file relative to the package, line, source line) of every import inside a function (once, also
    in nested functions)."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()

        def visit(node: ast.AST, in_function: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                    source = "\n".join(lines[child.lineno - 1:child.end_lineno])
                    out.append((rel, child.lineno, source))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

        visit(ast.parse(text), False)
    return out


def _listed(rel: str, entry: str) -> bool:
    return rel.startswith(entry) if entry.endswith("/") else rel == entry


def _not_yet_reviewed(rel: str) -> bool:
    return any(_listed(rel, entry) for entry in NOT_YET_REVIEWED)


def test_function_local_imports_say_why():
    found = _function_local_imports()
    marked = [f for f in found if MARKER.search(f[2])]
    waived = [f for f in found if not MARKER.search(f[2]) and _not_yet_reviewed(f[0])]
    bad = [f"{rel}:{line}: {source.strip().splitlines()[0]}" for rel, line, source in found
           if not MARKER.search(source) and not _not_yet_reviewed(rel)]
    print(f"\nfunction-local imports: {len(found)} ({len(marked)} marked # deferred:/# cycle:, "
          f"{len(waived)} unmarked in not-yet-reviewed modules, {len(bad)} unmarked elsewhere)")
    clean = [entry for entry in NOT_YET_REVIEWED if not any(_listed(rel, entry) for rel, _, _ in waived)]
    if clean:
        print(f"reviewed already, can leave NOT_YET_REVIEWED: {', '.join(clean)}")
    assert not bad, ("move these imports to the module top, or mark why they stay local "
                     "(# deferred: <what>, <why> / # cycle: <why>):\n" + "\n".join(bad))


def test_console_commands_load_no_heavy_library():
    """Importing a command module (what ``--help`` and an argument error cost) loads neither torch nor
    the imaging stack; the commands import those after parsing, marked ``# deferred:``."""
    code = ("import importlib, sys\n"
            "from heartcascade.cli import COMMANDS\n"
            "for m in COMMANDS.values(): importlib.import_module('heartcascade.cli.' + m)\n"
            "print(' '.join(h for h in ('torch', 'SimpleITK', 'numpy', 'scipy', 'matplotlib') if h in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT.parent)})
    assert result.stdout.strip() == "", f"console command modules load {result.stdout.strip()} on import"


def _module_graph() -> dict[str, set[str]]:
    """Module -> the heartcascade modules it imports (top-level, function-local and type-only alike)."""
    modules = {".".join(p.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


#: None left: the batch loop no longer calls the predictor back (issue #22's batch restructuring).
KNOWN_CIRCLES: list[list[str]] = []


def test_no_import_circle_not_even_type_only():
    graph = _module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert sorted(circles) == KNOWN_CIRCLES, sorted(circles)


#: Reads of a plans dict (``plans[...]``, ``plans.get(...)``, ``x.plans[...]``) left outside planning/, per
#: file. Issue #24 moves them to typed accessors; the count may only go down (lower it when you remove one).
PLANS_DICT_READS: dict[str, int] = {}


def _is_plans(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "plans") or \
        (isinstance(node, ast.Attribute) and node.attr == "plans")


def test_plans_dict_is_read_only_in_planning():
    found: dict[str, int] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("planning/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            read = (isinstance(node, ast.Subscript) and _is_plans(node.value)) or (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and _is_plans(node.func.value))
            if read:
                found[rel] = found.get(rel, 0) + 1
    over = {f: n for f, n in found.items() if n > PLANS_DICT_READS.get(f, 0)}
    assert not over, f"new plans-dict reads outside planning/ (read a typed section instead): {over}"
    assert not {"preprocessing/preprocess.py", "benchmark/sections.py"} & set(found)  # typed sections only
