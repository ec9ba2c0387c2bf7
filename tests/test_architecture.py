"""The architecture holds: import layers, no import cycles, every backend meets the contract.

The layers are import-linter contracts in ``pyproject.toml`` (see docs/architecture.md); the
cycle check reads every ``import`` of the package (module level and inside functions) with
:mod:`ast`, so it needs nothing installed.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from adamnp import backends

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adamnp"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """``{module: adamnp modules it imports}``, relative imports resolved."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def test_import_graph_is_read():
    graph = _import_graph()
    assert "adamnp.lowbit.reference" in graph["adamnp.backends.numpy"]
    assert "adamnp.backends.math" in graph["adamnp.backends.numba.util"]
    assert len(graph) > 30


def test_no_import_cycles():
    graph = _import_graph()
    done, path, cycles = set(), [], []

    def visit(module):
        if module in path:
            cycles.append([*path[path.index(module) :], module])
            return
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_import_layers_hold():
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


@pytest.mark.parametrize("name", backends.NAMES)
def test_every_backend_meets_the_contract(name):
    module = backends.get(name)  # the CUDA one imports without numba-cuda or a GPU
    assert isinstance(module, backends.Backend)
    assert module.NAME == name
    for attr in backends.CONTRACT[1:]:
        wanted = list(inspect.signature(getattr(backends.Backend, attr)).parameters.values())[1:]
        got = list(inspect.signature(getattr(module, attr)).parameters.values())
        required = [p for p in got if p.default is inspect.Parameter.empty]
        # called positionally: the same number of arguments, any further ones optional
        assert len(required) <= len(wanted) <= len(got), (name, attr, got, wanted)


def test_contract_lists_what_the_core_calls():
    """Every backend function the layers above call through a backend module is in the
    contract (the core names the module ``be`` or ``xp``)."""
    used = set()
    for name in ("_api", "_validate", "_checkpoint", "_state", "_background"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.value.id in ("be", "xp"):
                    used.add(node.attr)
    assert {"step_group", "nonfinite_leaf", "owns"} <= used  # the scan sees the calls
    optional = set(backends.OPTIONAL)  # fast paths the core takes when a backend offers them
    assert used - optional <= set(backends.CONTRACT), sorted(used - set(backends.CONTRACT))
