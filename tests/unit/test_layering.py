"""The sans-I/O layers (`mesh_llm/core/`, `mesh_llm/wire/`) import no I/O module.

Walks every module of those packages with `ast` and fails on imports of I/O, clock or
concurrency modules, or of any project module outside core, wire and errors (STYLE.md rule 1).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "mesh_llm"
PURE_PACKAGES = ("core", "wire")
FORBIDDEN = frozenset(
    {
        "asyncio",
        "aioquic",
        "aiohttp",
        "socket",
        "os",
        "time",
        "threading",
        "subprocess",
        "ssl",
        "selectors",
    }
)
ALLOWED_PROJECT = ("mesh_llm.core", "mesh_llm.wire", "mesh_llm.errors")


def _is_allowed_project(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED_PROJECT)


def _resolve(node: ast.ImportFrom, module: str) -> str:
    """The absolute module of a `from ... import` inside `module` (dotted name)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join([*base, node.module] if node.module else base)


def _check_name(name: str, lineno: int) -> list[str]:
    if name.split(".")[0] in FORBIDDEN:
        return [f"line {lineno}: imports {name}"]
    if (name == "mesh_llm" or name.startswith("mesh_llm.")) and not _is_allowed_project(name):
        return [f"line {lineno}: imports {name}"]
    return []


def forbidden_imports(source: str, module: str) -> list[str]:
    """The forbidden imports in `source`, the text of the module named `module`."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                problems += _check_name(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module)
            if target == "mesh_llm":  # `from mesh_llm import x`: x is the module imported
                for alias in node.names:
                    problems += _check_name(f"mesh_llm.{alias.name}", node.lineno)
            else:
                problems += _check_name(target, node.lineno)
    return problems


def _pure_modules() -> list[Path]:
    return sorted(p for pkg in PURE_PACKAGES for p in (PACKAGE_ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    # A package keeps its `__init__` part so that relative imports resolve from the package.
    return ".".join(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)


def test_pure_packages_exist_and_are_walked() -> None:
    names = {_module_name(p) for p in _pure_modules()}
    assert {"mesh_llm.core.__init__", "mesh_llm.wire.__init__", "mesh_llm.core.types"} <= names


@pytest.mark.parametrize("path", _pure_modules(), ids=lambda p: str(p.relative_to(PACKAGE_ROOT)))
def test_pure_module_imports_no_io(path: Path) -> None:
    problems = forbidden_imports(path.read_text(encoding="utf-8"), _module_name(path))
    assert problems == [], f"{path} breaks the sans-I/O layering: {problems}"


@pytest.mark.parametrize(
    "source",
    [
        "import asyncio",
        "import os.path",
        "import time as clock",
        "from socket import socket",
        "from aioquic.quic import connection",
        "from concurrent import futures\nimport threading",
        "def f():\n    import subprocess",
        "if True:\n    from ssl import SSLContext",
        "import mesh_llm.net.transport",
        "from mesh_llm import node",
        "from mesh_llm.backend.llama import build_llama_argv",
        "from ..net import transport",
        "from .. import node",
    ],
)
def test_checker_flags_bad_imports(source: str) -> None:
    assert forbidden_imports(source, "mesh_llm.core.gossip") != []


@pytest.mark.parametrize(
    "source",
    [
        "import dataclasses\nimport random",
        "from mesh_llm.core.types import NodeId",
        "from mesh_llm.errors import ProtocolError",
        "from mesh_llm import errors, wire",
        "from mesh_llm.wire import codec",
        "from . import types",
        "from .types import NodeId",
        "from ..wire.codec import encode",
        "import timeit_not_time",
    ],
)
def test_checker_accepts_pure_imports(source: str) -> None:
    assert forbidden_imports(source, "mesh_llm.core.gossip") == []


def test_relative_imports_resolve_from_a_package_init() -> None:
    assert forbidden_imports("from . import types", "mesh_llm.core.__init__") == []
    assert forbidden_imports("from .. import node", "mesh_llm.core.__init__") != []
