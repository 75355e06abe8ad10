"""The package's layout, read from its imports: no cycles, and the CPU speed path behind one door.

Every ``import`` in ``moe_mpi`` is read with ``ast`` (also those inside
functions), relative ones resolved. The rules:

* no import cycle between modules;
* the core modules reach ``moe_mpi.cpu`` only through its door (the names
  of ``moe_mpi/cpu/__init__.py``), never a module inside it;
* ``moe_mpi.errors`` imports nothing from the package;
* no ``_private`` name is imported from another module of the package.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "moe_mpi"
# The engine: what `moe_mpi.load` and `shard_experts` run on every rank.
CORE = ("comm", "placement", "experts", "shard", "loading", "central", "adapters", "safetensors_io", "errors")


def _modules() -> dict:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()
# Compiled modules (moe_mpi/cpu/_gemv.c): imported by name, not read.
EXTENSIONS = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts) for p in PACKAGE.rglob("*.c")}


def _imports(name: str) -> list:
    """``(module, imported name or None, line)`` for every import in module ``name``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES or sub in EXTENSIONS:  # `from . import cpu`: the module itself
                    found.append((sub, None, node.lineno))
                else:
                    found.append((module, alias.name, node.lineno))
    return [(m, n, line) for m, n, line in found if m == "moe_mpi" or m.startswith("moe_mpi.")]


def _graph() -> dict:
    return {name: sorted({m for m, _, _ in _imports(name) if m in MODULES and m != name}) for name in MODULES}


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_reader_sees_the_package():
    assert {f"moe_mpi.{m}" for m in CORE} <= set(MODULES)
    assert "moe_mpi.cpu" in MODULES and "moe_mpi.cpu.decode" in MODULES
    # It reads function-level imports too: accelerate imports its parts lazily.
    assert "moe_mpi.cpu.decode" in _graph()["moe_mpi.cpu"]


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_check_can_fail():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]


@pytest.mark.parametrize("core", CORE)
def test_core_reaches_the_cpu_path_only_through_its_door(core):
    name = f"moe_mpi.{core}"
    past_the_door = [(m, n, line) for m, n, line in _imports(name) if m.startswith("moe_mpi.cpu.")]
    assert not past_the_door, f"{name} imports inside moe_mpi.cpu: {past_the_door}"


def test_errors_imports_nothing_from_the_package():
    assert _imports("moe_mpi.errors") == []


def test_no_private_names_across_modules():
    private = [
        (name, m, n, line)
        for name in MODULES
        for m, n, line in _imports(name)
        if n is not None and n.startswith("_") and not n.startswith("__") and m != name
    ]
    assert not private, f"private names imported across modules: {private}"
