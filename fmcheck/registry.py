"""Discovery of checks through the ``fmcheck.checks`` entry-point group.

Built-in checks are declared in fmcheck's own packaging metadata under this group, exactly as a third-party package
declares its own; there is no second path. Loading a check class must not import torch (the modules import it lazily).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Optional

from .api import Check
from .isolate import capture, describe

GROUP = "fmcheck.checks"


@dataclass(frozen=True)
class LoadFailure:
    """An entry point that could not provide a check: reported as an ERROR row, never a crash."""

    name: str
    target: str
    distribution: str
    reason: str


@dataclass
class Registry:
    checks: dict[str, type[Check]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # check id -> distribution name
    failures: list[LoadFailure] = field(default_factory=list)

    def ordered(self) -> list[type[Check]]:
        return sorted(self.checks.values(), key=lambda c: (c.order, c.id))

    def get(self, check_id: str) -> Optional[type[Check]]:
        return self.checks.get(check_id)

    def add(self, cls: Any, *, name: str, target: str, distribution: str) -> None:
        problem = _invalid(cls, name)
        if problem is None and name in self.checks:
            problem = (
                f"duplicate check id '{name}': already registered by {self.sources[name]}; "
                f"the one from {distribution} is refused"
            )
        if problem is not None:
            self.failures.append(LoadFailure(name, target, distribution, problem))
            return
        self.checks[name] = cls
        self.sources[name] = distribution


def _invalid(cls: Any, name: str) -> Optional[str]:
    if not (isinstance(cls, type) and issubclass(cls, Check)):
        return f"entry point '{name}' does not name a subclass of fmcheck.Check (got {cls!r})"
    for attribute in ("id", "title", "purpose", "doc"):
        if not hasattr(cls, attribute):
            return f"check class {cls.__qualname__} lacks the class attribute '{attribute}'"
    if cls.id != name:
        return f"entry point '{name}' names a check whose id is '{cls.id}'; they must match"
    return None


def _distribution_name(entry_point: metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    return dist.metadata["Name"] if dist is not None else "unknown distribution"


def discover() -> Registry:
    """Load every check registered under the group; fmcheck's own first so that duplicates never shadow them."""
    registry = Registry()
    # each name read once: reading a distribution's metadata parses its METADATA file
    named = [(_distribution_name(ep), ep) for ep in metadata.entry_points(group=GROUP)]
    named.sort(key=lambda pair: pair[0] != "fmcheck")
    seen: set[tuple[str, str, str]] = set()
    for distribution, entry_point in named:
        key = (distribution, entry_point.name, entry_point.value)
        if key in seen:  # the same distribution visible twice on sys.path
            continue
        seen.add(key)
        outcome = capture(entry_point.load)
        if not outcome.ok:
            registry.failures.append(
                LoadFailure(entry_point.name, entry_point.value, distribution,
                            f"plugin failed to import: {describe(outcome.exc)}")
            )
            continue
        registry.add(outcome.value, name=entry_point.name, target=entry_point.value, distribution=distribution)
    return registry
