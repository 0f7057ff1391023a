"""The package's layers: every import inside austeer_peft (also those inside functions) goes down the layers
tuner < hub < fitting < evaluate < cli, and no module imports itself back through others (no cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import austeer_peft

PACKAGE = Path(austeer_peft.__file__).resolve().parent
# Each layer may import the layers listed before it, never one after it.
LAYERS = ("tuner", "hub", "fitting", "evaluate", "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, name: str) -> set[str]:
    """Every austeer_peft module that the module ``name`` (source ``path``) imports, at any depth of its code
    (functions and classes included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("austeer_peft"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("austeer_peft"):
                target = node.module
            else:
                continue
            # `from . import x` may name a submodule x: count it as importing that module.
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_path(candidate) is not None else target)
    return {module for module in found if module != name}


def module_path(name: str):
    relative = Path(*name.split(".")[1:])
    for path in (PACKAGE / relative.with_suffix(".py"), PACKAGE / relative / "__init__.py"):
        if path.is_file():
            return path
    return None


def import_graph() -> dict[str, set[str]]:
    return {module_name(path): imported_modules(path, module_name(path)) for path in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    """Index of the module's layer; the top-level package (the public API) sits above every layer."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_the_layers_are_all_the_subpackages():
    subpackages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert subpackages - {"model_cards"} <= set(LAYERS), subpackages


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                    for target in targets if layer(target) > layer(module))
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ that re-exports its own modules is not a cycle unless a module imports the __init__ back.
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The walk reaches imports nested in functions and methods, where the old cycles hid, relative or absolute."""
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\n\nclass A:\n    def f(self):\n        from ..cli import main\n\n"
                     "def g():\n    import austeer_peft.evaluate.sweep\n    from .config import AUSteerConfig\n")
    found = imported_modules(probe, "austeer_peft.tuner.probe")
    assert found == {"austeer_peft.cli", "austeer_peft.evaluate.sweep", "austeer_peft.tuner.config"}
    assert sorted(layer(module) > layer("austeer_peft.tuner.probe") for module in found) == [False, True, True]
