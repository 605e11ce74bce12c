"""pyproject.toml tells the truth about the code: dependencies, version, description."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import gateway

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    """PEP 503 normalised distribution name of a requirement string."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def _imported_modules() -> set[str]:
    """Top-level modules imported anywhere in gateway/ (function-level imports too)."""
    found: set[str] = set()
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.partition(".")[0])
    return found - set(sys.stdlib_module_names) - {"gateway", "__future__"}


def test_every_third_party_import_in_gateway_is_a_declared_dependency() -> None:
    declared = {_name(requirement) for requirement in PROJECT["dependencies"]}
    distributions = importlib.metadata.packages_distributions()
    undeclared = {
        module: distributions.get(module)
        for module in _imported_modules()
        if not {_name(dist) for dist in distributions.get(module, [module])} & declared
    }
    assert undeclared == {}


# Declared but loaded by another dependency rather than imported by name.
_LOADED_INDIRECTLY = {
    # aiohttp.resolver.AsyncResolver (the upstream client's DNS) imports it.
    "aiodns",
}


def test_every_declared_dependency_is_imported_by_the_code() -> None:
    # The reverse rule: nothing is declared that gateway/ does not use.
    distributions = importlib.metadata.packages_distributions()
    used = {
        _name(dist)
        for module in _imported_modules()
        for dist in distributions.get(module, [module])
    }
    unused = {_name(r) for r in PROJECT["dependencies"]} - used - _LOADED_INDIRECTLY
    assert unused == set()


def test_version_flag_and_package_agree_with_pyproject() -> None:
    assert PROJECT["version"] == gateway.__version__


def test_license_is_an_spdx_expression() -> None:
    # A `{ text = ... }` table is deprecated (PEP 639) and warns on every build.
    assert PROJECT["license"] == "Apache-2.0"


def test_description_does_not_say_the_proxy_runs_on_aiohttp() -> None:
    # The listeners are gateway.h1server over asyncio + httptools; aiohttp serves
    # only the admin app, health probes and DNS.
    assert "aiohttp" not in PROJECT["description"]
    assert "httptools" in PROJECT["description"]
