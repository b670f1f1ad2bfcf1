"""The package's shape: subpackages by stage in a stated layer order that every import (at the top or inside a
function) follows, no import cycles between modules, no module over 500 lines, light subpackage ``__init__`` files,
and only the entry points (the CLI and the seed study) import the training orchestration."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "melanoma"
MAX_LINES = 500
# Lowest first. A module may import from its own layer or a lower one, never a higher one; the packages of one layer
# do not import each other (train and deploy never meet: a served model needs nothing of training).
LAYERS: list[list[str]] = [["core"], ["data"], ["audit"], ["models"], ["config"], ["runs"], ["assess"],
                           ["deploy", "train"], ["cli"]]
ROOT_MODULES = {"melanoma": "core", "melanoma.__main__": "cli"}  # the package's docstring and `python -m melanoma`
ENTRY_POINTS = {"melanoma.cli.main", "melanoma.train.seed_study"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every melanoma module ``path`` imports, at the top or inside a function, resolved to a module name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from melanoma.audit import nearcopy" may name a module; "from melanoma.x import y" names melanoma.x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imports(path, modules) for path in paths}
    # importing melanoma.x.y runs melanoma/__init__ and melanoma/x/__init__, both docstrings only (checked below)
    packages = {_module_name(path) for path in paths if path.name == "__init__.py"}
    return {module: targets - {module} - packages for module, targets in graph.items()}


def package_of(module: str) -> str:
    """The stage a module belongs to: its subpackage, or the root module's own name (``config``)."""
    if module in ROOT_MODULES:
        return ROOT_MODULES[module]
    return module.split(".")[1]


def layer_of(package: str) -> int:
    for level, packages in enumerate(LAYERS):
        if package in packages:
            return level
    raise AssertionError(f"package '{package}' is in no layer of LAYERS: add it where it belongs")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points to a higher layer, or sideways to another package of the same layer."""
    wrong = []
    for module, targets in sorted(graph.items()):
        source = package_of(module)
        for target in sorted(targets):
            destination = package_of(target)
            if destination != source and layer_of(destination) >= layer_of(source):
                wrong.append(f"{module} ({source}) imports {target} ({destination})")
    return wrong


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_walk_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from melanoma.runs.run import Run\n    import melanoma.data.records\n")
    known = {"melanoma.runs.run", "melanoma.data.records", "melanoma.core.io"}
    assert _imports(module, known) == {"melanoma.runs.run", "melanoma.data.records"}


def test_the_layer_rule_catches_an_upward_and_a_sideways_import():
    graph = {"melanoma.data.images": {"melanoma.core.io", "melanoma.runs.run"},
             "melanoma.deploy.serve": {"melanoma.train.loop", "melanoma.assess.explain"},
             "melanoma.config": {"melanoma.models.catalog"}}
    assert upward_imports(graph) == ["melanoma.data.images (data) imports melanoma.runs.run (runs)",
                                     "melanoma.deploy.serve (deploy) imports melanoma.train.loop (train)"]


def test_every_subpackage_is_in_a_layer():
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    stated = {package for layer in LAYERS for package in layer}
    assert packages == stated - {"config"}, packages ^ (stated - {"config"})
    assert {path.stem for path in PACKAGE.glob("*.py")} == {"__init__", "__main__", "config"}


def test_imports_follow_the_layer_order():
    wrong = upward_imports(import_graph())
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_import_cycles_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_entry_points_import_training():
    importers = {module for module, targets in import_graph().items() if "melanoma.train.pipeline" in targets}
    assert importers <= ENTRY_POINTS, importers


def test_subpackage_init_files_are_docstrings_only():
    """So that importing melanoma.cli (and `melanoma --help`) runs no other module's code, torch least of all."""
    for path in PACKAGE.rglob("__init__.py"):
        body = ast.parse(path.read_text(encoding="utf-8")).body
        assert body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), path
        rest = [node for node in body[1:] if not (isinstance(node, ast.Assign)
                                                  and [t.id for t in node.targets] == ["__version__"])]
        assert not rest, f"{path.relative_to(REPO)} holds code beside its docstring"


def test_no_module_is_over_500_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_tests_mirror_the_packages():
    """tests/<stage>/ for each stage's own tests, tests/e2e/ for what drives the CLI, a server or a browser; only the
    package's shape (architecture, packaging, lint) and the benchmarks' checks sit at the top."""
    tests = REPO / "tests"
    folders = {path.name for path in tests.iterdir() if path.is_dir() and any(path.glob("test_*.py"))}
    packages = {package for layer in LAYERS for package in layer} - {"config", "cli"}
    assert folders <= packages | {"e2e"}, folders - packages
    assert {path.name for path in tests.glob("test_*.py")} <= {"test_architecture.py", "test_packaging.py",
                                                               "test_lint.py", "test_benchmarks.py"}
