"""Imports point one way: every module of the package imports only modules of its own layer or of layers below
it, and no set of modules imports itself round (a circle). Read from the source (every import statement, at module
level or inside a function), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "assets_pipeline"
# Lowest first. A module's layer is named by the first part of its path inside the package.
LAYERS = [
    ("ground floor", {"concept", "config_types", "hashing", "paths", "store", "tables", "parallel", "imaging",
                      "lineage", "cleanup", "retention", "demo_data", "display"}),
    ("base models", {"models"}),
    ("stages", {"stages"}),
    ("training", {"training"}),
    ("concept partitions and resources", {"partitions", "resources"}),
    ("the Dagster layer", {"assets", "automation", "jobs", "schedules", "sensors", "definitions", "preload", "cli",
                           "postgres", "pools"}),
]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports (a name imported from a package counts as its module if it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name.startswith("assets_pipeline."):
                found.add(name)
    return found


def layer(module: str) -> int:
    first = module.split(".")[1]
    for i, (_, names) in enumerate(LAYERS):
        if first in names:
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add its package or module to one")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items() if m != "assets_pipeline"}


def test_every_import_points_to_the_same_layer_or_below():
    upward = [f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
              for m, targets in sorted(graph().items()) for t in sorted(targets) if layer(t) > layer(m)]
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_round():
    edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_ground_floor_concept_module_imports_only_the_type_checks():
    assert graph()["assets_pipeline.concept"] == {"assets_pipeline.config_types"}
