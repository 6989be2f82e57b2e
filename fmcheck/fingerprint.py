"""The latent-space fingerprint every report carries, and the comparison behind ``fmcheck compare``.

The seed: compare metrics only under the same VAE, resolution, latent dimensions and scaling. A fingerprint records
exactly those, from what is cheap and safe to read after the checks ran: the VAE's class, a subset of its config and a
sha256 of its weights; the latent shape and dtype of x1 (the cached step outputs of batch 0); the pixel resolution of
the first batch; and the scaling as applied, when the `scale` check ran and reported it (``details["applied"]``).

Nothing here imports torch at module level: the CLI's ``compare`` reads JSON only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError
from .isolate import capture, describe

FINGERPRINT_VERSION = 1
VAE_CONFIG_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std", "latent_channels", "sample_size",
                   "block_out_channels")
# Fields that differ without changing the units of the numbers: shown, never decisive.
INFORMATIONAL = ("version", "latent.dtype")
# Fields recorded only when an optional check ran: unknown on one side is shown, not decisive.
OPTIONAL = ("applied_scaling",)
FITTED = ("applied_scaling",)  # fitted from data: compared with the looser tolerance
EXACT_RTOL = 1e-6


# --------------------------------------------------------------------------------------------------- computing
def compute(pipeline: Any, ctx: Any, published: Mapping[str, Any]) -> dict[str, Any]:
    """The fingerprint of a run; a part that cannot be computed is left out and its error recorded under 'errors'.

    ``published`` holds what the checks publish for other parts of fmcheck (``Check.publishes``): the scaling as
    applied ("applied_scaling") comes from there, never from a check's private details."""
    fingerprint: dict[str, Any] = {"version": FINGERPRINT_VERSION}
    errors: dict[str, str] = {}
    parts = (("vae", _vae_part, (pipeline,)), ("latent", _latent_part, (ctx,)),
             ("pixels", _pixels_part, (pipeline, ctx)), ("applied_scaling", _applied_part, (published,)))
    for name, part, args in parts:
        outcome = capture(part, *args)
        if outcome.ok:
            fingerprint[name] = outcome.value
        else:
            errors[name] = describe(outcome.exc)
    if errors:
        fingerprint["errors"] = errors
    return fingerprint


def _config_value(config: Any, key: str) -> tuple[bool, Any]:
    if isinstance(config, Mapping):
        return (key in config, config.get(key))
    return (hasattr(config, key), getattr(config, key, None))


def _vae_part(pipeline: Any) -> Optional[dict[str, Any]]:
    vae = pipeline.vae
    if vae is None:
        return None
    config = getattr(vae, "config", None)
    chosen = {}
    if config is not None:
        for key in VAE_CONFIG_KEYS:
            present, value = _config_value(config, key)
            if present:
                chosen[key] = to_json(value)
    return {"class": type(vae).__name__, "config": chosen, "weights_sha256": weights_sha256(vae)}


def weights_sha256(module: Any) -> Optional[str]:
    """sha256 over the state dict (names, dtypes, shapes, raw bytes on the CPU), keys sorted; None without one."""
    import torch

    state_dict = getattr(module, "state_dict", None)
    if not callable(state_dict):
        return None
    digest = hashlib.sha256()
    state = state_dict()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _latent_part(ctx: Any) -> Optional[dict[str, Any]]:
    import torch

    x1 = ctx.outputs(0).get("x1")
    if not isinstance(x1, torch.Tensor) or x1.dim() == 0:
        return None
    return {"shape": list(x1.shape[1:]), "dtype": str(x1.dtype).replace("torch.", "")}


def _pixels_part(pipeline: Any, ctx: Any) -> Optional[dict[str, Any]]:
    import torch

    from .errors import PipelineError

    try:
        pixels = pipeline.pixels_of(ctx.batches(1)[0])
    except PipelineError:  # the batch has no pixels fmcheck can find: nothing to record
        return None
    if not isinstance(pixels, torch.Tensor) or pixels.dim() < 3:
        return None
    return {"resolution": list(pixels.shape[-2:]), "channels": int(pixels.shape[1]) if pixels.dim() >= 4 else None}


def _applied_part(published: Mapping[str, Any]) -> Optional[Any]:
    applied = published.get("applied_scaling")
    return to_json(applied) if applied is not None else None


def to_json(value: Any) -> Any:
    """Plain JSON data: tensors and arrays become lists, tuples lists, other objects their str()."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if hasattr(value, "tolist"):
        return to_json(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return str(value)


# -------------------------------------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class FieldComparison:
    field: str
    a: Any
    b: Any
    status: str  # "same", "differs", "only in A", "only in B"
    decisive: bool  # a difference here makes the numbers incomparable

    @property
    def differs(self) -> bool:
        return self.status != "same"


@dataclass(frozen=True)
class Comparison:
    rows: tuple[FieldComparison, ...]

    @property
    def differences(self) -> list[FieldComparison]:
        return [r for r in self.rows if r.differs]

    @property
    def blocking(self) -> list[FieldComparison]:
        return [r for r in self.rows if r.differs and r.decisive]

    @property
    def comparable(self) -> bool:
        return not self.blocking


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists and scalars are leaves. ``errors`` is left out (not a property)."""
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            if not prefix and key == "errors":
                continue
            name = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(item, Mapping) and item:
                flat.update(flatten(item, name))
            else:
                flat[name] = item
        return flat
    return {prefix: value}


def same_value(a: Any, b: Any, rtol: float) -> bool:
    """Equal, with numbers compared to a relative tolerance and lists element by element."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_value(a[k], b[k], rtol) for k in a)
    return a == b


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def compare(a: Mapping[str, Any], b: Mapping[str, Any], rtol: float = 0.01) -> Comparison:
    """Field by field: which differ, and whether each difference makes the two reports' numbers incomparable.

    ``rtol`` is the relative tolerance for fitted values (the scaling as applied); configuration values, shapes and
    hashes must match exactly."""
    flat_a, flat_b = flatten(a), flatten(b)
    rows = []
    for name in sorted(set(flat_a) | set(flat_b)):
        value_a, value_b = flat_a.get(name), flat_b.get(name)  # absent and None read the same: not recorded
        informational = _under(name, INFORMATIONAL)
        if value_a is not None and value_b is not None:
            tolerance = rtol if _under(name, FITTED) else EXACT_RTOL
            status = "same" if same_value(value_a, value_b, tolerance) else "differs"
            decisive = not informational
        elif value_a is None and value_b is None:
            status, decisive = "same", False
        else:
            status = "only in A" if value_b is None else "only in B"
            decisive = not (informational or _under(name, OPTIONAL))
        rows.append(FieldComparison(name, value_a, value_b, status, decisive))
    return Comparison(tuple(rows))


# ---------------------------------------------------------------------------------------------------- loading
def load_fingerprint(path: Path) -> dict[str, Any]:
    """The fingerprint of a JSON report file; UsageError (one line, naming the file) when it cannot be had."""
    from pydantic import ValidationError

    from .report import Report

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not a JSON report (not text)") from exc
    try:
        report = Report.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "document"
        raise UsageError(f"{path}: not a valid fmcheck JSON report ({where}: {first.get('msg', exc)})") from exc
    if report.fingerprint is None:
        raise UsageError(f"{path}: the report has no fingerprint (written by an older fmcheck, or by a run that "
                         "stopped before its checks); rerun fmcheck with --json")
    return report.fingerprint
