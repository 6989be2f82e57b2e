"""Packaging: `checks/` installs as fmcheck.checks (no generic top-level name), and the light commands stay light."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT

LIGHT_COMMANDS = [["--help"], ["--version"], ["list"], ["all", "--help"], ["explain", "--help"]]


@pytest.mark.parametrize("args", LIGHT_COMMANDS)
def test_light_commands_do_not_import_torch(args):
    code = (
        "import sys\n"
        "from fmcheck.cli import app\n"
        f"try:\n    app({args!r})\nexcept SystemExit as exit:\n    assert exit.code in (0, None), exit.code\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_editable_install_maps_checks_into_fmcheck():
    result = subprocess.run([sys.executable, "-c", "import fmcheck.checks as c; print(c.__file__)"],
                            capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == ROOT / "checks" / "__init__.py"


def test_built_wheel_installs_checks_as_a_subpackage_only(tmp_path):
    # Build from a copy: building in place would leave build/ and an egg-info in the repository.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "build", "dist",
                                                                  "__pycache__", "tests", "fixtures", "docs", "bench"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    wheel = next(tmp_path.glob("fmcheck-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert "checks" not in top_level and "fixtures" not in top_level and "tests" not in top_level
    assert "fmcheck/checks/__init__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "[fmcheck.checks]" in entry_points

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # PYTHONPATH precedes the editable install's finder, which sits at the end of sys.meta_path.
    result = subprocess.run([sys.executable, "-c", "import fmcheck.checks as c; print(c.__file__)"],
                            capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONPATH": str(target)})
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == target / "fmcheck" / "checks" / "__init__.py"


def test_only_isolate_catches_broadly():
    """docs/architecture.md: `isolate.capture` is the one broad `except`; anything else that runs code which may
    raise anything goes through it, so that interrupts and timeouts are never swallowed by accident."""
    import ast

    broad = {"Exception", "BaseException"}
    offenders = []
    for path in sorted([*(ROOT / "fmcheck").rglob("*.py"), *(ROOT / "checks").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ExceptHandler):
                caught = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
                names = {getattr(c, "id", getattr(c, "attr", None)) for c in caught if c is not None}
                if node.type is None or names & broad:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert [place.split(":")[0] for place in offenders] == ["fmcheck/isolate.py"], offenders
