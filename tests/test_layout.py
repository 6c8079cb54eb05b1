"""The package's folders show its layers: few top-level modules, one docstring per subpackage saying what it
holds and may import, imports that follow it, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autobatch"

FOUNDATIONS = {"errors", "units", "validate", "_tree", "_version"}
# What each subpackage may import of autobatch, besides itself and the foundations (its docstring says so).
MAY_IMPORT = {
    "memory": set(),
    "step": {"memory", "distributed", "options"},
    "probing": {"memory", "step", "session", "options", "distributed", "result", "cache", "planner"},
    "cache": {"result"},
    "training": {"memory", "step", "session", "options", "distributed", "result", "planner", "probing"},
    "cli": {"api", "result", "options", "session", "planner", "cache", "memory", "step", "demo", "testing"},
    # the public API and the layers below it; its frameworks are imported nowhere else (tested below)
    "integrations": {
        "api",
        "result",
        "options",
        "session",
        "distributed",
        "planner",
        "memory",
        "step",
        "probing",
        "training",
    },
}
FRAMEWORKS = {"transformers", "accelerate", "lightning", "pytorch_lightning", "lightning_fabric"}
# Modules of those layers that a front may use: checks and parsing, never what runs a step.
FRONT_MAY_USE = {"memory.device", "step.stepper", "step.data", "cache.store"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runs(node: ast.AST) -> bool:
    """Whether ``node``'s body runs: not an ``if TYPE_CHECKING:`` block."""
    test = node.test if isinstance(node, ast.If) else None
    return not (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")


def _nodes(node: ast.AST, deep: bool) -> list[ast.AST]:
    out: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        if not _runs(child):
            continue
        out.append(child)
        if deep or isinstance(child, (ast.If, ast.Try, ast.With)):
            out += _nodes(child, deep)
    return out


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The autobatch modules ``path`` imports (at module level only, or anywhere; never for type checking)."""
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text()), deep=not top_level_only):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("autobatch"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("autobatch"))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {name for name in found if name in modules}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "autobatch"


def test_at_most_twenty_modules_at_the_top_level() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 20, top


@pytest.mark.parametrize("package", sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py")))
def test_every_subpackage_says_what_it_holds_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
    assert doc and "May import" in doc, package


def test_errors_imports_nothing_of_autobatch() -> None:
    assert imports(PACKAGE / "errors.py", top_level_only=False) == set()


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_layer_imports_only_what_its_docstring_allows(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    for path in (PACKAGE / package).rglob("*.py"):
        for name in imports(path, top_level_only=False):
            target = layer(name)
            if target in FOUNDATIONS or target == "autobatch":
                continue
            assert target in allowed, f"{module_name(path)} imports {name}"
            if package == "cli" and target in ("memory", "step", "cache"):
                assert ".".join(name.split(".")[1:3]) in FRONT_MAY_USE, f"{module_name(path)} imports {name}"


def test_no_import_cycles() -> None:
    graph = {module_name(p): imports(p, top_level_only=True) for p in PACKAGE.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt == "autobatch":
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_tests_mirror_the_package() -> None:
    tests = Path(__file__).resolve().parent
    for package in MAY_IMPORT:
        assert (tests / package / "__init__.py").exists(), package


def frameworks_imported(path: Path) -> set[str]:
    """The frameworks ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
    return found & FRAMEWORKS


def test_the_frameworks_are_imported_only_inside_integrations() -> None:
    for path in PACKAGE.rglob("*.py"):
        inside = path.relative_to(PACKAGE).parts[0] == "integrations" and path.name != "__init__.py"
        if not inside:
            assert not frameworks_imported(path), f"{module_name(path)} imports {frameworks_imported(path)}"
    assert frameworks_imported(PACKAGE / "integrations" / "transformers.py") == {"transformers"}
    assert frameworks_imported(PACKAGE / "integrations" / "lightning.py") == {
        "lightning",
        "pytorch_lightning",
    }
