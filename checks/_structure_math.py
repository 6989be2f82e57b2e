"""Pure helpers of the `structure` check: locating x_t and t among a module's call arguments, permutations, and the
relative output change. No state, no hooks, no user code: unit-tested on synthetic tensors.

Arguments are addressed by a *slot*: ``("arg", i)`` for the i-th positional argument, ``("kw", name)`` for a keyword.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Iterator, Optional

Slot = tuple[str, Any]


def iter_slots(args: tuple, kwargs: Mapping) -> Iterator[tuple[Slot, Any]]:
    """(slot, value) for every top-level positional and keyword argument."""
    for index, value in enumerate(args):
        yield ("arg", index), value
    for name, value in kwargs.items():
        yield ("kw", name), value


def slot_name(slot: Slot) -> str:
    kind, key = slot
    return f"argument {key}" if kind == "arg" else f"keyword '{key}'"


def replace_slot(args: tuple, kwargs: Mapping, slot: Slot, value: Any) -> tuple[tuple, dict]:
    """New (args, kwargs) with one slot replaced; the originals are left untouched."""
    new_args, new_kwargs = list(args), dict(kwargs)
    kind, key = slot
    if kind == "arg":
        new_args[key] = value
    else:
        new_kwargs[key] = value
    return tuple(new_args), new_kwargs


def get_slot(args: tuple, kwargs: Mapping, slot: Slot) -> Any:
    kind, key = slot
    return args[key] if kind == "arg" else kwargs[key]


def same_samples(candidate: Any, reference: Any, rtol: float = 2e-3) -> bool:
    """True when ``candidate`` holds the same per-sample values as ``reference``: the very tensor, or an equal one
    after a reshape (e.g. flattened to (B, D)) or a cast (e.g. to half precision)."""
    import torch

    if not isinstance(candidate, torch.Tensor) or not isinstance(reference, torch.Tensor):
        return False
    if candidate is reference:
        return True
    if candidate.dim() == 0 or reference.dim() == 0 or candidate.shape[0] != reference.shape[0]:
        return False
    if candidate.numel() != reference.numel() or not (candidate.is_floating_point() and reference.is_floating_point()):
        return False
    a = candidate.detach().reshape(candidate.shape[0], -1).to(device=reference.device, dtype=torch.float32)
    b = reference.detach().reshape(reference.shape[0], -1).to(torch.float32)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return bool(torch.equal(a.nan_to_num(), b.nan_to_num()))
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * scale + 1e-12))


def find_slot(args: tuple, kwargs: Mapping, reference: Any) -> Optional[Slot]:
    """The slot holding ``reference`` (identity first, then equal values), or None."""
    pairs = list(iter_slots(args, kwargs))
    for slot, value in pairs:
        if value is reference:
            return slot
    for slot, value in pairs:
        if same_samples(value, reference):
            return slot
    return None


def per_sample_scalar(value: Any, batch: int) -> Any:
    """A (B,) float tensor when ``value`` holds one number per sample ((B,), (B, 1), (B, 1, 1, 1), or a per-sample
    constant expanded over other dimensions); else None."""
    import torch

    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch or value.is_complex():
        return None
    if value.dtype == torch.bool:
        return None
    flat = value.detach().reshape(batch, -1)
    if flat.shape[1] == 0:
        return None
    flat = flat.to(torch.float64)
    if flat.shape[1] > 1 and not bool((flat.amax(dim=1) == flat.amin(dim=1)).all()):
        return None
    return flat[:, 0]


def correlation(a: Any, b: Any) -> float:
    """Pearson correlation of two (B,) tensors; NaN when either is constant."""
    import torch

    a = a.detach().to(torch.float64).flatten()
    b = b.detach().to(device=a.device, dtype=torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    denominator = float(a.norm() * b.norm())
    return float((a * b).sum()) / denominator if denominator > 0 else math.nan


def affine_fit(x: Any, y: Any) -> tuple[float, float]:
    """Least-squares (slope, offset) of y ~ slope * x + offset for two (B,) tensors."""
    import torch

    x = x.detach().to(torch.float64).flatten()
    y = y.detach().to(device=x.device, dtype=torch.float64).flatten()
    xc = x - x.mean()
    var = float((xc * xc).sum())
    if var == 0:
        return math.nan, math.nan
    slope = float((xc * (y - y.mean())).sum()) / var
    return slope, float(y.mean()) - slope * float(x.mean())


def find_time_slot(args: tuple, kwargs: Mapping, batch: int, t: Any, exclude: Optional[Slot] = None,
                   min_correlation: float = 0.99) -> tuple[Optional[Slot], Optional[float], str]:
    """The slot holding the time: a per-sample scalar that is an affine function of the step's ``t`` (t itself,
    t * 1000, 1 - t, integer timesteps), identified by |correlation| >= ``min_correlation``.

    Without ``t`` (None), the only per-sample scalar float argument is taken. Returns (slot, correlation, how)."""
    candidates = []
    for slot, value in iter_slots(args, kwargs):
        if slot == exclude:
            continue
        scalar = per_sample_scalar(value, batch)
        if scalar is not None:
            candidates.append((slot, scalar))
    if t is None:
        floating = [(s, v) for s, v in candidates if get_slot(args, kwargs, s).is_floating_point()]
        if len(floating) == 1:
            return floating[0][0], None, "the only per-sample scalar argument (the step returns no 't')"
        return None, None, f"{len(floating)} per-sample scalar arguments and no step output 't' to tell which is time"
    reference = per_sample_scalar(t, batch)
    if reference is None:
        return None, None, f"the step's 't' (shape {tuple(getattr(t, 'shape', ()))}) is not one value per sample"
    best: tuple[Optional[Slot], float] = (None, 0.0)
    for slot, scalar in candidates:
        corr = correlation(scalar, reference)
        if math.isfinite(corr) and abs(corr) > abs(best[1]):
            best = (slot, corr)
    if best[0] is not None and abs(best[1]) >= min_correlation:
        return best[0], best[1], "correlated with the step's 't'"
    if not candidates:
        return None, None, "no argument holds one value per sample"
    return None, None, (f"no argument follows the step's 't' (best |correlation| {abs(best[1]):.3g} < "
                        f"{min_correlation:g})")


def derangement(batch: int, generator: Any) -> Any:
    """A permutation of range(batch) with no fixed point (one random cycle): every sample gets another's value."""
    import torch

    order = torch.randperm(batch, generator=generator)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return perm


def permuted(value: Any, perm: Any) -> Any:
    return value[perm.to(value.device)]


def output_tensor(out: Any, batch: Optional[int] = None) -> Any:
    """The prediction inside a module's return value: a tensor, the first batched tensor of a tuple/list, a mapping's
    'sample' (diffusers outputs) or first tensor value, or an object's ``.sample``."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("sample"), torch.Tensor):
            return out["sample"]
        values = list(out.values())
    elif isinstance(out, (list, tuple)):
        values = list(out)
    elif isinstance(getattr(out, "sample", None), torch.Tensor):
        return out.sample
    else:
        return None
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    batched = [v for v in tensors if batch is not None and v.dim() and v.shape[0] == batch]
    return (batched or tensors or [None])[0]


def relative_change(changed: Any, base: Any) -> float:
    """||changed - base|| / ||base|| in float64 (inf when base is zero and changed is not; 0 when both are)."""
    import torch

    a = changed.detach().to(torch.float64)
    b = base.detach().to(device=a.device, dtype=torch.float64)
    numerator, denominator = float((a - b).norm()), float(b.norm())
    if denominator == 0:
        return 0.0 if numerator == 0 else math.inf
    return numerator / denominator


def balance(t_change: float, x_change: float, floor: float) -> tuple[Optional[float], str]:
    """(ratio t/x, state) with state one of 'measured', 'both flat' (output moves with neither: nothing to judge),
    'x flat' (only t moves it: ratio inf)."""
    if x_change <= floor and t_change <= floor:
        return None, "both flat"
    if x_change <= floor:
        return math.inf, "x flat"
    return t_change / x_change, "measured"


def layout_map(packed, reference) -> Optional[Any]:
    """An index m with packed.flatten(1)[:, m] == reference.flatten(1) for every sample, when the two tensors hold the
    same elements in another layout (Flux-style packing of latents into tokens); None otherwise. Found by sorting the
    first sample's values, then verified on every sample (one layout for the whole batch)."""
    import torch

    a = packed.detach().reshape(packed.shape[0], -1).to(torch.float64)
    b = reference.detach().reshape(reference.shape[0], -1).to(device=a.device, dtype=torch.float64)
    if a.shape != b.shape or a.shape[1] == 0:
        return None
    if torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()) + 1e-12):
        return torch.arange(a.shape[1], device=a.device)
    index = torch.empty(a.shape[1], dtype=torch.long, device=a.device)
    index[torch.argsort(b[0])] = torch.argsort(a[0])
    scale = 1e-3 * float(b.abs().max()) + 1e-12
    return index if torch.allclose(a[:, index], b, rtol=1e-3, atol=scale) else None


def smoothest_roughness(features: Any, t: Any, min_distinct: int = 16) -> Optional[float]:
    """How smoothly the best-resolved time feature follows t across the batch: samples sorted by t, per feature
    mean((F[i+1] - F[i])^2) / (2 var(F)), the minimum over features. About 1 for a feature that jumps at random
    between neighbouring t (a sinusoid far above the batch's t spacing: aliased), near 0 for one that varies
    slowly with t (it grows with the t spacing, so fewer than ``min_distinct`` distinct t are not judged). None when
    t has too few distinct values or no feature varies."""
    import torch

    t = t.detach().to(torch.float64).flatten()
    if int(torch.unique(t).numel()) < min_distinct:
        return None
    f = features.detach().to(device=t.device, dtype=torch.float64).reshape(t.shape[0], -1)[torch.argsort(t)]
    var = f.var(0, unbiased=False)
    live = var > 1e-12 * float(var.max()) if var.numel() and float(var.max()) > 0 else None
    if live is None or not bool(live.any()):
        return None
    steps = (f[1:] - f[:-1]).pow(2).mean(0)
    return float((steps[live] / (2 * var[live])).min())
