"""Rules of the code's shape: no import cycles in gptjax/ (function-local imports included), and every entry of
the precision registry has its code in each place that implements modes."""

from __future__ import annotations

import ast
from pathlib import Path

import gptjax
from gptjax import precision

ROOT = Path(gptjax.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (never executed, so no import at run time)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def _resolve(name: str, modules: set[str]) -> str | None:
    """The gptjax module an imported dotted name lands in (the longest known prefix), if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the gptjax modules it imports, at top level or inside functions (from ... import of a
    submodule counts as importing that submodule)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped, package = _type_checking_only(tree), name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets |= {_resolve(a.name, modules) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
                targets |= {_resolve(f"{base}.{a.name}", modules) for a in node.names}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_sees_function_local_and_relative_imports():
    graph = import_graph()
    assert "gptjax.backends.jax.model" in graph["gptjax.backends.jax.layers"]  # top level
    assert "gptjax.precision" in graph["gptjax.config"]  # from gptjax import precision: the submodule
    assert "gptjax.errors" in graph["gptjax.tracing.metrics"]  # inside a function


def test_no_import_cycles_in_gptjax():
    assert cycles(import_graph()) == []


def test_every_precision_mode_has_its_code_everywhere():
    # the registry declares a mode; each of these holds its implementation, keyed by the registry's names
    from gptjax import quantize
    from gptjax.backends import numpy_ref
    from gptjax.backends.jax import convert, kv

    assert set(quantize.CONVERTERS) == set(precision.STORAGES)
    assert set(convert.LAYERS) == set(numpy_ref.MATRICES) == set(precision.MODES)
    assert set(kv.KV_LAYERS) == set(numpy_ref.CACHES) == set(precision.KV_CACHES)
    for m in precision.MODES.values():
        assert m.storage in precision.STORAGES and m.kv_cache in precision.KV_CACHES, m


def test_the_registry_imports_nothing_of_gptjax_but_its_error_type():
    # so that any module (config, quantize, the CLI, the bench) can read it without a cycle
    assert import_graph()["gptjax.precision"] == {"gptjax.errors"}
