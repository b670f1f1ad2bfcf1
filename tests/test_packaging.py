"""pyproject.toml declares every third-party module that src/ imports (at the top or inside a function), pinned, so
that nothing the package needs arrives only because another package happens to pull it in."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported_modules() -> dict[str, str]:
    """Top-level third-party module -> one file of src/ that imports it."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "src" / "melanoma").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("melanoma", "__future__"):
                    found.setdefault(top, str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_declared():
    declared = {_name(r) for r in PYPROJECT["dependencies"]}
    optional = {_name(r) for extra in PYPROJECT["optional-dependencies"].values() for r in extra}
    distributions = packages_distributions()
    missing = []
    for module, where in imported_modules().items():
        names = {_name(d) for d in distributions.get(module, [module])}
        if not names & (declared | optional):
            missing.append(f"{module} (imported by {where}; distribution {', '.join(sorted(names))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)


def test_the_main_install_pins_every_dependency():
    loose = [r for r in PYPROJECT["dependencies"] if "==" not in r and not r.startswith("numpy")]
    assert not loose, loose


def test_the_import_walk_finds_imports_inside_functions():
    modules = imported_modules()
    assert {"torch", "numpy", "scipy", "yaml", "starlette"} <= set(modules)
    assert "mlflow" in modules  # imported only inside a function, when --logger mlflow asks for it
