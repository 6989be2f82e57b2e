"""Shared test fixtures. Test-only checks come from tests/plugin_site, a real third-party distribution on disk."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
PLUGIN_SITE = TESTS / "plugin_site"


def _load_test_plugins():
    # Loaded by path, not through sys.path, so that in-process discovery does not see the test distribution.
    spec = importlib.util.spec_from_file_location("fmcheck_testplugins", PLUGIN_SITE / "fmcheck_testplugins.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fmcheck_testplugins"] = module
    spec.loader.exec_module(module)
    return module


plugins = _load_test_plugins()


@pytest.fixture
def test_registry():
    from fmcheck.registry import Registry

    registry = Registry()
    for cls in (plugins.Ratio, plugins.Raises, plugins.Hangs, plugins.Mutates, plugins.Interrupts, plugins.NeedsVae,
                plugins.SkipsItself, plugins.WarnAlways, plugins.OutOfMemory):
        registry.add(cls, name=cls.id, target=f"fmcheck_testplugins:{cls.__name__}", distribution="fmcheck-testplugins")
    return registry


@pytest.fixture
def tiny_pipeline():
    import tiny

    from fmcheck.contract import coerce

    return coerce(tiny.build())


def run_cli(*args: str, cwd: Path = TESTS, extra_path: tuple[Path, ...] = (), timeout: float = 120,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `fmcheck` command in a subprocess (what a user or CI runs)."""
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in extra_path), str(TESTS)])
    return subprocess.run([sys.executable, "-m", "fmcheck", *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=timeout)
