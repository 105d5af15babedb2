"""Rules of the code's shape: no import cycles in gptjax/ and no import that runs up the layers (function-local
imports included in both), and every entry of the precision registry has its code in each place that implements
modes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import gptjax
from gptjax import precision

ROOT = Path(gptjax.__file__).parent

# The layers, lowest first: a module imports modules of its own layer and the layers below, never one above
# (DESIGN.md: cli -> {serve, bench} -> {train, distill, backends} -> {config, precision, weights, sampling, ...}).
# An entry names a module or a package: "gptjax.backends" places gptjax/backends/ and every module under it, so a
# new module of a package listed here has its layer already; a new top-level module must be added (the root
# package "gptjax" places itself only).
LAYERS = {
    # nothing of gptjax below them: the error type, the version, shared predicates, the clock and statistics
    "base": ("gptjax.errors", "gptjax.version", "gptjax.checks", "gptjax.timing"),
    # the model-agnostic library: config, the precision registry, weights and their conversion, tokenizers and
    # corpora, the sampling settings and rules, scoring, speculative decoding's rules, the mesh
    "core": ("gptjax.precision", "gptjax.config", "gptjax.sizes", "gptjax.sampling", "gptjax.tokenizer",
             "gptjax.peaks", "gptjax.safetensors_io", "gptjax.quantize", "gptjax.weights", "gptjax.sharding",
             "gptjax.data", "gptjax.heldout", "gptjax.generate", "gptjax.scoring", "gptjax.speculative"),
    # the backends, their compiled kernels, the observability that wraps them, and the public API re-exporting them
    "backends": ("gptjax.backends", "gptjax._cpu_kernels", "gptjax.tracing", "gptjax"),
    # what runs a backend or a model for a result: training, distillation, the precision report, exports (GGUF)
    "workflows": ("gptjax.train", "gptjax.distill", "gptjax.precision_report", "gptjax.export"),
    # the applications: the HTTP server and the benchmark harness
    "apps": ("gptjax.serve", "gptjax.bench"),
    "cli": ("gptjax.cli",),
}
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}

# Upward imports tolerated for now, each with the change that removes it; the test fails once one is gone
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}  # (importer, imported) -> why, for a move in progress

# compiled extension modules (no .py file): `from gptjax import _cpu_kernels` imports one of these, not the package
EXTENSIONS = set(re.findall(r'Extension\(\s*"([\w.]+)"', (ROOT.parent / "setup.py").read_text(encoding="utf-8")))


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
    modules = set(files) | EXTENSIONS
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


def layer_of(module: str) -> str | None:
    """The layer of the LAYERS entry naming the module or its closest package (None when none does)."""
    name = module
    while name:
        for layer, entries in LAYERS.items():
            if name in entries:
                return layer
        name = name.rpartition(".")[0]
        if name == ROOT.name:  # the root package's entry places the root package only
            return None
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) for every import of a module in a higher layer than the importer's."""
    return sorted((m, t) for m, targets in graph.items() for t in targets
                  if layer_of(m) and layer_of(t) and RANK[layer_of(t)] > RANK[layer_of(m)])


def test_the_layering_check_finds_upward_imports():
    graph = {"gptjax.timing": {"gptjax.bench.report"}, "gptjax.train.loop": {"gptjax.backends.jax.model"},
             "gptjax.serve.app": {"gptjax.bench"}, "gptjax.precision": {"gptjax"}, "gptjax.cli.new": {"gptjax.cli"}}
    assert upward_imports(graph) == [("gptjax.precision", "gptjax"), ("gptjax.timing", "gptjax.bench.report")]
    assert layer_of("gptjax.train.loop") == "workflows" and layer_of("gptjax") == "backends"
    assert layer_of("gptjax.brand_new") is None and layer_of("gptjax.tracing.wrapper") == "backends"


def test_every_gptjax_module_has_a_layer():
    missing = sorted(m for m in set(import_graph()) | EXTENSIONS if layer_of(m) is None)
    assert not missing, (f"{', '.join(missing)}: place each in LAYERS (tests/test_architecture.py), in the lowest "
                         "layer whose modules may import it: at or above the layers of what it imports")


def test_no_import_runs_up_the_layers():
    found = upward_imports(import_graph())
    upward = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})" for m, t in found if (m, t) not in ALLOWED_UPWARD]
    assert not upward, ("imports that run up the layers (a layer imports itself and those before it: "
                        f"{', '.join(LAYERS)}); move the imported code down to a layer both may import:\n"
                        + "\n".join(upward))
    gone = set(ALLOWED_UPWARD) - set(found)
    assert not gone, f"no longer imported: delete {sorted(gone)} from ALLOWED_UPWARD"


def test_every_precision_mode_names_a_known_storage_and_kv_cache():
    # each mode's code is looked up from these names (tests/test_precision.py checks both backends resolve it)
    for m in precision.MODES.values():
        assert m.storage in precision.STORAGES and m.kv_cache in precision.KV_CACHES, m


def test_the_registry_imports_nothing_of_gptjax_but_its_error_type():
    # so that any module (config, quantize, the CLI, the bench) can read it without a cycle
    assert import_graph()["gptjax.precision"] == {"gptjax.errors"}
