"""The package's layers, read from its source: the core imports nothing outside itself (not even asyncio, a socket or
a clock), each layer imports only the layers below it, no module imports itself through others (type-only imports
count), and the public modules say what they export."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import lambdabox.pytest_plugin
import lambdabox.testing

SOURCE = Path(lambdabox.__file__).parent
LAYERS: dict[str, int] = {  # a package may import those of a lower rank (and its own)
    "core": 0,
    "loop": 1,
    "sandbox": 2,
    "template": 2,
    "api": 2,
    "environment": 3,
    "observe": 4,
    "service": 5,
    "testing": 6,
    "cli": 6,
    "pytest_plugin": 7,
    "__main__": 7,
}
CORE_MAY_IMPORT = frozenset({"__future__", "collections", "dataclasses", "datetime", "enum", "functools", "gc",
                             "ipaddress", "json", "math", "pathlib", "time", "typing", "urllib"})  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[str]:
    """Every module ``path`` imports (``from a import b`` counts ``a.b`` where that is a module), type-only too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                if name.startswith("lambdabox.") and module_path(name) is not None:
                    yield name


def module_path(name: str) -> Path | None:
    base = SOURCE.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def graph() -> dict[str, set[str]]:
    return {
        module_name(path): {name for name in imports(path) if name.startswith("lambdabox.") and module_path(name)}
        for path in SOURCE.rglob("*.py")
    }


def layer(module: str) -> str:
    return module.split(".")[1]


def test_the_core_imports_nothing_outside_it() -> None:
    for path in (SOURCE / "core").rglob("*.py"):
        for name in imports(path):
            top = name.split(".")[0]
            inside = name == "lambdabox.core" or name.startswith("lambdabox.core.")
            assert inside or top in CORE_MAY_IMPORT, f"{module_name(path)} imports {name}"


def test_each_layer_imports_only_the_layers_below_it() -> None:
    for module, targets in graph().items():
        if module == "lambdabox":
            continue
        for target in targets:
            if layer(target) != layer(module):
                assert LAYERS[layer(target)] < LAYERS[layer(module)], f"{module} imports {target}"


def test_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [module, target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_public_modules_say_what_they_export() -> None:
    for module in (lambdabox.testing, lambdabox.pytest_plugin):
        exported = module.__all__
        assert exported and all(hasattr(module, name) for name in exported), module.__name__
