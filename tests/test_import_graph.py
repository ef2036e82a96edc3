"""llmq's import graph, read statically with ast: no cycles, no import of a higher layer, function-local imports
only for optional heavy dependencies, and neither ``import llmq`` nor ``import llmq.cli`` loads a method runner."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = "llmq"

# Layering, lowest first: primitives ← models/rollout/data ← decoding/trainers ← methods ← cli.
# A module may import modules of its own layer or of lower layers only. Its layer is that of its longest matching
# prefix below ("llmq" itself matches only the root __init__), so every new top-level module must be placed here.
LAYERS: dict[int, tuple[str, ...]] = {
    0: (  # primitives and infrastructure
        "llmq",
        "llmq.errors",
        "llmq.stats",
        "llmq.mdp",
        "llmq.losses",
        "llmq.qfunctions",
        "llmq.testing",
        "llmq.visualize",
        "llmq.checkpoints",
        "llmq.launch",
    ),
    1: ("llmq.models", "llmq.rollout", "llmq.data", "llmq.envs", "llmq.config"),
    2: ("llmq.decoding", "llmq.trainers", "llmq.evaluation", "llmq.explain"),
    3: ("llmq.methods",),
    4: ("llmq.cli",),
}
LAYER_OF = {prefix: layer for layer, prefixes in LAYERS.items() for prefix in prefixes}
# Optional extras that a function may import lazily (with a comment saying why), so importing llmq never needs them.
OPTIONAL = {"vllm", "deepspeed", "textworld", "textworld_express", "jericho"}
MODULE, FUNCTION, GETATTR = "module", "function", "__getattr__"  # where an import runs; GETATTR: a PEP 562 hook
ImportNode = ast.Import | ast.ImportFrom


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    where: str  # file:line
    scope: str  # MODULE (module-level class bodies included), FUNCTION, or GETATTR (a module-level __getattr__)
    commented: bool  # a comment on the import's lines or on the line just above
    text: str


@dataclass(frozen=True)
class Graph:
    modules: dict[str, str]  # dotted name -> file
    imports: list[Import]  # every import outside `if TYPE_CHECKING:`, of llmq modules or not

    @property
    def internal(self) -> list[Import]:
        return [imp for imp in self.imports if imp.target in self.modules]


def _imports_in(node: ast.AST, scope: str = MODULE, in_class: bool = False) -> Iterator[tuple[ImportNode, str]]:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node, scope
        return
    type_checking = isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
    children = node.orelse if isinstance(node, ast.If) and type_checking else ast.iter_child_nodes(node)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        hook = scope == MODULE and not in_class and getattr(node, "name", None) == "__getattr__"
        scope = GETATTR if hook or scope == GETATTR else FUNCTION
    for child in children:
        yield from _imports_in(child, scope, in_class or isinstance(node, ast.ClassDef))


def _targets(node: ImportNode, module: str, modules: dict[str, str]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: the importing module's package, less level - 1 trailing parts
        package = module.split(".")[: None if modules[module].endswith("__init__.py") else -1]
        base = ".".join(package[: len(package) + 1 - node.level] + ([base] if base else []))
    return {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names}


def collect_imports(package_dir: Path = REPO / ROOT) -> Graph:
    files = {path.relative_to(package_dir.parent).as_posix(): path for path in sorted(package_dir.rglob("*.py"))}
    modules = {file.removesuffix(".py").removesuffix("/__init__").replace("/", "."): file for file in files}
    imports: list[Import] = []
    for name, file in modules.items():
        source = files[file].read_text()
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        comments = {token.start[0] for token in tokens if token.type == tokenize.COMMENT}
        for node, scope in _imports_in(ast.parse(source, file)):
            commented = not comments.isdisjoint(range(node.lineno - 1, (node.end_lineno or node.lineno) + 1))
            for target in sorted(_targets(node, name, modules)):
                imports.append(Import(name, target, f"{file}:{node.lineno}", scope, commented, ast.unparse(node)))
    return Graph(modules, imports)


def layer_of(module: str) -> int | None:
    prefixes = [p for p in LAYER_OF if module == p or (p != ROOT and module.startswith(p + "."))]
    return LAYER_OF[max(prefixes, key=len)] if prefixes else None


def strongly_connected_components(successors: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (recursive: the package has dozens of modules, not thousands)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(successors.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            components.append(set(stack[stack.index(node) :]))
            del stack[stack.index(node) :]

    for node in sorted(successors):
        if node not in index:
            visit(node)
    return components


@pytest.fixture(scope="module")
def graph() -> Graph:
    return collect_imports()


def test_llmq_import_graph_has_no_cycles(graph: Graph) -> None:
    successors = {module: {imp.target for imp in graph.internal if imp.source == module} for module in graph.modules}
    cycles: list[str] = []
    for component in strongly_connected_components(successors):
        if len(component) > 1:
            edges = [f"    {imp.where}: {imp.text}" for imp in graph.internal if {imp.source, imp.target} <= component]
            cycles.append("\n".join([" <-> ".join(sorted(component)), *edges]))
    assert not cycles, "import cycles (the modules, then the imports that form each):\n" + "\n".join(cycles)


def test_no_module_imports_a_higher_layer(graph: Graph) -> None:
    violations = [
        f"{file}: {name} is in no layer: place it in LAYERS in tests/{Path(__file__).name}"
        for name, file in sorted(graph.modules.items())
        if layer_of(name) is None
    ]
    for imp in graph.internal:
        source, target = layer_of(imp.source), layer_of(imp.target)
        if source is not None and target is not None and target > source:
            violations.append(f"{imp.where}: {imp.source} (layer {source}) imports {imp.target} (layer {target})")
    assert not violations, "layering violations:\n" + "\n".join(violations)


def test_function_local_imports_are_only_for_optional_heavy_dependencies(graph: Graph) -> None:
    # A bridge module (llmq.rollout.vllm, llmq.envs.textworld) imports an optional extra; importing it lazily is lazy
    # too.
    heavy = {imp.source for imp in graph.imports if imp.target.split(".")[0] in OPTIONAL}
    offenders = [
        f"{imp.where}: {imp.text}"
        for imp in graph.imports
        if imp.scope != MODULE
        and not (
            (imp.target.split(".")[0] in OPTIONAL or imp.target in heavy) and (imp.commented or imp.scope == GETATTR)
        )
    ]
    assert not offenders, (
        f"a function-local import must target an optional dependency ({', '.join(sorted(OPTIONAL))}) or an llmq "
        "module importing one, with a comment saying why; move these to module level:\n"
        + "\n".join(dict.fromkeys(offenders))
    )


def test_importing_llmq_pulls_in_no_method_runner() -> None:
    script = "import sys, llmq, llmq.cli; print(*sorted(sys.modules), sep='\\n')"
    run = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=REPO)
    runners = ("llmq.pipeline", "llmq.digiq", "llmq.qvm")
    # The registry (llmq.methods itself) names the methods' modules; importing it imports none of them.
    pulled = [name for name in run.stdout.split() if name.startswith("llmq.methods.") or name in runners]
    assert not pulled, f"import llmq / import llmq.cli loaded method runners: {', '.join(pulled)}"
