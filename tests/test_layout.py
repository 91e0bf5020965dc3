"""The package's layout as rules: who may import whom, sizes, and no import cycle (docs/layout.md).

Imports are read from the source (every ``import`` statement, inside functions and under
``TYPE_CHECKING`` too), so a rule holds for the code as written, not only for what one run imports.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "daemon"
ML_LIBRARIES = {"torch", "transformers", "datasets", "accelerate", "peft", "tokenizers"}
# The entry point of `python -m daemon` and train.py hands the training subcommands to daemon.training.cli,
# and `serve` to daemon.serving.cli.
ENTRY_POINT = "daemon.__main__"
# The packages of the processes that load a model: only they import the ML libraries when imported, and only
# the entry point imports them. The serving process (`python -m daemon serve`) is started on its own, beside
# the daemon, like the training child; neither imports the other.
MODEL_PROCESSES = ("daemon.training", "daemon.serving")
MAX_MODULE_LINES = 450
MAX_CLASS_LINES = 250


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _at_import_time(tree: ast.Module) -> list[ast.stmt]:
    """The statements a module runs when imported: not in a function, not under ``if TYPE_CHECKING``."""
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        found.append(node)
        todo.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
    return found


def _imports(path: Path, at_import_time: bool = False) -> set[str]:
    """Every module of the repo or top-level library that ``path`` imports: wherever the statement is, or only
    the statements that run when the module is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in _at_import_time(tree) if at_import_time else ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return found


@functools.cache  # the whole package parsed once, not once per module asked about
def _graph() -> dict[str, set[str]]:
    return {name: {m for m in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def _package(name: str) -> str | None:
    return next((p for p in MODEL_PROCESSES if name == p or name.startswith(p + ".")), None)


def test_nothing_outside_training_or_serving_imports_it():
    outside = {
        name: sorted(m for m in _graph()[name] if _package(m) not in (None, _package(name)))
        for name in MODULES
        if name != ENTRY_POINT
    }
    assert {name: found for name, found in outside.items() if found} == {}


def test_only_training_and_serving_import_the_ml_libraries_when_imported():
    """Importing the daemon process's modules loads no ML library (start-up cost belongs to the training
    child and the server); nor does the store, the quality gate or the views, which all processes and the
    subcommands without a model use. A function the training process calls may import one where it runs."""
    heavy = {
        name: sorted({m.split(".")[0] for m in _imports(path, at_import_time=True)} & ML_LIBRARIES)
        for name, path in MODULES.items()
        if _package(name) is None
    }
    assert {name: found for name, found in heavy.items() if found} == {}


def test_no_import_cycle():
    graph, order, low, stack, cycles = _graph(), {}, {}, [], []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        order[node] = low[node] = len(order)
        stack.append(node)
        for child in graph[node]:
            if child not in order:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in stack:
                low[node] = min(low[node], order[child])
        if low[node] == order[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in order:
            visit(node)
    assert cycles == []


def test_every_module_and_class_stays_readable_in_size():
    long_modules = {
        name: lines
        for name, path in MODULES.items()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    long_classes = {
        f"{name}.{node.name}": node.end_lineno - node.lineno + 1
        for name, path in MODULES.items()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES
    }
    assert (long_modules, long_classes) == ({}, {})


def test_the_rules_see_the_imports_they_forbid(tmp_path):
    """The reader finds imports inside functions and under TYPE_CHECKING (a rule that sees nothing passes)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from daemon.training.run import setup\n"
        "def f():\n    import torch\n    from daemon.store import ledger\n"
    )
    assert {"daemon.training.run", "torch", "daemon.store.ledger"} <= _imports(probe)
    assert {"typing"} == _imports(probe, at_import_time=True)


def test_the_map_in_docs_layout_names_every_module_under_its_package():
    """docs/layout.md's map lists each module below its folder's line: a module added without a line there is
    missing from the page people are sent to (four were, until a review found them)."""
    listed, folder = set(), None
    for line in (REPO / "docs" / "layout.md").read_text().splitlines():
        if line.startswith("daemon/"):
            folder = line.split()[0].rstrip("/")
        elif folder and line.startswith("  ") and line.split()[0].endswith(".py"):
            listed.add(f"{folder}/{line.split()[0]}")
        elif line and not line.startswith(" "):
            folder = None
    on_disk = {p.relative_to(REPO).as_posix() for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    assert on_disk - listed == set(), "modules without a line in docs/layout.md"
    assert listed - on_disk == set(), "lines in docs/layout.md for modules that do not exist"
