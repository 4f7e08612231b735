"""The folder layout is the architecture: packages import each other without cycles.

Every ``import`` in the package's source (lazy ones inside functions too) is
an edge from the importing module's package to the imported one's. The
server and the client never import each other, and what they share (pipeline,
telemetry, render, transport, archive) imports neither.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"edgescope": ROOT / "edgescope", "edgescope.export": ROOT / "export", "edgescope.runtime": ROOT / "runtime"}


def _modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if "_pb2" in path.name or (prefix == "edgescope" and parts[0] in ("export", "runtime")):
                continue
            name = ".".join((prefix, *parts)).removesuffix(".__init__")
            modules[name] = path
    return modules


def _layer(module: str) -> str:
    """``edgescope.runtime.X...`` -> ``edgescope.runtime.X``; ``edgescope.export...`` -> ``edgescope.export``;
    a module of the root package (cli, errors, bundle, ...) is a layer of its own."""
    parts = module.split(".")
    if parts[:2] == ["edgescope", "runtime"]:
        return ".".join(parts[:3])
    return ".".join(parts[:2])


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def package_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        source = _layer(module)
        edges = graph.setdefault(source, set())
        for target in _imports(path):
            if target in modules and _layer(target) != source:
                edges.add(_layer(target))
    return graph


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack: list[tuple[str, list[str]]] = [(start, [start])]
    seen: set[str] = set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_packages_import_each_other_without_cycles() -> None:
    graph = package_graph()
    cycles = [cycle for package in graph if (cycle := _cycle_from(package, graph))]
    assert not cycles, "import cycles between packages: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("edgescope.runtime.client", "edgescope.runtime.server"),
        ("edgescope.runtime.server", "edgescope.runtime.client"),
        ("edgescope.runtime.pipeline", "edgescope.runtime.server"),
        ("edgescope.runtime.telemetry", "edgescope.runtime.server"),
        ("edgescope.runtime.telemetry", "edgescope.runtime.web"),
        ("edgescope.runtime.render", "edgescope.runtime.server"),
        ("edgescope.runtime.archive", "edgescope.runtime.server"),
        ("edgescope.runtime.archive", "edgescope.runtime.client"),
        ("edgescope.runtime.backends", "edgescope.runtime.server"),
        ("edgescope.runtime.evaluation", "edgescope.runtime.server"),
        ("edgescope.runtime.backends", "edgescope.runtime.evaluation"),
        ("edgescope.runtime", "edgescope.export"),
    ],
)
def test_layers_do_not_reach_upwards(package: str, forbidden: str) -> None:
    graph = package_graph()
    offenders = {
        source: sorted(t for t in targets if t == forbidden or t.startswith(forbidden + "."))
        for source, targets in graph.items()
        if source == package or source.startswith(package + ".")
    }
    offenders = {source: targets for source, targets in offenders.items() if targets}
    assert not offenders, f"{package} must not import {forbidden}: {offenders}"
