"""The package's import graph, read from the source (nothing is imported): no cycles, imports
point one way through the layers, and imports inside functions only defer a heavy dependency."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "composeae"

# Each module's layer, by the longest matching module prefix. A module may import its own layer
# (without a cycle) and any lower one, never a higher one.
LAYERS = {
    "composeae.errors": 0, "composeae.config": 0, "composeae.storage": 0,
    "composeae.distributed": 0, "composeae.optim": 0, "composeae.losses": 0,
    "composeae.metrics": 0, "composeae.checkpoint": 0,
    "composeae.data": 1, "composeae.models": 1,
    "composeae.evaluate": 2,
    "composeae.report": 3,
    "composeae.run": 4, "composeae.api": 4,
    "composeae.registry": 5, "composeae.serve": 5,
    "composeae.sweep": 6, "composeae.nightly": 6,
    "composeae.cli": 7, "composeae.reference": 7, "composeae.testing": 7,
}
"""foundation -> data, models -> evaluate -> report -> run -> registry, serve -> sweep, nightly -> cli.
The registry (versions and aliases in storage) stands below nightly, which registers and promotes
in it; serving (index, search, the Ray Serve app) reads the registry and sits beside it, below
nightly, which builds a new champion's index; the test helpers stand apart at the top: nothing in
the library imports them.
`composeae/__init__.py` imports nothing."""

HEAVY = {"ray", "torch", "torchvision", "transformers", "tokenizers", "matplotlib",
         "tensorboardX", "optuna", "PIL"}
"""Third-party packages slow enough to import that a function may defer them."""


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


MODULES = _modules()


def _targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """Modules an import statement names (a `from pkg import mod` names `pkg.mod`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports() -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported module, at top level, line)]. Imports under `if TYPE_CHECKING:` are
    read by type checkers only, so they make no edge."""
    graph = {}
    for module, (path, is_package) in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", "") == "TYPE_CHECKING"
                       for inner in ast.walk(node)}
        top = {id(node) for node in tree.body}
        graph[module] = [(target, id(node) in top, node.lineno)
                         for node in ast.walk(tree)
                         if isinstance(node, (ast.Import, ast.ImportFrom))
                         and id(node) not in typing_only
                         for target in _targets(module, is_package, node)]
    return graph


GRAPH = _imports()


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _heavy_modules() -> set[str]:
    """Our modules whose import pulls in a heavy package (through top-level imports)."""
    heavy = {m for m, edges in GRAPH.items()
             if any(t.split(".")[0] in HEAVY for t, at_top, _ in edges if at_top)}
    changed = True
    while changed:
        changed = False
        for module, edges in GRAPH.items():
            if module not in heavy and any(t in heavy for t, at_top, _ in edges if at_top):
                heavy.add(module)
                changed = True
    return heavy


def test_every_module_has_a_layer():
    assert not [m for m in MODULES if m != "composeae" and not any(
        m == p or m.startswith(p + ".") for p in LAYERS)]


def test_no_import_points_upward():
    upward = [f"{m} -> {t} (line {line})" for m, edges in GRAPH.items() if m != "composeae"
              for t, _, line in edges if t in MODULES and t != "composeae"
              and _layer(t) > _layer(m)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_cycles():
    edges = {m: sorted({t for t, _, _ in e if t in MODULES and t != m}) for m, e in GRAPH.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in edges[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_imports_inside_functions_only_defer_heavy_modules():
    heavy = _heavy_modules()
    light = [f"{m}:{line} imports {t}" for m, edges in GRAPH.items()
             for t, at_top, line in edges if not at_top
             and t.split(".")[0] not in HEAVY and t not in heavy
             and t.split(".")[0] in ("composeae", "json", "tempfile", "uuid", "importlib")]
    assert not light, ("imports inside functions that defer nothing heavy (import them at the "
                       "top):\n" + "\n".join(light))


def test_no_module_shadows_ray():
    assert not [m for m in MODULES if m.split(".")[-1] in ("train", "tune")]


def test_models_and_data_stay_apart_and_off_ray():
    """Models are pure PyTorch (no Ray, no data plane, no files from storage); the data plane
    imports no model."""
    def bad(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
        return [f"{m} -> {t}" for m, edges in GRAPH.items() if m.startswith(prefix)
                for t, _, _ in edges if t.split(".")[0] == "ray" or t.startswith(forbidden)]

    assert not bad("composeae.models", ("composeae.data", "composeae.storage"))
    assert not bad("composeae.data", ("composeae.models",))
