"""Run settings and thresholds. Precedence: command line > --config file > [tool.fmcheck] in pyproject.toml > defaults.

Config files use the same shape in both places::

    [tool.fmcheck]            # or the top level of a --config file
    seed = 0
    samples = 128
    [tool.fmcheck.norms]      # one table per check id: that check's thresholds
    ratio_warn = 2.0
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Settings(BaseModel):
    """Everything a run needs besides the pipeline."""

    model_config = ConfigDict(extra="forbid")

    device: Optional[str] = None  # None: where the trainable parameters already are
    seed: int = 0
    samples: int = Field(128, ge=1)  # overfit set size
    max_steps: int = Field(400, ge=1)  # overfit step budget (the slowest correct fixture needs 144)
    time_budget: float = Field(60.0, gt=0)  # overfit wall-clock budget, seconds
    # per check, seconds; when not set, the overfit's limit follows its time budget (runner.check_timeout)
    timeout: float = Field(300.0, gt=0)
    measure_batches: int = Field(4, ge=1)  # batches the measuring checks average over
    strict: bool = False
    debug: bool = False
    plot_dir: Optional[str] = None
    # Finding codes that count toward no verdict (listed as ignored); every layer's list adds to the others'.
    ignore: list[str] = Field(default_factory=list)
    thresholds: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("device")
    @classmethod
    def _device(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        base, _, index = value.partition(":")
        if base not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
            raise ValueError("expected cpu, cuda or cuda:N")  # the caller appends "(got 'gpu')"
        return value


SETTING_KEYS = tuple(k for k in Settings.model_fields if k != "thresholds")


def find_pyproject(start: Optional[Path] = None) -> Optional[Path]:
    directory = (start or Path.cwd()).resolve()
    for candidate in (directory, *directory.parents):
        path = candidate / "pyproject.toml"
        if path.is_file():
            return path
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML ({exc})") from exc


def _split(table: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Separate run settings from per-check threshold tables."""
    settings: dict[str, Any] = {}
    thresholds: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            thresholds[key] = dict(value)
        elif key in SETTING_KEYS:
            settings[key] = value
        else:
            raise ConfigError(f"{where}: unknown setting '{key}' (known: {', '.join(SETTING_KEYS)})")
    return settings, thresholds


def _codes(value: Any, where: str) -> list[str]:
    """An ignore list: finding codes, as a list or one comma-separated string."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: 'ignore' must be a list of finding codes, e.g. [\"target.xt_half_precision\"]")
    return [part.strip() for v in value for part in v.split(",") if part.strip()]


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``--set norms.ratio_warn=3`` -> {"norms": {"ratio_warn": 3.0}}; values parse as TOML scalars."""
    thresholds: dict[str, dict[str, Any]] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        check_id, dot, name = key.strip().partition(".")
        if not eq or not dot or not check_id or not name:
            raise ConfigError(f"--set {item!r}: expected CHECK.THRESHOLD=VALUE, e.g. norms.ratio_warn=3")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        thresholds.setdefault(check_id, {})[name] = value
    return thresholds


def load_settings(cli: dict[str, Any], config_path: Optional[str] = None, overrides: Optional[list[str]] = None,
                  pyproject: Optional[Path] = None, *, source: str = "setting") -> tuple[Settings, dict[str, str]]:
    """Merge the sources: the one settings path of the CLI, ``fmcheck.run``/``preflight`` and the pytest plugin.

    ``cli`` holds the explicit options (None means "not given"); its ``thresholds`` mapping, if any, is the same layer
    as ``--set``. ``source`` names those options in errors ("setting" on the command line, "option" in the API).
    Returns the settings and, per threshold table, where it came from (for error messages).
    """
    merged: dict[str, Any] = {}
    thresholds: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}

    ignored: list[str] = []

    def layer(table: dict[str, Any], where: str) -> None:
        settings, tables = _split(table, where)
        ignored.extend(_codes(settings.pop("ignore", []), where))
        merged.update(settings)
        for check_id, values in tables.items():
            thresholds.setdefault(check_id, {}).update(values)
            origins[check_id] = f"{where} [{check_id}]"

    explicit = dict(cli)
    unknown = [k for k in explicit if k not in SETTING_KEYS and k != "thresholds"]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*SETTING_KEYS, "thresholds"], n=1)
        raise ConfigError(f"{source} '{unknown[0]}' is unknown"
                          + (f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(SETTING_KEYS)})"))
    project = pyproject if pyproject is not None else find_pyproject()
    if project is not None:
        tool = _read_toml(project).get("tool", {}).get("fmcheck")
        if tool is not None:
            if not isinstance(tool, dict):
                raise ConfigError(f"{project}: [tool.fmcheck] must be a table")
            layer(tool, f"{os.path.relpath(project)} [tool.fmcheck]")
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"--config {config_path}: no such file")
        data = _read_toml(path)
        layer(data.get("tool", {}).get("fmcheck", data) if "tool" in data else data, str(config_path))
    given_thresholds = explicit.pop("thresholds", None) or {}
    if not isinstance(given_thresholds, dict) or not all(isinstance(v, dict) for v in given_thresholds.values()):
        raise ConfigError(f"{source} 'thresholds': expected a mapping of check id -> {{name: value}}")
    ignored.extend(_codes(explicit.pop("ignore", None) or [], f"{source} 'ignore'"))
    merged.update({k: v for k, v in explicit.items() if v is not None})
    merged["ignore"] = list(dict.fromkeys(ignored))
    for check_id, values in given_thresholds.items():
        thresholds.setdefault(check_id, {}).update(values)
        origins[check_id] = f"thresholds[{check_id!r}]"
    for check_id, values in parse_overrides(overrides or []).items():
        thresholds.setdefault(check_id, {}).update(values)
        origins[check_id] = f"--set {check_id}.*"
    merged["thresholds"] = thresholds
    try:
        return Settings(**merged), origins
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"{source} '{field}': {error['msg']} (got {error.get('input')!r})") from exc


def thresholds_for(check_cls: Any, settings: Settings, origins: dict[str, str]) -> Any:
    """Validate one check's threshold table against its Thresholds model."""
    values = settings.thresholds.get(check_cls.id, {})
    try:
        return check_cls.Thresholds(**values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(p) for p in error["loc"])
        where = origins.get(check_cls.id, f"[{check_cls.id}]")
        if error["type"] == "extra_forbidden":
            known = sorted(check_cls.Thresholds.model_fields)
            close = difflib.get_close_matches(name, known, n=1)
            raise ConfigError(f"{where}: unknown threshold '{name}' for check '{check_cls.id}'"
                              + (f" (did you mean '{close[0]}'?)" if close else
                                 f" (known: {', '.join(known) or 'none'})")) from exc
        message = error["msg"].removeprefix("Value error, ")
        if not name:  # a rule over several thresholds: the message names them
            raise ConfigError(f"{where}: {message}") from exc
        raise ConfigError(f"{where}: {name}: {message} (got {error.get('input')!r})") from exc
