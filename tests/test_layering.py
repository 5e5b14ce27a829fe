"""The package's layers point one way (docs/ARCHITECTURE.md): every import of a diffprune module, at module level
or inside a function, goes to the same layer or one below; no two packages import each other; no private name is
imported across modules; a function-level import of the package's own modules needs a reason. Read from the
source with ast, so nothing is imported and the test takes well under a second."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "diffprune"

# lowest first; a module belongs to the longest entry that is a prefix of its dotted name
LAYERS = [
    # the root __init__ imports nothing at run time (its lazy loader resolves names on first use)
    ["diffprune", "diffprune.errors", "diffprune.util", "diffprune.distributed", "diffprune.data",
     "diffprune.figures", "diffprune.tables"],
    ["diffprune.models"],                                           # units, graph, MACs
    ["diffprune.metrics"],                                          # quality of images, no model involved
    ["diffprune.grid", "diffprune.sampling", "diffprune.noise", "diffprune.images"],  # one rollout; the forward process
    ["diffprune.schedule", "diffprune.structural", "diffprune.train"],  # the methods
    ["diffprune.capture", "diffprune.zoo"],                         # whole rollouts captured; named models
    # measuring rollouts; samples to look at; a training run as the commands start it (models by zoo name)
    ["diffprune.evaluate", "diffprune.evaluate_text", "diffprune.latency", "diffprune.benchmark", "diffprune.gallery",
     "diffprune.train.run"],
    ["diffprune.demo"],
    ["diffprune.cli", "diffprune.__main__"],
]

# (importer, imported): why this import may run against the layers or sit inside a function
ALLOWED: dict = {}  # none left; an entry needs its reason, e.g. a real cycle that cannot be broken
# every function-level import of these modules is allowed, for the reason given
LAZY_MODULES = {
    "diffprune.cli": "build_parser imports every command: the library (diffusers, torch-pruning) loads only when "
                     "a command runs, so `diffprune --help` stays fast",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path):
    """(imported module, imported names, at function level?, line) for each import of a diffprune module;
    imports under `if TYPE_CHECKING:` are left out (they never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []

    def target(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom):
                mod = target(child)
                if mod.split(".")[0] == "diffprune":
                    for alias in child.names:  # `from diffprune import sampling` imports the module diffprune.sampling
                        sub = f"{mod}.{alias.name}"
                        found.append((sub, None, inner, child.lineno) if sub in MODULES
                                     else (mod, alias.name, inner, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, None, inner, child.lineno) for a in child.names
                             if a.name.split(".")[0] == "diffprune")
            visit(child, inner)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def _layer(name: str) -> int:
    best = max(((len(entry), i) for i, layer in enumerate(LAYERS) for entry in layer
                if name == entry or (entry != "diffprune" and name.startswith(entry + "."))), default=None)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS here and to docs/ARCHITECTURE.md")
    return best[1]


def _package(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _lazy_reason(name: str):
    return next((why for m, why in LAZY_MODULES.items() if name == m or name.startswith(m + ".")), None)


EDGES = [(name, *imp) for name, path in MODULES.items() for imp in _imports(name, path)]


def test_every_module_has_a_layer():
    for name in MODULES:
        _layer(name)


def test_imports_point_down():
    wrong = [f"{a}:{line} imports {b} (layer {_layer(a)} -> {_layer(b)})" for a, b, _, _, line in EDGES
             if _layer(b) > _layer(a) and (a, b) not in ALLOWED]
    assert not wrong, "imports against the layering (docs/ARCHITECTURE.md):\n" + "\n".join(wrong)


def test_no_function_level_imports_without_a_reason():
    lazy = [f"{a}:{line} imports {b} inside a function" for a, b, _, inner, line in EDGES
            if inner and (a, b) not in ALLOWED and not _lazy_reason(a)]
    assert not lazy, ("import at module level, or give the reason in ALLOWED (an optional dependency, a real "
                      "cycle):\n" + "\n".join(lazy))


def test_no_private_names_across_modules():
    private = [f"{a}:{line} imports {b}.{n}" for a, b, n, _, line in EDGES
               if n and n.startswith("_") and not n.startswith("__") and b != a]
    assert not private, "make the name public where it is defined:\n" + "\n".join(private)


def test_no_package_cycles():
    graph: dict[str, set[str]] = {}
    for a, b, _, _, _ in EDGES:
        if _package(a) != _package(b) and (a, b) not in ALLOWED:
            graph.setdefault(_package(a), set()).add(_package(b))
    state: dict[str, int] = {}

    def cycle_from(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loop = trail + [node]
                return loop[loop.index(nxt):] + [nxt]
            if nxt not in state and (found := cycle_from(nxt, trail + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = cycle_from(start, [])
            assert not found, "packages import each other: " + " -> ".join(found)


def test_allow_list_is_current():
    """An allowed import that no longer exists is taken off the list, so that it cannot come back unseen."""
    seen = {(a, b) for a, b, _, _, _ in EDGES}
    stale = sorted(set(ALLOWED) - seen)
    assert not stale, f"remove from ALLOWED: {stale}"


@pytest.mark.parametrize("bad, expected", [
    ("from ..latency import time_rollout\n", "imports against the layering"),
    ("def f():\n    from ..sampling import make_scheduler\n", "inside a function"),
    ("from ..sampling import _private\n", "make the name public"),
])
def test_the_checks_catch_a_bad_import(tmp_path, monkeypatch, bad, expected):
    """The same checks on a copy of one module with a bad import added fail with the message that says why."""
    fake = tmp_path / "diffprune" / "metrics" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(bad)
    extra = [("diffprune.metrics.fake", *imp) for imp in _imports("diffprune.metrics.fake", fake)]
    monkeypatch.setattr(sys.modules[__name__], "EDGES", EDGES + extra)
    checks = [test_imports_point_down, test_no_function_level_imports_without_a_reason,
              test_no_private_names_across_modules]
    messages = []
    for check in checks:
        try:
            check()
        except AssertionError as e:
            messages.append(str(e))
    assert any(expected in m and "diffprune.metrics.fake" in m for m in messages), messages


def test_public_api_is_visible_to_tools():
    """The lazy loader's names, its `__all__` and its TYPE_CHECKING imports (what IDEs and type checkers read)
    are the same set, and each name loads from the module the loader names. (The loader itself is asked:
    once the module diffprune.evaluate is imported, Python sets the attribute diffprune.evaluate to it.)"""
    import importlib

    import diffprune
    tree = ast.parse((ROOT / "__init__.py").read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))
    seen = {}
    for node in block.body:
        for alias in node.names:
            seen[alias.name] = "diffprune." + node.module
    assert seen == diffprune._EXPORTS and sorted(seen) == diffprune.__all__
    for name, module in seen.items():
        assert diffprune.__getattr__(name) is getattr(importlib.import_module(module), name)
