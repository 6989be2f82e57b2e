"""`structure`: the seed's remaining gotchas: time-conditioning balance, precision, and the hygiene of every frozen
module (the VAE included).

Time: the velocity net is called on the step's own arguments, then with t permuted across the batch and with x_t
permuted across the batch; the relative output changes say whether time dominates the net or is ignored by it.
Precision: fp16 compute without loss scaling, non-finite step outputs. Frozen modules: mode-dependent layers
(dropout, batch-norm, ...: checks/_modes.py) active in train mode, parameters that require grad, parameters in the
optimizer.

The package: ``velocity`` (finding and calling the velocity net), ``measure`` (the observation), ``maths`` (pure),
``evidence`` (thresholds, typed evidence), ``rules`` (the rules table), ``doc``.
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Check, Judgement
from fmcheck.judges import flag, info
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from . import maths
from .doc import DOC
from .evidence import StructureEvidence, StructureThresholds
from .rules import RULES
from .velocity import _find_velocity  # noqa: F401  (the `target` check finds the velocity net with it)

__all__ = ["StructureCheck", "StructureEvidence", "StructureThresholds"]


class StructureCheck(Check):
    id = "structure"
    title = "Time conditioning, precision, frozen modules"
    purpose = ("Velocity net's sensitivity to t vs x_t (time dominates / ignored), fp16 without loss scaling, "
               "frozen modules (VAE included) in train mode, requiring grad or in the optimizer.")
    # Before the overfit: a static check's answer comes in a second while the overfit trains for many, and its
    # non-finite-outputs finding is the one that covers the overfit's (one cause, one finding, said as it runs).
    order = 45
    Thresholds = StructureThresholds
    rules = RULES
    doc = DOC

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import observe

        return observe(ctx)

    def judge(self, obs: dict[str, Any], th: StructureThresholds) -> Judgement:
        ev = StructureEvidence.from_observation(obs)
        # the verdict-bearing measurements first (the report's headline), then the numbers behind the balance
        measurements, extra = _balance_measurements(obs, ev, th)
        measurements += _precision_measurements(ev)
        measurements += _frozen_measurements(ev)
        details = {"velocity": obs["velocity"], "velocity_how": obs["velocity_how"],
                   "balance": {k: v for k, v in obs["balance"].items()
                               if k in ("t_change", "x_change", "ratio", "noise", "t_slope", "t_offset", "reason",
                                        "where", "features")},
                   "modes": obs["modes"], "notes": obs["notes"]}
        return self.conclude(ev, th, measurements + extra, _passed(obs, ev), details)


def _balance_measurements(obs, ev: StructureEvidence, th: StructureThresholds
                          ) -> tuple[list[Measurement], list[Measurement]]:
    b = ev.balance
    measurements: list[Measurement] = []
    where = f"{obs['velocity']} ({obs['velocity_class']})" if obs["velocity"] else "none found"
    extra = [info("velocity module", where, expected=obs["velocity_how"])]
    expected = f"{th.time_ignored_ratio:g}..{th.time_dominates_ratio:g}"
    state = b.state_under(th)
    if state == maths.NOT_MEASURED:  # a probe that did not measure is never a PASS: a t x 1000 bug would go unnoticed
        measurements.append(Measurement(name="t / x_t sensitivity", value=None, expected=expected,
                                        verdict=Verdict.WARN, unit=f"not measured: {b.reason}"))
        return measurements, extra
    if b.where != "output":
        extra.append(info("balance measured at", b.where))
    if b.t_slope is not None:
        extra.append(info("t argument / step t", b.t_slope, unit="x",
                          expected=f"{b.t_slot}: {b.t_slope:.4g} * t + {b.t_offset:.3g}, range {b.t_range[0]:.3g}.."
                                   f"{b.t_range[1]:.3g}"))
    extra.append(info("output change, t permuted", b.t_change, unit="rel", expected="||f(t perm) - f|| / ||f||"))
    extra.append(info("output change, x_t permuted", b.x_change, unit="rel", expected="||f(x_t perm) - f|| / ||f||"))
    if state == maths.FLAT:
        measurements.append(Measurement(
            name="t / x_t sensitivity", value=None, expected=expected, verdict=Verdict.WARN,
            unit="not measurable: the output (and its last hidden activation) moves with neither t nor x_t"))
        return measurements, extra
    features = b.features
    if features is not None and features.roughness is not None:
        aliased = features.roughness > th.time_features_aliased
        measurements.append(flag("time features follow t smoothly", not aliased,
                                 value=maths.rounded(features.roughness), unit="rel",
                                 expected=f"<= {th.time_features_aliased:g} (the smoothest feature at "
                                          f"{features.module})", bad=Verdict.WARN))
    if state in (maths.UNITS, maths.RESOLVED):
        extra.append(info("time features across the batch", maths.rounded(features.spread), unit="rel",
                          expected=f">= {th.time_features_min:g} at {features.module} (the first layer input that "
                                   f"follows t; t meets x_t at {features.mixes})"))
    if state == maths.RESOLVED:  # blind downstream only (zero-initialised blocks): the time pathway itself is sound
        expected = f"{expected}; blind at these weights, judged at the time features instead"
    measurements.append(Measurement(name="t / x_t sensitivity", value=maths.rounded(b.ratio), unit="x",
                                    expected=expected,
                                    verdict=Verdict.PASS if state in maths.PASSING else Verdict.WARN))
    return measurements, extra


def _precision_measurements(ev: StructureEvidence) -> list[Measurement]:
    p = ev.precision
    fp16 = p.fp16
    unscaled = bool(fp16) and not p.scaler_enabled
    compute = ", ".join(fp16) if fp16 else (
        f"{p.autocast_device} autocast {p.autocast_dtype.replace('torch.', '')}" if p.autocast
        else (p.param_dtype or "unknown").replace("torch.", ""))
    # the value answers the measurement's question first: "no: float32; ..." must not read as if fp16 were found
    measurements = [flag("fp16 without loss scaling", not unscaled,
                         value=f"{'yes' if unscaled else 'no'}: {compute}; grad_scaler {p.scaler_state}",
                         expected="float16 compute needs an enabled grad_scaler", bad=Verdict.WARN)]
    if ev.non_finite:
        value = ", ".join(f"{f.key}@batch{f.batch}: {f.count}" for f in ev.non_finite[:6])
        measurements.append(flag("non-finite step outputs", False, value=value, expected="none"))
    else:
        measurements.append(flag("non-finite step outputs", True, value="none", expected="none"))
    return measurements


def _frozen_measurements(ev: StructureEvidence) -> list[Measurement]:
    if not ev.frozen:
        return [info("frozen modules", "none declared", note="pipeline fields 'frozen', 'vae'")]
    # Train mode matters only through layers that behave differently in it (checks/_modes.py says which): a frozen
    # module in train mode without any is reported, not warned about.
    training = [m.name for m in ev.frozen if m.training]
    active = [m for m in ev.frozen if m.active]
    grads = [m for m in ev.frozen if m.grad_tensors]
    held = [m for m in ev.frozen if m.optimizer_elements]
    return [
        info("frozen modules in train mode", ", ".join(training) or "none",
             note="judged by their mode-dependent layers, below"),
        flag("mode-dependent layers active in frozen modules", not active,
             value="; ".join(f"{m.name}: {m.layers}" for m in active) or "none",
             expected="none (dropout, batch-norm... in eval)", bad=Verdict.WARN),
        flag("frozen parameters with requires_grad", not grads, value=sum(m.grad_tensors for m in grads),
             unit="tensors", expected="0", bad=Verdict.WARN),
        flag("frozen parameters in the optimizer", not held, value=sum(m.optimizer_elements for m in held),
             unit="parameters", expected="0",
             bad=Verdict.FAIL if any(m.optimizer_grad_elements for m in held) else Verdict.WARN),
    ]


def _passed(obs: dict[str, Any], ev: StructureEvidence) -> str:
    """What the row says when no finding counts: what was measured."""
    b = ev.balance
    if b.measured and b.ratio is not None:
        parts = [f"t / x_t sensitivity {b.ratio:.3g} (t {b.t_change:.3g}, x_t {b.x_change:.3g}; velocity: "
                 f"{obs['velocity']})"]
    elif b.measured:
        parts = ["time balance not measurable (output moves with neither t nor x_t)"]
    else:
        parts = [f"time balance not measured ({b.reason})"]
    p = ev.precision
    parts.append(f"compute {(p.autocast_dtype or p.param_dtype or '?').replace('torch.', '')}")
    if ev.frozen:
        training = [m.name for m in ev.frozen if m.training]
        state = "in eval" if not training else (
            f"{', '.join(training)} in train mode without mode-dependent layers (harmless)")
        parts.append(f"{maths.plural(len(ev.frozen), 'frozen module')} {state}, no grad")
    else:
        parts.append("no frozen modules")
    return "; ".join(parts)
