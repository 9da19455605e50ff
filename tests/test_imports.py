"""The house: the package's modules import each other without a circle, and none imports another
inside a function (a function-local import is how a circle hides)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxlr"
MODULES = {path.stem for path in PACKAGE.glob("*.py")}


def _imported(node: ast.AST) -> list[str]:
    """The jaxlr modules an import statement imports."""
    if isinstance(node, ast.ImportFrom) and node.module == "jaxlr":
        return [alias.name for alias in node.names if alias.name in MODULES]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxlr."):
        return [node.module.split(".")[1]]
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[1] for alias in node.names
                if alias.name.startswith("jaxlr.")]
    return []


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """``{module: modules it imports when it is imported}`` and every function-local import
    ``(module, imported, line)``; imports under ``if TYPE_CHECKING`` (annotations) left out."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    local = []
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        runs_at_import = []
        for statement in tree.body:
            if _type_checking(statement):
                continue
            runs_at_import.append(statement)
        for statement in runs_at_import:
            for node in ast.walk(statement):
                inside = isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef |
                                    ast.ClassDef) and node is not statement
                for name in _imported(node):
                    if inside:
                        local.append((path.stem, name, node.lineno))
                    else:
                        graph[path.stem].add(name)
    return graph, local


def circle(graph: dict[str, set[str]]) -> list[str]:
    """A circle of imports, as the modules along it, or ``[]``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = 1
        stack.append(module)
        for name in sorted(graph[module]):
            if state.get(name) == 1:
                return [*stack[stack.index(name):], name]
            if name not in state and (found := visit(name)):
                return found
        state[module] = 2
        stack.pop()
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_the_circle_finder_finds_a_hand_made_circle():
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_package_imports_without_a_circle():
    graph, _ = import_graph()
    assert graph["__init__"] >= {"nodes", "projection", "compression"}  # the walk sees imports
    assert circle(graph) == []


def test_no_module_imports_another_inside_a_function():
    _, local = import_graph()
    assert local == []
