"""The layers hold: who may import whom (DESIGN.md), no import cycle, a pure domain.

Read from the source with ``ast`` (every import statement counts, those under
``TYPE_CHECKING`` included), so a violation fails here before anything runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("presence", "cluster", "gateway")

# What the domain must never import: I/O, event loops, clocks, servers, backends.
DOMAIN_FORBIDDEN = {
    "os", "pathlib", "tomllib", "io", "time", "asyncio", "socket", "ssl", "selectors",
    "subprocess", "threading", "signal", "redis", "websockets", "aiohttp", "uvloop",
    "structlog", "prometheus_client", "jwt",
}
# Each layer may import only itself and the layers below it.
ALLOWED = {
    "presence": {"presence"},
    "cluster": {"cluster", "presence"},
    "gateway": {"gateway", "cluster", "presence"},
}


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = modules()


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` counts
    ``a.b`` when that is a module of ours, else ``a``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


GRAPH = {name: {i for i in imports_of(path) if i in MODULES} for name, path in MODULES.items()}


def test_the_packages_are_found() -> None:
    assert {"presence.settings", "cluster.base", "gateway.node", "gateway.session"} <= set(
        MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers(name: str) -> None:
    layer = name.split(".")[0]
    for target in GRAPH[name]:
        assert target.split(".")[0] in ALLOWED[layer], f"{name} imports {target}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("presence")))
def test_the_domain_does_no_io(name: str) -> None:
    roots = {i.split(".")[0] for i in imports_of(MODULES[name])}
    assert not roots & DOMAIN_FORBIDDEN, f"{name} imports {sorted(roots & DOMAIN_FORBIDDEN)}"


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if target == name or target.startswith(name + "."):
                continue  # a package importing its own submodule is no cycle
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_session_and_the_node_know_each_other_only_through_the_ports() -> None:
    assert "gateway.node" not in GRAPH["gateway.session"]
    assert "gateway.session" not in GRAPH["gateway.node"]
