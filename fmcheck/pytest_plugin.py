"""pytest plugin (entry point ``pytest11``): ``pytest --fmcheck MODULE:ATTR`` runs the checks as test items.

One item per check; a FAIL shows the numbers behind it, ERROR is an error, SKIP a skip, WARN passes with a warning
(or fails under ``--fmcheck-strict``). Fixtures: ``fmcheck_report`` (the report of the ``--fmcheck`` pipeline) and
``fmcheck_run`` (run checks on any pipeline and assert on the report yourself).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fmcheck", "flow-matching pre-flight checks")
    group.addoption("--fmcheck", metavar="MODULE:ATTR", default=None,
                    help="run fmcheck's checks on this pipeline, one test item per check")
    group.addoption("--fmcheck-checks", metavar="IDS", default=None, help="comma-separated check ids (default: all)")
    group.addoption("--fmcheck-strict", action="store_true", default=False, help="treat WARN as failure")
    group.addoption("--fmcheck-config", metavar="PATH", default=None,
                    help="a TOML file of fmcheck settings and thresholds (as fmcheck --config)")
    group.addoption("--fmcheck-set", metavar="CHECK.NAME=VALUE", action="append", default=None,
                    help="override a threshold (as fmcheck --set; repeatable)")


class FmcheckWarning(UserWarning):
    """A check returned WARN."""


class CheckFailed(Exception):
    """Raised by an item whose check did not pass; the report shows its numbers."""


class _Session:
    """Runs the checks once for all items, on first use."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.report: Any = None

    def get(self) -> Any:
        if self.report is None:
            from . import api_run

            # The CLI's settings path: options, then --fmcheck-config, then [tool.fmcheck] in pyproject.toml.
            self.report = api_run.run(self.config.getoption("--fmcheck"), _ids(self.config),
                                      strict=self.config.getoption("--fmcheck-strict") or None,
                                      config=self.config.getoption("--fmcheck-config"),
                                      overrides=self.config.getoption("--fmcheck-set"))
        return self.report


def _ids(config: pytest.Config) -> Optional[list[str]]:
    raw = config.getoption("--fmcheck-checks")
    return [part.strip() for part in raw.split(",") if part.strip()] if raw else None


class FmcheckItem(pytest.Item):
    def __init__(self, *, check_id: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.check_id = check_id

    def runtest(self) -> None:
        from .verdict import Verdict

        report = self.config.stash[_SESSION].get()
        result = report.check(self.check_id)
        if result.verdict is Verdict.SKIP:
            pytest.skip(result.summary)
        if result.verdict is Verdict.WARN:
            warnings.warn(FmcheckWarning(f"{self.check_id}: {result.summary}"))
        if result.verdict in (Verdict.FAIL, Verdict.ERROR):
            raise CheckFailed(result)

    def repr_failure(self, excinfo: Any, style: Any = None) -> str:
        if isinstance(excinfo.value, CheckFailed):
            from .renderers.plain import check_failure

            return "\n".join(check_failure(excinfo.value.args[0]))
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.config.getoption("--fmcheck"), None, f"fmcheck::{self.check_id}"


_SESSION = pytest.StashKey[_Session]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_SESSION] = _Session(config)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    target = config.getoption("--fmcheck")
    if not target:
        return
    from .registry import discover

    registry = discover()
    chosen = _ids(config)
    ids = [c.id for c in registry.ordered() if not chosen or c.id in chosen]
    ids += [f.name for f in registry.failures if not chosen or f.name in chosen]
    for check_id in ids:
        items.append(FmcheckItem.from_parent(session, name=f"fmcheck[{check_id}]", check_id=check_id))


@pytest.fixture
def fmcheck_report(request: pytest.FixtureRequest) -> Any:
    """The report of the ``--fmcheck`` pipeline (skips the test when the option is not given)."""
    if not request.config.getoption("--fmcheck"):
        pytest.skip("no --fmcheck MODULE:ATTR given")
    return request.config.stash[_SESSION].get()


@pytest.fixture
def fmcheck_run() -> Any:
    """``fmcheck_run(pipeline_or_spec, checks=None, **options) -> Report`` for your own assertions."""
    from . import api_run

    return api_run.run
