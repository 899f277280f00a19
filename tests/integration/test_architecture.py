"""The package's layering, checked from the source: which layer may import which, and no cycles.

Each folder of ``hpcopt/`` is a layer whose module docstring says what it may import;
this test holds the code to those docstrings.  Imports are read with :mod:`ast`,
including imports inside functions and under ``TYPE_CHECKING`` (a cycle hidden in a
function is still a cycle for a reader).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "hpcopt"

# Layer -> the layers it may import (besides itself).  errors and config are the
# foundation; cli is the top.  A new edge needs a reason, not just an entry here.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "testing": {"errors"},
    "kernels": {"errors"},
    "comm": {"errors"},
    "numerics": {"errors", "kernels"},
    "problems": {"errors", "config", "numerics"},
    "distributed": {"errors", "comm", "numerics", "problems", "testing", "kernels"},
    "optimizers": {"errors", "config", "comm", "distributed", "kernels", "numerics", "problems", "testing"},
    "log": {"errors", "comm", "testing"},
    "training": {"errors", "config", "comm", "distributed", "log", "optimizers", "problems", "testing", "kernels"},
    "analysis": {"errors"},
    "jobs": {"errors", "config", "problems"},
    # The public Python API (hpcopt.problem, hpcopt.train, hpcopt.optimizer): a thin
    # layer over training, the optimizers and the problems, for users' scripts.
    "api": {
        "errors",
        "config",
        "comm",
        "distributed",
        "log",
        "numerics",
        "optimizers",
        "problems",
        "training",
        "kernels",
    },
    "cli": {
        "api",
        "errors",
        "config",
        "analysis",
        "comm",
        "jobs",
        "optimizers",
        "problems",
        "training",
        "kernels",
        "distributed",
        "log",
        "testing",
    },
}


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target in _imports(path):
            # `from pkg import sub` names a module; `from mod import attr` names the module only.
            if target in modules and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "hpcopt"


def test_every_layer_imports_only_what_its_docstring_allows() -> None:
    violations = []
    for module, targets in _graph().items():
        source = _layer(module)
        if source not in ALLOWED:
            continue  # hpcopt/__init__ and __main__
        for target in targets:
            layer = _layer(target)
            if layer != source and layer != "hpcopt" and layer not in ALLOWED[source]:
                violations.append(f"{module} imports {target}")
    assert not violations, "\n".join(sorted(violations))
    assert set(ALLOWED) >= {_layer(module) for module in _graph()} - {"hpcopt", "__main__"}


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_only_the_comm_layer_imports_mpi4py() -> None:
    offenders = [
        str(path.relative_to(REPO))
        for path in PACKAGE.rglob("*.py")
        if _layer(_module_name(path)) != "comm" and any(name.split(".")[0] == "mpi4py" for name in _imports(path))
    ]
    assert not offenders
