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


def _build_wheel(tmp_path: Path) -> Path:
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
    return next(tmp_path.glob("fmcheck-*.whl"))


def _source_packages() -> set[str]:
    """Every package of the source tree, by its installed name (checks/ installs as fmcheck.checks)."""
    packages = set()
    for top, installed in (("fmcheck", "fmcheck"), ("checks", "fmcheck.checks")):
        for init in (ROOT / top).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / top).parts
            packages.add(".".join([installed, *relative]))
    return packages


def test_pyproject_lists_every_package_of_the_source_tree():
    """A package missing from [tool.setuptools] packages is missing from the wheel, and the editable install
    hides it (fmcheck.renderers was, once: no check could run from a regular install)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _source_packages()


def test_built_wheel_installs_checks_as_a_subpackage_only(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for package in _source_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
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


def test_a_regular_install_from_the_wheel_runs_every_check(tmp_path):
    """How CI users install fmcheck (a dependency of their project): the wheel in a fresh environment, no editable
    finder, no source tree on the path; `fmcheck all` then runs every built-in check on a small pipeline."""
    wheel = _build_wheel(tmp_path)
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, capture_output=True)
    python = env / "bin" / "python"
    # torch first, at the version already here (a bare torch would pull a multi-GB accelerator build)
    import torch

    torch_spec = f"torch=={torch.__version__.split('+')[0]}"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", torch_spec, str(wheel)],
                             capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "tests" / "tiny.py", project / "tiny.py")
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    clean_env["OMP_NUM_THREADS"] = "1"
    where = subprocess.run([str(python), "-c", "import fmcheck.renderers, fmcheck.checks as c; print(c.__file__)"],
                           capture_output=True, text=True, cwd=project, env=clean_env)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env), where.stdout
    result = subprocess.run([str(env / "bin" / "fmcheck"), "all", "--module", "tiny:build", "--max-steps", "64",
                             "--json", "report.json"], capture_output=True, text=True, cwd=project, env=clean_env,
                            timeout=900)
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    import json

    report = json.loads((project / "report.json").read_text())
    ran = {c["id"]: c["verdict"] for c in report["checks"]}
    assert set(ran) >= {"scale", "norms", "target", "kl", "overfit", "structure", "ranks"}, ran
    assert "error" not in ran.values(), ran
    # the catalogue ships in the wheel: `list --codes` and `explain CODE` read it there
    from fmcheck.registry import discover

    probe = ("from fmcheck import catalog; import sys; assert catalog.load() is not None; "
             "from fmcheck.entry import main; main(['list', '--codes']); "
             "assert 'fmcheck.checks.scale' not in sys.modules")
    listed = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=project, env=clean_env)
    assert listed.returncode == 0, listed.stderr
    codes = {rule.code for cls in discover().checks.values() for rule in cls.rules}
    assert codes and all(code in listed.stdout for code in codes)
