"""Imports run only downward (issue 30). Every module of rksc/ is read with `ast`: its imports at
module level, inside functions and under `if TYPE_CHECKING`, absolute and relative. Each module
belongs to a unit (a top-level module such as rksc.paths, or a subpackage such as rksc.models),
each unit to a layer of LAYERS; docs/architecture.md shows the same table.
"""

from __future__ import annotations

import ast
import importlib.util
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rksc"

# bottom to top: a unit may import its own layer's units and those below, never one above
LAYERS = (
    ("rksc.errors", "rksc.validate", "rksc.paths"),  # base: errors, generic checks, $RKSC_HOME
    ("rksc.kernels", "rksc.cache"),  # compiled CPU kernels; the torch-free block pool
    ("rksc.models",),  # the catalogue, pulls, loading, weight formats
    ("rksc.engine",),  # sequences, scheduler, model runner, remote backend
    ("rksc.reasoning",),  # answers, selection, early exit, profiles, the tree, Solver
    ("rksc.bench", "rksc.server", "rksc.report", "rksc.results"),  # tooling and front ends
    ("rksc.cluster",),  # Ray: solves and bench shards on workers
    ("rksc.cli", "rksc"),  # the command line; the package's lazy public names
)
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}

# Function-level `import rksc...` / `from rksc...` lines anywhere in rksc/ (issue 30: at most 10,
# each for torch or an optional extra, with its reason; type-only imports count too).
MAX_FUNCTION_LEVEL_IMPORTS = 10

BENCH_EXTRA = ("scipy", "matplotlib", "pyarrow")  # pyproject.toml's `bench` extra


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def unit(module: str) -> str:
    return ".".join(module.split(".")[:2])


class Import:
    def __init__(self, source: str, target: str, line: int, in_function: bool):
        self.source, self.target, self.line, self.in_function = source, target, line, in_function

    def __repr__(self) -> str:
        where = "in a function" if self.in_function else "at module level"
        path = MODULES[self.source].relative_to(PACKAGE.parent)
        return f"{path}:{self.line} {where} -> {self.target}"


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import statement loads (a name that is a submodule counts as that module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the package holding this module
        package = module.split(".")
        package = package if MODULES[module].name == "__init__.py" else package[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    return list(dict.fromkeys(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                              for a in node.names))


def imports(module: str) -> list[Import]:
    """Every import statement of `module`, with whether it sits inside a function."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend(Import(module, t, child.lineno, in_function)
                             for t in _targets(child, module))
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            visit(child, inner)

    visit(ast.parse(MODULES[module].read_text(encoding="utf-8")), False)
    return found


def _lines(found: list[Import]) -> str:
    return "\n".join(map(repr, found))


ALL = [i for m in MODULES for i in imports(m)]
RKSC = [i for i in ALL if i.target == "rksc" or i.target.startswith("rksc.")]


def test_the_reader_resolves_relative_imports():
    def targets(code: str, module: str) -> list[str]:
        return [t for node in ast.parse(code).body for t in _targets(node, module)]

    assert targets("from . import stats, combine", "rksc.bench.harness") == [
        "rksc.bench.stats", "rksc.bench.combine"]
    assert targets("from ..errors import RkscError", "rksc.bench.harness") == ["rksc.errors"]
    assert targets("from .replay import evaluate", "rksc.bench") == ["rksc.bench.replay"]
    assert targets("from rksc import validate, RkscError", "rksc.paths") == ["rksc.validate", "rksc"]


def test_every_unit_has_a_layer():
    missing = sorted({unit(m) for m in MODULES} - set(LAYER))
    assert not missing, f"give {', '.join(missing)} a layer in LAYERS and docs/architecture.md"


def test_imports_never_go_up_a_layer():
    upward = [i for i in RKSC if LAYER.get(unit(i.target), -1) > LAYER.get(unit(i.source), -1)]
    assert not upward, "imports from a lower layer to a higher one:\n" + _lines(upward)


def test_packages_import_each_other_without_a_cycle():
    edges: dict[str, set[str]] = defaultdict(set)
    for i in RKSC:
        if unit(i.source) != unit(i.target):
            edges[unit(i.source)].add(unit(i.target))
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := cycle_from(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state:
            found = cycle_from(start, [start])
            assert found is None, "import cycle between packages: " + " -> ".join(found)


def test_few_function_level_imports_of_rksc():
    inside = [i for i in RKSC if i.in_function]
    lines = sorted({(i.source, i.line) for i in inside})
    assert len(lines) <= MAX_FUNCTION_LEVEL_IMPORTS, (
        f"{len(lines)} function-level rksc imports (at most "
        f"{MAX_FUNCTION_LEVEL_IMPORTS}); import at module level unless the reason is torch or an "
        "optional extra:\n" + _lines(inside))


def test_the_bench_extra_stays_in_bench_functions():
    extra = [i for i in ALL if i.target.split(".")[0] in BENCH_EXTRA]
    outside = [i for i in extra if unit(i.source) != "rksc.bench"]
    assert not outside, "the bench extra imported outside rksc.bench:\n" + _lines(outside)
    # the CLI's parser and a core install import rksc.bench modules; only their functions need it
    top = [i for i in extra if not i.in_function]
    assert not top, "the bench extra imported at module level:\n" + _lines(top)


@pytest.mark.parametrize("command", ["bench", "calibrate", "asks-curve", "asks-calibrate"])
def test_a_missing_bench_extra_is_one_line_and_exit_2(command, monkeypatch, capsys):
    from rksc.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else real(name, *a))
    assert main([command]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"rksc {command} needs the bench extra" in err
    assert "pip install 'rksc[bench]'" in err
