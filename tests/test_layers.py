"""The package's layers, and that every import points down them.

gateway/core   pure rules (config, routing, balancers, breaker, limits, ...)
gateway/wire   HTTP/1.1 server and client, vetting, flow control, splice
gateway/state  targets and pools, health, snapshot, metrics, logs
gateway/edges  the proxy handler, the admin app, reload
gateway/       assembly: server (listeners, signals, drain) and cli

A module may import its own layer and the layers before it, never one after
it; and no two modules import each other, however indirectly (imports under
TYPE_CHECKING and inside functions count too: a cycle there is still one).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"
ORDER = ("core", "wire", "state", "edges", "")  # "" is the top: assembly


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def _imports() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("gateway."))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "gateway" or node.module.startswith("gateway."):
                    for alias in node.names:
                        child = f"{node.module}.{alias.name}"
                        found.add(child if child in modules else node.module)
            elif isinstance(node, ast.ImportFrom) and node.level:
                pytest.fail(f"{module}: relative import; write `from gateway.LAYER.x import`")
        graph[module] = {m for m in found if m in modules and m != module}
    return graph


GRAPH = _imports()


def test_every_module_sits_in_a_known_layer() -> None:
    assert {_layer(m) for m in GRAPH} <= set(ORDER)


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down_the_layers(module: str) -> None:
    rank = ORDER.index(_layer(module))
    upward = sorted(m for m in GRAPH[module] if ORDER.index(_layer(m)) > rank)
    assert upward == [], f"{module} imports a higher layer"


def test_no_module_imports_itself_through_others() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []
