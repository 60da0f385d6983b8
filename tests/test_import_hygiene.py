"""The engine imports no pytest and nothing of the glue; the package's imports form no cycle.

The split is documented in docs/dev/internals.md ("Engine and glue").
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest_layers

PACKAGE = Path(pytest_layers.__file__).parent
ROOT = PACKAGE.parent

#: The pytest glue: the only modules that may import pytest (hookspecs: pluggy; syrupy_ext:
#: syrupy, which imports pytest).
GLUE = {
    "pytest_layers.plugin",
    "pytest_layers.fixtures",
    "pytest_layers.definitions",
    "pytest_layers.datadir",
    "pytest_layers.hookspecs",
    "pytest_layers.syrupy_ext",
}


def _modules() -> list[str]:
    found = [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="pytest_layers.")]
    return sorted(["pytest_layers", *found])


def test_glue_list_names_real_modules() -> None:
    assert set(_modules()) >= GLUE


def test_engine_imports_no_pytest_nor_glue() -> None:
    """Every engine module (and the CLI, and the package itself), imported in a fresh
    interpreter, leaves pytest, pluggy and every glue module out of ``sys.modules``."""
    engine = [m for m in _modules() if m not in GLUE]
    code = (
        "import importlib, json, sys\n"
        f"for name in {engine!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    loaded = set(json.loads(done.stdout))
    forbidden = {"pytest", "_pytest", "pluggy", *GLUE}
    assert not loaded & forbidden, sorted(loaded & forbidden)
    assert set(engine) <= loaded


def test_public_names_still_reach_the_decorators() -> None:
    """``from pytest_layers import layer`` works although the package imports it lazily."""
    code = (
        "import sys, pytest_layers\n"
        "assert 'pytest' not in sys.modules\n"
        "from pytest_layers import layer, oci_image, layer_from_path, Layer, Rootfs\n"
        "from pytest_layers.definitions import layer as same\n"
        "assert layer is same and 'pytest' in sys.modules\n"
        "assert set(pytest_layers.__all__) <= set(dir(pytest_layers)) | "
        "{'layer', 'oci_image', 'layer_from_path'}\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports anywhere (module level, functions,
    TYPE_CHECKING blocks). ``from pkg import mod`` is an edge to ``mod``, not to ``pkg``."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            out.update(subs or [base])
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    modules = set(_modules())
    graph = {}
    for name in modules:
        rel = Path(*name.split(".")[1:])
        path = PACKAGE / rel / "__init__.py"
        if not path.exists():
            path = (PACKAGE / rel).with_suffix(".py")
        graph[name] = _imports(name, path, modules)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            found.append([*stack[stack.index(node) :], node])
            return
        if node in done:
            return
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_import_graph_has_no_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    """The check above can fail: a circle, also through a function-level import, is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    source = tmp_path / "store.py"
    source.write_text("def f():\n    from pytest_layers import plugin\n")
    modules = {"pytest_layers.plugin", "pytest_layers.store"}
    assert _imports("pytest_layers.store", source, modules) == {"pytest_layers.plugin"}


def test_engine_does_not_import_glue_anywhere() -> None:
    """Not even inside a function: no engine module names a glue module in an import."""
    graph = _graph()
    leaks = {m: sorted(deps & GLUE) for m, deps in graph.items() if m not in GLUE and deps & GLUE}
    # The package's lazy __getattr__ hands out the decorators: the one way down.
    assert leaks == {"pytest_layers": ["pytest_layers.definitions"]}


def test_internals_module_map_lists_every_module() -> None:
    """docs/dev/internals.md's module map names every module of the package, and its
    "Engine and glue" section names the glue modules this file checks."""
    text = (ROOT / "docs" / "dev" / "internals.md").read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| `")}
    missing = sorted(
        p.name
        for p in PACKAGE.glob("*.py")
        if p.name != "__init__.py" and f"`{p.name}`" not in rows
    )
    assert missing == []
    glue = text.split("## Engine and glue", 1)[1].split("\n## ", 1)[0]
    for name in GLUE:
        assert f"`{name.rsplit('.', 1)[1]}.py`" in glue, name
