"""The layering the architecture promises, read from the source: every import in fmcheck/ and checks/, at module
level and inside functions (the CLI and the checks import lazily), resolved to its absolute module name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

# checks/ is installed as fmcheck.checks (setuptools package-dir): its relative imports resolve there.
PACKAGES = {"fmcheck": ROOT / "fmcheck", "fmcheck.checks": ROOT / "checks"}

# Who may import what: (imported package, files allowed to import it, why).
RULES = [
    ("typer", {"fmcheck/cli.py"}, "the command line is the only module that parses a command line"),
    ("rich", {"fmcheck/renderers/*"}, "only renderers draw on a terminal"),
    ("fmcheck.renderers", {"fmcheck/renderers/*", "fmcheck/cli.py", "fmcheck/entry.py", "fmcheck/api_run.py",
                           "fmcheck/pytest_plugin.py"},
     "the runner returns data; the front ends (CLI, Python API, pytest plugin) hand it to the renderers"),
]


def _sources() -> dict[str, tuple[str, Path]]:
    """'fmcheck/cli.py' -> (its package, its path), for every module of fmcheck/ and checks/."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            if package == "fmcheck" and ROOT / "checks" in path.parents:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            dotted = ".".join((package, *parts[:-1])) if path.name != "__init__.py" else ".".join((package, *parts))
            found[path.relative_to(ROOT).as_posix()] = (dotted, path)
    return found


def imports_of(path: Path, package: str) -> set[str]:
    """Every module name the file imports, anywhere in it: ``from .renderers import plots`` in fmcheck/cli.py gives
    fmcheck.renderers and fmcheck.renderers.plots."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _allowed(file: str, patterns: set[str]) -> bool:
    return any(file == p or (p.endswith("/*") and file.startswith(p[:-1])) for p in patterns)


def _imports(name: str, imported: set[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for module in imported)


SOURCES = _sources()


def test_the_walk_sees_function_level_and_relative_imports():
    cli = imports_of(ROOT / "fmcheck" / "cli.py", "fmcheck")
    assert "fmcheck.renderers.console" in cli  # imported inside _execute, relative (from .renderers.console)
    assert "typer" in cli
    standalone = imports_of(ROOT / "checks" / "scale" / "standalone.py", "fmcheck.checks.scale")
    assert "fmcheck.checks.scale.ScaleCheck" in standalone and "torch" in standalone  # inside run()
    assert {"fmcheck/cli.py", "fmcheck/renderers/console.py", "checks/scale/__init__.py"} <= set(SOURCES)


@pytest.mark.parametrize("name, allowed, why", RULES, ids=[rule[0] for rule in RULES])
def test_only_the_allowed_modules_import(name, allowed, why):
    offenders = sorted(file for file, (package, path) in SOURCES.items()
                       if _imports(name, imports_of(path, package)) and not _allowed(file, allowed))
    assert not offenders, f"{name} imported by {offenders}: {why}"
