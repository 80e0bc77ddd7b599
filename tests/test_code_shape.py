"""The code's shape, checked statically: short functions, no import cycles, steps called by keyword, no local
name hiding a module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("bloodcell/**/*.py"), *ROOT.glob("components/*.py"), ROOT / "pipeline.py"])
MODULES = {  # dotted name below bloodcell -> file
    ".".join(path.relative_to(ROOT / "bloodcell").with_suffix("").parts): path
    for path in ROOT.glob("bloodcell/**/*.py")
    if path.name != "__init__.py"
}
MAX_FUNCTION_LINES = 60
STEPS = ("ingest", "split", "train", "evaluate", "report")


def functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def imported_names(tree: ast.AST) -> set[str]:
    """Names a module binds by import anywhere in it (modules, and lower-case functions or submodules)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names if alias.name[0].islower()}
    return names


def bloodcell_imports(tree: ast.AST) -> set[str]:
    """The bloodcell modules a module imports, anywhere in it (dotted names below ``bloodcell``)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bloodcell":
            package = node.module.removeprefix("bloodcell").lstrip(".")  # type: ignore[union-attr]
            for alias in node.names:
                name = f"{package}.{alias.name}" if package else alias.name
                found.add(name if name in MODULES else package)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("bloodcell.") for a in node.names if a.name.startswith("bloodcell.")}
    return found & set(MODULES)


def test_no_function_is_longer_than_sixty_lines():
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"  # type: ignore[operator]
        for path in SOURCES
        for node in functions(ast.parse(path.read_text()))
        if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES  # type: ignore[operator]
    ]
    assert not long


def test_no_local_name_hides_an_imported_module():
    hidden = []
    for path in SOURCES:
        tree = ast.parse(path.read_text())
        imported = imported_names(tree)
        for node in functions(tree):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            bound = {argument.arg for argument in arguments}
            bound |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            hidden += [f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {name}" for name in bound & imported]
    assert not hidden


def test_the_package_has_no_import_cycles():
    """Function-level imports included: a cycle there is still two modules that cannot be read apart."""
    graph = {name: bloodcell_imports(ast.parse(path.read_text())) - {name} for name, path in MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo += graph[module]
        return False

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles


def test_every_step_takes_keyword_arguments_only():
    """Nine strings forwarded by position are one swap away from a silent mix-up."""
    tree = ast.parse((ROOT / "bloodcell" / "steps.py").read_text())
    steps = {node.name: node for node in functions(tree) if node.name in STEPS}
    assert set(steps) == set(STEPS)
    positional = {name: [a.arg for a in node.args.posonlyargs + node.args.args] for name, node in steps.items()}
    assert positional == {name: [] for name in STEPS}
