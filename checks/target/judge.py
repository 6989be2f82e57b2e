"""`target`'s measurement table (for `--verbose` and the JSON) and the line a passing run shows: pure functions of
the evidence and the thresholds. The verdicts come from :mod:`.compare` and the evidence's own helpers, the very
ones the rules use, so every non-PASS measurement is backed by a finding.
"""

from __future__ import annotations

from typing import Any

from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from .compare import DECLARED, PATH_VELOCITY, Judged, assess, assess_declared, implied_decides, judged, velocity_text
from .evidence import Candidate, Evidence, KlPath, Prediction, Subject


class Table:
    """The measurements in report order, and what a passing run says it checked."""

    def __init__(self) -> None:
        self.measurements: list[Measurement] = []
        self.good: list[str] = []

    def add(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        return measurement


def measurements(ev: Evidence, th: Any) -> Table:
    out = Table()
    decided = implied_decides(ev)
    j = judged(ev, th)
    if ev.path.problem is None:
        _implied(ev, th, out, j if decided else None)
    if ev.path.inferred:
        out.add(info("values inferred", "; ".join(ev.implied.inferred),
                     expected="the step returns only 'loss': these come from the velocity module and encode"))
        out.add(info("path (inferred)", f"{ev.implied.describe}; {ev.implied.direction}"))
    else:
        _path(ev, th, out, None if decided else j, decided)
    _gradients(ev, out)
    _precision(ev, out)
    return out


def _path(ev: Evidence, th: Any, out: Table, j: Judged | None, decided: bool) -> None:
    path = ev.path
    if path.problem is not None:
        out.add(flag("path fit", False, value=path.problem, bad=Verdict.WARN))
        return
    if path.t_scale:
        # timesteps (0..1000, what diffusers' transformers take) are a convention, not a bug: the target is judged
        # against d x_t / d(t / scale), and a target in other time units shows as a mis-scaled target
        out.add(info("t in timestep units", path.t_raw_max,
                     expected=f"t / {path.t_scale:g} is the path's time in [0, 1] (raw t {path.t_raw_min:.4g}.."
                              f"{path.t_raw_max:.4g})"))
        out.good.append(f"t in timestep units: judged as t / {path.t_scale:g}")
    out.add(at_most("x_t off span(x0, x1)", path.xt_residual, warn=th.xt_residual_warn, fail=th.xt_residual_fail))
    noise = path.noise_term
    if noise:
        out.add(info("noise term of x_t (step output 'noise')", noise["share"], unit="of ||x_t||",
                     expected=f"{noise['describe']}; RMS s'/s {noise['log_slope_rms']:.3g} (the target's "
                              f"s'/s (x_t - mu_t) term); off span(x0, x1) without it: "
                              f"{noise['residual_without']:.1%}"))
        out.good.append(f"x_t carries the returned noise ({noise['share']:.1%} of ||x_t||, {noise['describe']}): "
                        "the path velocity includes its s'/s term")
    if not path.fit_ok:
        out.add(flag("t spread for the path fit", False,
                     value=f"{path.distinct_t} distinct, range {path.t_range:.3g}",
                     expected=">= 3 distinct values spanning >= 0.02", bad=Verdict.WARN))
        return
    out.add(info("path", f"{path.describe}; {path.direction}"))
    out.add(info("samples (batches)", f"{path.samples} ({path.batches})",
                 expected=f"{path.distinct_t} distinct t, range {path.t_range:.3g}"))
    out.add(at_most("(a, b) off the fitted a(t), b(t)", path.fit_residual, warn=th.schedule_residual_warn,
                    fail=th.schedule_residual_fail))
    if not path.v_target_returned:
        if not decided:
            out.add(flag("target audited", False, value="no v_target, no implied target", bad=Verdict.WARN))
        else:
            out.add(info("v_target", "not returned: the loss's implied target is audited instead"))
        return
    if j is not None:
        _match(j, th, out)
        return
    # the implied audit decides; the step's v_target is reported as a cross-check
    step = path.v_target
    out.add(info("median cos(v_target, path velocity)", step.cos_median,
                 expected="cross-check (the implied target decides)"))
    out.add(info("median ||v_target|| / ||path velocity||", step.ratio_median, expected="cross-check"))


def _match(j: Judged, th: Any, out: Table) -> None:
    """The decisive target's cos / norm ratio against the path velocity (or the declared prediction)."""
    subject = j.subject.value
    if j.path.prediction is not Prediction.VELOCITY:
        _declared(j, th, out)
        return
    m, a = j.match, assess(j, th)
    out.add(at_least(f"median cos({subject}, path velocity)", m.cos_median, warn=th.cos_warn, fail=th.cos_fail)
            .model_copy(update={"verdict": a.cos}))
    out.add(ratio_within(f"median ||{subject}|| / ||path velocity||", m.ratio_median,
                         warn_factor=th.norm_ratio_warn, fail_factor=th.norm_ratio_fail)
            .model_copy(update={"verdict": a.ratio}))
    out.add(info(f"5th percentile cos ({subject})", m.cos_p05))
    out.add(at_most(f"share of samples with cos < {th.cos_fail:g}"
                    + (f" ({subject})" if j.subject is not Subject.V_TARGET else ""),
                    a.share, warn=th.disagree_share_warn, fail=None))
    if j.subject is Subject.V_TARGET:
        c, d, _ = j.path.v_combination
        out.add(info("v_target ~ c x0 + d x1", f"c {c:.3g}, d {d:.3g}",
                     expected=f"c = a'(t), d = b'(t): {velocity_text(j.path)}"))
        if a.verdict is Verdict.PASS:
            out.good.append(f"v_target = path velocity (median cos {m.cos_median:.4f}, norm ratio "
                            f"{m.ratio_median:.3f}; {j.path.direction})")


def _declared(j: Judged, th: Any, out: Table) -> None:
    d = assess_declared(j, th)
    subject = j.subject.value
    out.add(at_least(f"median cos({subject}, {d.key})", d.entry.cos, warn=th.cos_warn, fail=th.cos_fail))
    out.add(ratio_within(f"median ||{subject}|| / ||{d.key}||", d.entry.ratio, warn_factor=th.norm_ratio_warn,
                         fail_factor=th.norm_ratio_fail))
    if d.verdict is Verdict.PASS and j.subject is Subject.V_TARGET:
        out.good.append(f"v_target = {d.name} as the declared prediction '{d.prediction.value}' (median cos "
                        f"{d.entry.cos:.4f})")


def _implied(ev: Evidence, th: Any, out: Table, j: Judged | None) -> None:
    implied, path = ev.implied, ev.path
    if not implied.ok:
        out.add(info("implied target", f"not measured: {implied.reason}",
                     expected="the loss gradient w.r.t. the velocity module's output"))
        return
    if j is not None:
        _match(j, th, out)
        ranked = implied.match.candidates
        if ranked:
            alike = [c for c in ranked if c.cos >= ranked[0].cos - 0.005]
            best = next((c for c in alike if c.kind is Candidate.VELOCITY), alike[0])
            same = [c.name for c in alike if c is not best and c.kind not in PATH_VELOCITY]
            named = best.name + (f" = {same[0]}" if same else "")
            out.add(info("implied target resembles",
                         f"{named} (cos {best.cos:.4f}, norm ratio {best.ratio:.3g})",
                         expected="the path velocity (or the declared prediction)"))
    out.add(info("velocity module (implied audit)", implied.module, expected=implied.how))
    if implied.calls > 1:
        out.add(info("velocity module calls per step", implied.calls, expected="the first call is audited"))
    out.add(at_most("share of samples with a negative loss weight", implied.negative_share, warn=None, fail=0.0))
    out.add(info("implied weight k(t) / median", implied.weight_describe,
                 expected=f"spread {implied.weight_spread:.3g}x, "
                          f"{implied.zero_weight_share:.0%} of samples with zero weight"))
    if not implied.compared:
        out.add(info("implied target vs path velocity", f"not compared: {implied.not_compared}"))
        return
    matched = (assess_declared(j, th).verdict if path.prediction is not Prediction.VELOCITY
               else assess(j, th).verdict) is Verdict.PASS
    if matched:
        relabel = ""
        step = path.v_target
        if path.prediction is Prediction.VELOCITY and (step.cos_median if step else 1.0) < th.cos_warn:
            relabel = (f"; the step's v_target is a relabelled target (median cos {step.cos_median:.3f} with the "
                       "path velocity): the loss preconditions the output")
        kind, toward = (DECLARED[path.prediction][0], DECLARED[path.prediction][2]) \
            if path.prediction is not Prediction.VELOCITY else (None, "the path velocity")
        entry = implied.match.candidate(kind) if kind is not None else None
        cos, ratio = (entry.cos, entry.ratio) if entry else (implied.match.cos_median, implied.match.ratio_median)
        direction = path.direction or implied.direction
        out.good.append(f"the loss trains the raw output of {implied.module} toward {toward} (median cos "
                        f"{cos:.4f}, norm ratio {ratio:.3f}; {direction}); loss weight "
                        f"{implied.weight_describe}{relabel}")


def _gradients(ev: Evidence, out: Table) -> None:
    g = ev.gradients
    out.add(flag("trainable parameters v_target reaches", not g.moving, value=len(g.moving), expected="0"))
    for note in g.notes_info:
        out.add(info("gradient map", note))
    for note in g.notes:
        out.add(flag("gradient map", False, value=note, bad=Verdict.WARN))
    for key in g.terms_without_graph:
        if key != "kl":  # judged with the KL path below
            out.add(flag(f"{key} has an autograd graph", False, value=False, bad=Verdict.FAIL))
    good: list[str] = []
    fm = g.fm
    if fm is not None:
        _fm_paths(ev, out)
        good.append(f"{g.fm_key} -> " + ", ".join(f"{m} {n:.3g}" for m, n in sorted(fm["modules"].items())
                                                  if g.trainable(m) and n > 0))
    if g.kl is KlPath.GRAPH:
        to_head = g.kl_to_head()
        if to_head is not None:
            out.add(flag("kl reaches the head", to_head > 0, value=to_head, expected="> 0", bad=Verdict.WARN))
        others = g.kl_others()
        out.add(flag("kl reaches modules other than the head", not others,
                     value=", ".join(sorted(others)) or "none", expected="none", bad=Verdict.WARN))
        good.append("kl -> " + (", ".join(g.head) or "nothing"))
    elif g.kl is KlPath.NO_GRAPH:
        out.add(flag("kl has an autograd graph", not g.has_head, value=False,
                     expected="a graph to the head" if g.has_head else "", bad=Verdict.WARN))
    elif g.kl is KlPath.ABSENT:
        out.add(info("kl gradient path", "no kl output: KL path not audited"))
        good.append("no kl output: KL path not audited")
    frozen = g.frozen_hits()
    out.add(flag("gradient into frozen modules", not frozen,
                 value=", ".join(f"{m} {n:.3g}" for m, n in sorted(frozen.items())) or "none", expected="none"))
    silent = g.silent()
    if silent is not None:
        out.add(flag("trainable modules with no gradient", not silent, value=", ".join(silent) or "none",
                     expected="none", bad=Verdict.WARN))
    if good:
        out.good.append("; ".join(good))


def _fm_paths(ev: Evidence, out: Table) -> None:
    """fm_loss must reach the velocity net, the head through x_t, and nothing through v_target."""
    g = ev.gradients
    fm, key, tiny = g.fm, g.fm_key, g.fm_tiny()
    for module, norm in sorted(fm["modules"].items()):
        if g.trainable(module):
            out.add(info(f"|grad {key}| {module}", norm, note="the gradient norm it sends this module"))
    v_norm = g.velocity_norm()
    if v_norm is not None:
        out.add(flag(f"{key} reaches the velocity net", v_norm > tiny and v_norm > 0, value=v_norm,
                     expected="> 0"))
    if g.grads.get(f"{key} via v_target") is not None:
        hit = g.through_target()
        out.add(flag(f"{key} gradient through v_target", not hit, value=max(hit.values()) if hit else 0.0,
                     expected="0"))
    if g.has_head and not g.xt_returned:
        out.add(info(f"{key} reaches the head through x_t", "not measured: the step returns no 'xt'"))
    elif g.has_head:
        via = g.head_via_xt()
        out.add(flag(f"{key} reaches the head through x_t", via > tiny and via > 0, value=via, expected="> 0",
                     bad=Verdict.WARN))
    elif not g.has_mu:
        out.add(info("head", "none: the source is not produced by a trainable module"))


def _precision(ev: Evidence, out: Table) -> None:
    p = ev.precision
    dtypes = p.dtypes
    if p.xt_half_dtype():
        out.add(flag("x_t dtype", False, value=dtypes["xt"], expected="float32 like x0, x1", bad=Verdict.WARN))
    quantised = p.xt_quantised()
    if quantised is not None:
        half, share, base = quantised
        out.add(flag("x_t values exact in half precision", False, value=share,
                     expected=f"about the share of x0, x1 ({base:.2g})", bad=Verdict.WARN))
    # (shapes: fmcheck's core already rejects step outputs whose latent-space shapes disagree)
    if p.dtypes_differ():
        out.add(flag("v_pred / v_target dtypes", not p.target_half(),
                     value=f"{dtypes['v_pred']} / {dtypes['v_target']}", expected="v_target in float32",
                     bad=Verdict.WARN))


def passed(table: Table) -> str:
    return "; ".join(table.good) or "target, detach and gradient paths as expected"


def details(obs: dict[str, Any], th: Any) -> dict[str, Any]:
    """What the JSON and the plots read: the observation, less the per-sample cosines."""
    implied = obs.get("implied", {"ok": False, "reason": "not run"})
    path = {k: v for k, v in obs["path"].items() if k != "cos_samples"}
    if "schedule" in path:
        path["schedule"] = {**path["schedule"], "guides": {"cos": [[th.cos_warn, "warn"], [th.cos_fail, "fail"]]}}
    grad = obs["autograd"]
    return {
        "path": path,
        "implied": {k: v for k, v in implied.items() if k != "cos_samples"},
        "gradients": grad["grads"],
        "roles": grad["roles"],
        "moving_target": grad["moving_target"],
        "target_reaches_frozen": grad["target_reaches_frozen"],
        "x1_reaches": grad["x1_reaches"][:20],
        "precision": obs["precision"],
    }
