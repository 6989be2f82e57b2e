"""Check ``kl``: KL and logvar health of the text head's Gaussian q(z0 | text) = N(mu, diag(exp(logvar))).

The seed's fourth lesson: a Gaussian head with a KL to N(0, I) stalls or explodes when logvar is unbounded (sigma -> 0
makes the KL huge) or when the KL is at full weight from step 0. Measured here (``measure``): logvar and sigma
statistics, a stress probe of the logvar bound (``probe``), the user's ``kl`` against the analytic KL (``maths``), the
``kl_weight`` warmup, the weighted KL against ``fm_loss``, and posterior collapse. Concluded (``rules``): one rule per
cause, on the typed evidence (``evidence``).
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Check, Judgement
from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from .doc import DOC
from .evidence import KLEvidence, KLThresholds, stress_pinned_judged
from .measure import FORMULA_RTOL, NOT_APPLICABLE
from .rules import RULES

__all__ = ["KLCheck", "KLThresholds", "NOT_APPLICABLE"]

class KLCheck(Check):
    id = "kl"
    title = "KL and logvar health"
    purpose = ("Gaussian text head: logvar bounded (stress probe), kl formula vs analytic KL, kl_weight warmup, "
               "KL/FM balance, posterior collapse")
    order = 40
    Thresholds = KLThresholds
    doc = DOC
    rules = RULES

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import measure

        return measure(ctx)

    def judge(self, observation: dict[str, Any], thresholds: KLThresholds) -> Judgement:
        ev = KLEvidence.from_observation(observation)
        details = {"stress": observation["stress"], "formula": observation.get("formula"),
                   "warmup": observation.get("warmup")}
        return self.conclude(ev, thresholds, measurements(observation, ev, thresholds), passed(observation),
                             details)


def passed(obs: dict[str, Any]) -> str:
    """What the row says when no finding counts: the logvar range, the bound, the formula, the schedule."""
    post = obs["posterior"]
    parts = [f"logvar in [{post['logvar_min']:.3g}, {post['logvar_max']:.3g}]"]
    stress = obs["stress"]
    if stress.get("runs"):
        parts.append(f"bounded under stress (max |logvar| {stress['logvar_max_abs']:.3g})")
    if obs.get("formula", {}).get("reduction"):
        parts.append(f"kl = {obs['formula']['reduction']} ({obs['formula']['label']})")
    warm = obs.get("warmup")
    if warm and warm["total_steps"]:
        parts.append("kl_weight " + " -> ".join(f"{w:.3g}" for _, _, w in warm["weights"]))
    return "; ".join(parts)


def measurements(obs: dict[str, Any], ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    """The measurements table (--verbose, JSON). Every non-PASS row here is backed by a rule firing on the same
    evidence (the verdict comes from the rules)."""
    post = obs["posterior"]
    bound = th.logvar_bound
    ms = [info("logvar min", post["logvar_min"], "nats"), info("logvar max", post["logvar_max"], "nats"),
          info("logvar mean", post["logvar_mean"], "nats"),
          info("sigma min / mean / max", f"{post['sigma_min']:.4g} / {post['sigma_mean']:.4g} / "
                                         f"{post['sigma_max']:.4g}"),
          at_most("max |logvar| on the measured batches", ev.posterior.max_abs_logvar, warn=None, fail=bound,
                  unit="nats")]
    ms += _formula_rows(ev, th)
    ms += _stress_rows(ev, th)
    ms += _warmup_rows(ev, th)
    ms += _balance_rows(ev, th)
    ms += _collapse_rows(obs, ev, th)
    return ms


def _formula_rows(ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    f = ev.formula
    if f is None:
        return [info("kl formula", "not checked: the step returns no 'kl'")]
    ms = [at_least("kl (user) minimum", f.kl_min, warn=None, fail=-th.negative_kl_tolerance)]
    name, expected = "kl formula vs analytic KL", "x 1 (correct)"
    if not f.kl_finite:
        return ms + [info(name, "not compared", note="the step's kl is not finite")]
    if f.reduction is None:
        return ms + [flag(name, False, value="no match", bad=Verdict.WARN,
                          expected="a reduction of 0.5 * (mu^2 + exp(logvar) - 1 - logvar)")]
    precision = f" (to {f.tolerance:.2%}: low-precision rounding)" if f.tolerance > FORMULA_RTOL else ""
    if f.ambiguous:
        return ms + [info(name, f"{f.reduction}{precision}; the KL is too close to 0 for its sign and 1/2 to be "
                                "told apart")]
    shown = f"{f.reduction} x {f.factor:g} ({f.label}){precision}"
    if f.flipped:
        ms.append(flag(name, False, value=shown, expected=expected))
    elif f.label == "missing 1/2":
        ms.append(flag(name, False, value=shown, bad=Verdict.WARN, expected=expected))
    elif f.batch_summed:
        ms.append(flag(name, False, value=shown, bad=Verdict.WARN, expected="averaged over the batch"))
    else:
        ms.append(flag(name, True, value=shown, expected=expected))
    if f.fm_reduction:
        ms.append(info("fm_loss normalisation", f.fm_reduction))
    return ms


def _stress_rows(ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    s = ev.stress
    if s.located is None:
        return [flag("stress probe: module producing logvar located", False, value="none", bad=Verdict.WARN,
                     expected="a trainable module whose output feeds logvar")]
    ms = [info("stress probe: module pushed", f"{s.located} ({s.why})"),
          info("stress probe: push", f"o -> +-({s.factor:g} * o + {s.shift:g})")]
    if s.raised is not None:
        ms.append(flag("stress probe: step completes", False, value=s.raised, bad=Verdict.WARN))
    if s.ran:
        ms.append(at_most("max |logvar| under the stress probe", s.logvar_max_abs, warn=None, fail=th.logvar_bound,
                          unit="nats"))
        if s.bound is not None:
            ms.append(info("logvar range under the stress probe", f"[{s.bound[0]:.4g}, {s.bound[1]:.4g}]", "nats"))
        ms.append(flag("KL finite under the stress probe", s.kl_finite,
                       value=", ".join(f"{k:.4g}" for k in s.kls) if s.kls else s.kl_finite, expected="finite"))
    if stress_pinned_judged(ev, th):
        ms.append(at_most("share of logvar at the bound", ev.at_bound_share, warn=th.at_bound_warn, fail=None))
    return ms


def _warmup_rows(ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    w = ev.warmup
    if w is None:
        return [info("kl_weight schedule", "not probed: the step returns no 'kl_weight'")]
    ms = [info("kl_weight schedule", f"probing stopped: {w.note}")] if w.note else []
    ms += [info(f"kl_weight at step {step} ({fraction:.0%})", weight) for step, fraction, weight in w.weights]
    if not w.finite:
        return ms + [flag("kl_weight finite", False, value=w.listing, expected="finite")]
    ms.append(at_least("kl_weight minimum", min(x for _, _, x in w.weights), warn=None, fail=0.0))
    if w.total_steps is None:
        return ms + [info("kl_weight warmup", "not probed: the pipeline has no total_steps")]
    if w.target <= 0:
        return ms + [flag("kl_weight reaches a positive value", False, value=w.listing, bad=Verdict.WARN)]
    ms.append(at_most("kl_weight at step 0 / target", w.start, warn=th.warmup_start_warn, fail=None))
    full_at = next((f for _, f, x in w.weights if x >= 0.99 * w.target), None)
    if full_at is not None:
        ms.append(info("kl_weight reaches its target by", f"{full_at:.0%} of total_steps"))
    return ms


def _balance_rows(ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    name = "weighted KL / fm_loss"
    weight = ev.warmup.target_weight if ev.warmup is not None else None
    if weight is None or ev.formula is None or ev.fm_loss_mean is None:
        return [info(name, "not judged: needs 'kl', 'kl_weight' and 'fm_loss' outputs")]
    ratio = ev.balance_ratio()
    if ratio is None:
        return [info(name, "not judged: non-finite or zero fm_loss")]
    ms = [info("KL weight used (largest probed)", weight)]
    if ev.balance(th) is None:
        kl = ev.posterior.kl_per_element
        return ms + [info(name, ratio, "x", f"not judged below 1: KL {kl:.3g} nats/element, the head is at the "
                                            "prior")]
    # the same bands as the rules' balance_verdict
    return ms + [ratio_within(name, ratio, warn_factor=th.balance_warn, fail_factor=th.balance_fail)]


def _collapse_rows(obs: dict[str, Any], ev: KLEvidence, th: KLThresholds) -> list[Measurement]:
    post, p = obs["posterior"], ev.posterior
    ms = [info("KL per element (analytic)", p.kl_per_element, "nats")]
    if p.multi_sample_batches:
        ms.append(info("between-caption var(mu) / mean sigma^2", post["text_signal_ratio"]))
    if p.mu_energy == 0.0:
        return ms + [flag("mu depends on the text", p.mu_has_grad_path, value="mu = 0 exactly", bad=Verdict.WARN,
                          expected="a gradient path from mu to the trainable modules")]
    if not p.multi_sample_batches:
        # One sample per batch: mu cannot vary between captions within a batch, so a share of 0 is no evidence
        # of collapse. No verdict; say what would settle it.
        return ms + [info("share of mu varying between captions", "not measurable", "",
                          f"every measured batch has {p.largest_batch} sample: a batch of two or more captions "
                          "would measure it")]
    return ms + [at_least("share of mu varying between captions", p.text_share, warn=th.collapse_text_share,
                          fail=None)]
