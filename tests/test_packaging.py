"""pyproject.toml tells the truth: every distribution the code imports is declared, the
Python it claims runs the standard library it imports, and the build backend accepts the
metadata it is given."""

from __future__ import annotations

import ast
import importlib.metadata
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
OWN = {"server", "client", "scheduler", "protos", "tests"}
# Standard-library modules newer than some Python 3 still in use: (module, first version).
NEWER_STDLIB = {"tomllib": (3, 11), "zoneinfo": (3, 9), "graphlib": (3, 9)}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def imported(*folders: str) -> set[str]:
    """Top-level names of every module imported (at any depth, in any function) under `folders`."""
    out = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    out.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    out.add(node.module.split(".")[0])
    return out


def undeclared(modules: set[str], declared: set[str]) -> dict[str, list[str]]:
    dists = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(modules - OWN - set(sys.stdlib_module_names)):
        names = {_name(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(names)
    return missing


def test_every_distribution_the_package_imports_is_a_dependency():
    declared = {_name(r) for r in PROJECT["dependencies"]}
    assert undeclared(imported("server", "client", "scheduler", "protos"), declared) == {}


def test_every_distribution_the_tests_import_is_a_dependency_or_in_the_test_extra():
    declared = {_name(r) for r in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["test"]}
    assert undeclared(imported("tests"), declared) == {}


def test_the_oldest_python_claimed_has_the_standard_library_imported():
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"]).groups())
    used = imported("server", "client", "scheduler", "protos")
    too_new = {m: v for m, v in NEWER_STDLIB.items() if m in used and v > minimum}
    assert too_new == {}, f"requires-python {PROJECT['requires-python']} but the code imports {too_new}"


def test_the_build_backend_accepts_a_license_expression():
    # `license = "Apache-2.0"` (a PEP 639 SPDX string) needs setuptools >= 77.
    assert isinstance(PROJECT["license"], str)
    setuptools = next(r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools")
    assert tuple(int(x) for x in re.search(r">=\s*([\d.]+)", setuptools).group(1).split(".")[:1]) >= (77,)
