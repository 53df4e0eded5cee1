"""The package's shape: modules import each other in one direction only, and its docstring shows the floors."""

import ast
import graphlib
from pathlib import Path

import lora_helpers

PACKAGE = Path(lora_helpers.__file__).parent


def sibling_imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in it, inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.module == "lora_helpers" or (node.level == 1 and node.module is None):
                found |= {alias.name for alias in node.names}
            elif node.module and (node.module.startswith("lora_helpers.") or node.level == 1):
                found.add(node.module.removeprefix("lora_helpers.").split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("lora_helpers.")}
    return (found & modules) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    return {name: sibling_imports(PACKAGE / f"{name}.py", modules) for name in sorted(modules)}


def floors(graph: dict[str, set[str]]) -> list[list[str]]:
    """Modules by floor: floor 0 imports no sibling, floor n only modules below it."""
    level = {}
    for name in graphlib.TopologicalSorter(graph).static_order():  # raises CycleError naming the circle
        level[name] = 1 + max((level[d] for d in graph[name]), default=-1)
    return [sorted(n for n, floor in level.items() if floor == f) for f in range(max(level.values()) + 1)]


def test_sibling_imports_are_read_from_every_import_statement(tmp_path):
    module = tmp_path / "example.py"
    module.write_text(
        "from lora_helpers import files, chat\n"
        "def f():\n    from lora_helpers import models\n    import lora_helpers.plan\n"
        "from .data import x\n"
    )
    assert sibling_imports(module, {"files", "chat", "models", "plan", "data", "tiny"}) == {
        "files",
        "chat",
        "models",
        "plan",
        "data",
    }


def test_no_import_circle():
    """Every module stands on the ones below it, imports inside functions included: a circle fails here."""
    floors(import_graph())


def test_the_package_docstring_shows_its_floors():
    """The floors a newcomer reads in ``lora_helpers/__init__.py`` are the ones the imports make."""
    written = [
        line.split(":", 1)[1].replace(",", " ").split()
        for line in lora_helpers.__doc__.splitlines()
        if line.strip().startswith("floor ")
    ]
    assert written == floors(import_graph())
