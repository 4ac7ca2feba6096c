"""The shape of the test suite itself: shared helpers live in tests/conftest.py, and no test module
imports another, so each runs alone and none is collected twice or depends on another's globals."""

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_modules(tree: ast.AST) -> set[str]:
    """Top-level names of every module an `import` or `from ... import` anywhere in the tree reads."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import test_x` or `from .test_x import y`
                names |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif node.module:
                names.add(node.module.split(".")[0])
    return names


def test_no_test_module_imports_another_test_module():
    modules = sorted(TESTS.glob("test_*.py"))
    assert len(modules) > 20  # the glob found the suite
    offending = {}
    for path in modules:
        found = {n for n in imported_modules(ast.parse(path.read_text(), str(path))) if n.startswith("test_")}
        if found:
            offending[path.name] = sorted(found)
    assert offending == {}, f"import shared helpers from conftest instead: {offending}"


def test_the_check_sees_imports_anywhere_in_a_module():
    source = "import os\nfrom conftest import run\ndef f():\n    from test_server import running\n" \
             "import test_results as r\nfrom . import test_ray\n"
    assert {n for n in imported_modules(ast.parse(source)) if n.startswith("test_")} == {
        "test_server", "test_results", "test_ray"}
