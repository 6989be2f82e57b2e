"""The ``kl`` check's stress probe: find the module whose output produces mu/logvar, push that output to large
values for one step, and see whether the step's logvar stays bounded and its KL finite.

Locating the head is done from the user's own step, without assuming how the head returns its moments (a tensor
chunked later, a tuple, a dict, separate mu and logvar layers):

1. Trace: forward hooks on every trainable submodule record, for each module call, which share of the step's mu and
   logvar values occur (to float precision) in the module's output tensors.
2. Candidates, in order: the first module to return an output holding mu or logvar (the head's last layer), its
   siblings, parameterised ones first (a separate logvar layer next to a mu layer), then the later holders, the
   modules named ``head`` and the top-level trainable modules, each preceded by its parameterised submodules,
   last-called first. Pushing a head's own output would bypass a bound inside its forward (``6 * tanh(raw / 6)``
   after the last Linear); pushing its last layer does not.
3. A candidate is accepted when pushing its output changes the step's logvar. Pushing means the affine map
   ``o -> sign * (factor * o + shift)`` on every floating tensor of the output (tensor, tuple, list, dict,
   dataclass), applied once with sign +1 and once with -1: the factor scales what the head produces, the shift moves
   even a zero-initialised output far from 0, and the two signs test the upper and the lower bound.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Optional

STRESS_FACTOR = 100.0
STRESS_SHIFT = 100.0
MAX_CANDIDATES = 8
MAX_TRACED_NUMEL = 1 << 26  # outputs larger than this (64M values) are not searched for mu / logvar
CONTAINS = 0.9  # share of a reference's values that must occur in an output for the output to "hold" it


# -- structures ------------------------------------------------------------------------------------------------
def map_tensors(value: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every floating-point tensor inside a module output, keeping the container types."""
    import torch

    if isinstance(value, torch.Tensor):
        return fn(value) if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    if isinstance(value, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in value.items()}
        if isinstance(value, dict) and type(value) is not dict:  # OrderedDict subclasses (transformers' ModelOutput)
            copied = copy.copy(value)
            for key, item in mapped.items():
                copied[key] = item
            return copied
        return mapped
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: map_tensors(getattr(value, f.name), fn) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def iter_tensors(value: Any):
    """Every floating-point tensor inside a module output."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from iter_tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from iter_tensors(getattr(value, f.name))


def push(sign: float, factor: float = STRESS_FACTOR, shift: float = STRESS_SHIFT) -> Callable[[Any], Any]:
    def fn(tensor):
        return sign * (tensor * factor + shift)

    return fn


# -- value containment -----------------------------------------------------------------------------------------
def informative(reference) -> bool:
    """Containment says something only for a reference with enough distinct values (not an all-zero tensor).
    Duplicates are fine: samples with the same caption have the same mu."""
    import torch

    flat = reference.detach().flatten()
    return torch.unique(flat).numel() >= min(16, max(2, flat.numel() // 2))


def contained_share(output, sorted_reference):
    """Share (a 0-d tensor) of the distinct reference values that occur in ``output`` within float precision.

    ``sorted_reference``: the reference's distinct values, sorted (``torch.unique``)."""
    import torch

    ref = sorted_reference
    values = output.detach().flatten().to(ref.device, ref.dtype)
    if values.numel() < 0.9 * ref.numel() or values.numel() > MAX_TRACED_NUMEL:
        return torch.zeros((), device=ref.device)
    index = torch.searchsorted(ref, values).clamp_(max=ref.numel() - 1)
    tolerance = 1e-6 * ref.abs() + 1e-9
    matched = torch.zeros(ref.numel(), dtype=torch.bool, device=ref.device)
    for neighbour in (index, (index - 1).clamp_(min=0)):
        close = (ref[neighbour] - values).abs() <= tolerance[neighbour]
        matched[neighbour[close]] = True
    return matched.float().mean()


@dataclasses.dataclass
class TraceRecord:
    name: str
    order: int  # when the module's forward returned (children before their parents)
    holds_mu: float
    holds_logvar: float
    has_parameters: bool = False  # parameters of its own (a Linear, a Conv), not only through children


def named_modules(trainable: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(qualified name, module) of every trainable module and submodule, each module once."""
    seen: set[int] = set()
    out = []
    for key, module in trainable.items():
        for sub_name, sub in module.named_modules():
            if id(sub) in seen:
                continue
            seen.add(id(sub))
            out.append((f"{key}.{sub_name}" if sub_name else key, sub))
    return out


def trace(run: Callable[[], Any], modules: list[tuple[str, Any]], mu, logvar) -> list[TraceRecord]:
    """Run the step once with recording hooks; which modules' outputs hold the reference mu / logvar values."""
    import torch

    refs = {}
    for key, ref in (("mu", mu), ("logvar", logvar)):
        if ref is not None and informative(ref):
            refs[key] = torch.unique(ref.detach().float().flatten())
    calls: dict[str, dict[str, Any]] = {}
    order: dict[str, int] = {}

    def hook_for(name):
        def hook(module, args, output):
            order.setdefault(name, len(order))
            entry = calls.setdefault(name, {})
            for key, ref in refs.items():
                shares = [contained_share(t, ref) for t in iter_tensors(output)]
                if shares:
                    best = torch.stack(shares).max()
                    entry[key] = torch.maximum(entry[key], best) if key in entry else best
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    names = sorted(order, key=order.get)
    zero = torch.zeros((), device=mu.device)
    table = torch.stack([torch.stack([calls[n].get("mu", zero), calls[n].get("logvar", zero)])
                         for n in names]).cpu().tolist() if names else []  # one transfer for the whole trace
    owns = {name: any(True for _ in module.parameters(recurse=False)) for name, module in modules}
    return [TraceRecord(n, order[n], mu_share, lv_share, owns.get(n, False))
            for n, (mu_share, lv_share) in zip(names, table)]


def is_head_name(name: str) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    return last == "head" or last.endswith("_head")


def candidates(records: list[TraceRecord], trainable_keys: list[str]) -> list[tuple[str, str]]:
    """(module name, why) in the order they are tried; only modules the step called.

    A head may bound logvar inside its own forward (``6 * tanh`` after its last Linear), so pushing the head's
    output could bypass the bound. Hence the earliest-returning module whose output holds mu or logvar comes first,
    then its siblings (a separate logvar layer next to a mu layer); for every later candidate (an outer module
    holding the values, a module named head, a top-level trainable module) its parameterised submodules are tried
    first, last-called first: the head's last layers, before any bound in its forward.
    """
    by_order = sorted(records, key=lambda r: r.order)
    called = {r.name for r in by_order}
    out: list[tuple[str, str]] = []

    def add(name: str, why: str) -> None:
        if name not in [n for n, _ in out]:
            out.append((name, why))

    def add_with_layers(name: str, why: str) -> None:
        inside = [r for r in by_order if r.name.startswith(name + ".") and r.has_parameters]
        for r in reversed(inside):
            add(r.name, f"a layer of {name} ({why})")
        if name in called:
            add(name, why)

    holders = [r for r in by_order if r.holds_mu >= CONTAINS or r.holds_logvar >= CONTAINS]
    if holders:
        inner = holders[0]
        held = " and ".join(k for k, v in (("mu", inner.holds_mu), ("logvar", inner.holds_logvar)) if v >= CONTAINS)
        add(inner.name, f"its output holds the {held} values")
        if "." in inner.name:
            parent = inner.name.rsplit(".", 1)[0]
            siblings = [r for r in by_order
                        if r.name.startswith(parent + ".") and r.name.count(".") == inner.name.count(".")]
            for r in sorted(siblings, key=lambda r: not r.has_parameters):  # projections before trunks
                add(r.name, f"a sibling of {inner.name}, whose output holds {held}")
        for r in holders[1:]:
            add_with_layers(r.name, "its output holds mu/logvar values")
    for r in by_order:
        if is_head_name(r.name):
            add_with_layers(r.name, "named head")
    for key in trainable_keys:  # called itself, or only through its submodules
        add_with_layers(key, "a top-level trainable module")
    return out


# -- the probe -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProbeRun:
    sign: float
    logvar_min: float
    logvar_max: float
    logvar_finite: bool
    kl: Optional[float]  # the step's kl (mean if not scalar); None when the step returns none
    kl_finite: bool
    analytic_kl_finite: bool
    loss_finite: bool


@dataclasses.dataclass
class StressResult:
    located: Optional[str]  # the module whose output was pushed
    why: Optional[str]
    tried: list[str]
    runs: list[ProbeRun]
    factor: float = STRESS_FACTOR
    shift: float = STRESS_SHIFT
    raised: Optional[str] = None  # the step raised under the probe
    reason: Optional[str] = None  # why no module could be located

    @property
    def logvar_max_abs(self) -> float:
        if not self.runs:
            return math.nan
        if not all(r.logvar_finite for r in self.runs):
            return math.inf
        return max(max(abs(r.logvar_min), abs(r.logvar_max)) for r in self.runs)

    @property
    def kl_finite(self) -> bool:
        return all(r.kl_finite and r.analytic_kl_finite for r in self.runs)


# Errors a user's step raises on purpose when its numbers blow up (NaN guards); anything else propagates.
GUARD_ERRORS = (AssertionError, FloatingPointError, OverflowError, ValueError)


def _with_push(run: Callable[[], Any], module, sign: float, factor: float, shift: float):
    handle = module.register_forward_hook(lambda mod, args, output: map_tensors(output, push(sign, factor, shift)))
    try:
        return run()
    finally:
        handle.remove()


def _summarise(outputs, sign: float) -> ProbeRun:
    import torch

    from .maths import kl_elements

    logvar = outputs["logvar"].detach().float()
    mu = outputs["mu"].detach().float()
    finite_lv = torch.isfinite(logvar)
    shown = torch.where(finite_lv, logvar, torch.zeros_like(logvar))
    analytic = kl_elements(mu, torch.broadcast_to(logvar, mu.shape) if logvar.shape != mu.shape else logvar).mean()
    kl = outputs["kl"] if "kl" in outputs else None
    kl_t = (kl.detach().double().mean() if isinstance(kl, torch.Tensor) else torch.tensor(float(kl)).double()) \
        if kl is not None else torch.zeros((), dtype=torch.float64)
    loss = outputs["loss"]
    loss_t = loss.detach().double().mean() if isinstance(loss, torch.Tensor) else torch.tensor(float(loss)).double()
    numbers = torch.stack([
        shown.min().double().cpu(), shown.max().double().cpu(), finite_lv.all().double().cpu(),
        kl_t.cpu(), torch.isfinite(kl_t).double().cpu(), torch.isfinite(analytic).double().cpu(),
        torch.isfinite(loss_t).double().cpu(),
    ]).tolist()
    lv_min, lv_max, lv_ok, kl_v, kl_ok, an_ok, loss_ok = numbers
    return ProbeRun(sign=sign, logvar_min=lv_min, logvar_max=lv_max, logvar_finite=bool(lv_ok),
                    kl=kl_v if kl is not None else None, kl_finite=bool(kl_ok) if kl is not None else True,
                    analytic_kl_finite=bool(an_ok), loss_finite=bool(loss_ok))


def _changed(stressed, reference) -> bool:
    import torch

    stressed = stressed.detach().float()
    reference = reference.detach().float().to(stressed.device)
    if stressed.shape != reference.shape:
        return True
    return bool((~torch.isclose(stressed, reference, rtol=1e-3, atol=1e-3)).any())


def stress_probe(run: Callable[[], Any], trainable: Mapping[str, Any], mu, logvar, *,
                 factor: float = STRESS_FACTOR, shift: float = STRESS_SHIFT,
                 max_candidates: int = MAX_CANDIDATES) -> StressResult:
    """Locate the module producing logvar and push its output both ways for one step each.

    ``run()`` runs the user's step (no autograd, the same batch, seed and step index every call) and returns its
    outputs; ``mu`` / ``logvar`` are that step's unperturbed outputs.
    """
    modules = named_modules(trainable)
    by_name = dict(modules)
    records = trace(run, modules, mu, logvar)
    tried: list[str] = []
    for name, why in candidates(records, list(trainable))[:max_candidates]:
        tried.append(name)
        try:
            outputs = _with_push(run, by_name[name], +1.0, factor, shift)
        except GUARD_ERRORS as exc:
            return StressResult(located=name, why=why, tried=tried, runs=[], factor=factor, shift=shift,
                                raised=f"{type(exc).__name__}: {exc}")
        if not _changed(outputs["logvar"], logvar):
            continue
        runs = [_summarise(outputs, +1.0)]
        try:
            runs.append(_summarise(_with_push(run, by_name[name], -1.0, factor, shift), -1.0))
        except GUARD_ERRORS as exc:
            return StressResult(located=name, why=why, tried=tried, runs=runs, factor=factor, shift=shift,
                                raised=f"{type(exc).__name__}: {exc}")
        return StressResult(located=name, why=why, tried=tried, runs=runs, factor=factor, shift=shift)
    reason = ("no trainable module's output changes logvar when pushed (is logvar a free parameter, or computed "
              "outside the trainable modules?)" if tried else "no trainable module is called by the step")
    return StressResult(located=None, why=None, tried=tried, runs=[], factor=factor, shift=shift, reason=reason)
