"""What the ``kl`` check concludes: one rule per cause, each a pure test over the evidence (``evidence.py``) and
the thresholds, with its message and fix. The table is long because each rule carries its own documentation
(`fmcheck explain CODE`)."""

from __future__ import annotations

import math

from fmcheck.api import Hit, Rule
from fmcheck.verdict import Verdict

from .evidence import KLEvidence, KLThresholds, balance_verdict, stress_pinned_judged

CLAMP_FIX = ("bound logvar before it is used: logvar = logvar.clamp(-6, 6), or smoothly, logvar = 6 * torch.tanh("
             "logvar / 6), and compute the KL from the bounded logvar")


# -- tests -----------------------------------------------------------------------------------------------------
def _out_of_bound(ev: KLEvidence, th: KLThresholds):
    now = ev.posterior.max_abs_logvar
    if not now <= th.logvar_bound:
        return Hit.of(now, f"<= {th.logvar_bound:g}", "nats")
    return None


def _not_probed(ev: KLEvidence, th: KLThresholds):
    if ev.stress.located is None:
        return Hit.of("not run", "a trainable module whose output feeds logvar", reason=ev.stress.reason or "")
    return None


def _raised(ev: KLEvidence, th: KLThresholds):
    if ev.stress.located is not None and ev.stress.raised is not None:
        return Hit.of(ev.stress.raised, "the step completes")
    return None


def _unbounded(ev: KLEvidence, th: KLThresholds):
    s = ev.stress
    if s.located is not None and s.ran and not s.logvar_max_abs <= th.logvar_bound:
        return Hit.of(s.logvar_max_abs, f"<= {th.logvar_bound:g}", "nats", module=s.located)
    return None


def _nonfinite_under_stress(ev: KLEvidence, th: KLThresholds):
    s = ev.stress
    # an unbounded logvar explains a non-finite KL (kl.unbounded names that cause once), and a kl that is already
    # non-finite unstressed is kl.nonfinite's
    unstressed_finite = ev.formula is None or ev.formula.kl_finite
    if s.located is not None and s.ran and not s.kl_finite and s.logvar_max_abs <= th.logvar_bound \
            and unstressed_finite:
        shown = ", ".join(f"{k:.4g}" for k in s.kls) or "not finite"
        return Hit.of(shown, "finite", module=s.located)
    return None


def _at_bound(ev: KLEvidence, th: KLThresholds):
    if stress_pinned_judged(ev, th) and not ev.at_bound_share <= th.at_bound_warn:
        return Hit.of(ev.at_bound_share, f"<= {th.at_bound_warn:g}", share=f"{ev.at_bound_share:.0%}")
    return None


def _kl_nonfinite(ev: KLEvidence, th: KLThresholds):
    if ev.formula is not None and not ev.formula.kl_finite:
        return Hit.of(ev.formula.kl_min, "finite", subject="kl")  # the output it is about (structure.non_finite)
    return None


def _negative(ev: KLEvidence, th: KLThresholds):
    f = ev.formula
    if f is not None and f.kl_finite and not f.flipped and f.kl_min < -th.negative_kl_tolerance:
        return Hit.of(f.kl_min, f">= {-th.negative_kl_tolerance:g}", "nats")
    return None


def _mismatch(ev: KLEvidence, th: KLThresholds):
    f = ev.formula
    if f is None or f.reduction is not None or not f.kl_finite:  # a NaN kl matches nothing: kl.nonfinite says it
        return None
    if f.closest is not None and f.closest_ratio is not None:
        closest = (f" (closest: {f.closest}, kl / analytic = {f.closest_ratio:.4g}, tolerance "
                   f"{f.tolerance:.2g})")
        return Hit.of(f.closest_ratio, "a reduction of the analytic KL x 1", "x", closest=closest)
    return Hit.of("no match", "a reduction of the analytic KL x 1", closest="")


def _sign_flipped(ev: KLEvidence, th: KLThresholds):
    f = ev.formula
    if f is not None and f.reduction is not None and f.flipped:
        return Hit.of(f.factor, "x 1", "x", size=f"{abs(f.factor):g}", reduction=f.reduction,
                      lowest=f"{f.kl_min:.4g}")
    return None


def _missing_half(ev: KLEvidence, th: KLThresholds):
    f = ev.formula
    if f is not None and f.reduction is not None and not f.ambiguous and f.label == "missing 1/2":
        return Hit.of(f.factor, "x 1", "x", reduction=f.reduction)
    return None


def _batch_summed(ev: KLEvidence, th: KLThresholds):
    f = ev.formula
    if f is not None and f.batch_summed:
        return Hit.of(f.reduction, "averaged over the batch")
    return None


def _weight_nonfinite(ev: KLEvidence, th: KLThresholds):
    w = ev.warmup
    if w is not None and not w.finite:
        return Hit.of(w.listing, "finite")
    return None


def _weight_negative(ev: KLEvidence, th: KLThresholds):
    w = ev.warmup
    if w is not None and w.finite and min(x for _, _, x in w.weights) < 0:
        return Hit.of(min(x for _, _, x in w.weights), ">= 0", listing=w.listing)
    return None


def _weight_zero(ev: KLEvidence, th: KLThresholds):
    w = ev.warmup
    if w is not None and w.finite and w.total_steps is not None and w.target <= 0:
        return Hit.of(w.target, "> 0 at some probed step", listing=w.listing)
    return None


def _no_warmup(ev: KLEvidence, th: KLThresholds):
    w = ev.warmup
    start = w.start if w is not None else None
    if start is None or start <= th.warmup_start_warn:
        return None
    values = [x for _, _, x in w.weights]
    constant = max(values) - min(values) <= 1e-12 * max(1.0, abs(w.target))
    how = "kl_weight never changes" if constant else f"kl_weight starts at {start:.0%} of its target"
    return Hit.of(start, f"<= {th.warmup_start_warn:g}", "x target", how=how, listing=w.listing)


def _dominates(ev: KLEvidence, th: KLThresholds):
    ratio = ev.balance(th)
    if ratio is None or ratio <= 1:
        return None
    verdict = balance_verdict(ratio, th)
    if verdict is None:
        return None
    return Hit.of(ratio, f"<= {th.balance_warn:g}", "x", verdict=verdict, ratio=f"{ratio:.3g}")


def _negligible(ev: KLEvidence, th: KLThresholds):
    ratio = ev.balance(th)
    if ratio is None or ratio > 1:
        return None
    verdict = balance_verdict(ratio, th)
    if verdict is None:
        return None
    smaller = 1 / ratio if ratio > 0 else math.inf
    return Hit.of(ratio, f">= {1 / th.balance_warn:g}", "x", verdict=verdict, smaller=f"{smaller:.3g}")


def _collapsed_source(ev: KLEvidence, th: KLThresholds):
    p = ev.posterior
    if p.mu_energy == 0.0 and not p.mu_has_grad_path:
        return Hit.of("mu = 0 exactly", "a gradient path from mu to the trainable modules")
    return None


def _posterior_collapse(ev: KLEvidence, th: KLThresholds):
    p = ev.posterior
    if p.mu_energy == 0.0 or not p.multi_sample_batches:
        return None  # mu = 0 is the rule above's; batches of one sample cannot show collapse
    if p.text_share < th.collapse_text_share:
        near_zero = "KL ~ 0 and " if p.kl_per_element < 0.01 else ""
        return Hit.of(p.text_share, f">= {th.collapse_text_share:g}", near_zero=near_zero,
                      kl=f"{p.kl_per_element:.3g}")
    return None


# -- the rules -------------------------------------------------------------------------------------------------
_PROBE_DOC = ("The stress probe locates the trainable module whose output produces logvar and pushes that output to "
              "+-(100 * o + 100) for one step each way (no autograd). ")

# In the order the check measures them (and its summary lists them within a verdict): the step's own numbers,
# the formula, the stress probe, the schedule, the balance, collapse.
RULES = (
    Rule(
        code="kl.logvar_out_of_bound", verdict=Verdict.FAIL,
        title="logvar already beyond the bound on the measured batches",
        message="logvar already reaches |logvar| = {observed} {unit} on the measured batches (expected {bound})",
        fix=CLAMP_FIX, test=_out_of_bound,
        doc="The largest |logvar| the step returns on the measured batches, against `logvar_bound` (20 nats: "
            "sigma between e^-10 and e^10). Beyond it the KL's -logvar and exp(logvar) terms are already huge or "
            "sigma is already meaningless, before any training. A head that truly needs a wider range can raise "
            "`logvar_bound`."),
    Rule(
        code="kl.nonfinite", verdict=Verdict.FAIL,
        title="the step's kl is not finite",
        message="the step's kl is not finite (lowest {observed})",
        fix="compute the KL from a bounded logvar; " + CLAMP_FIX, test=_kl_nonfinite,
        doc="Every value of the step's `kl` on the measured batches must be finite: a NaN or Inf KL (the log of a "
            "negative variance, exp of a huge logvar) poisons every gradient from the first step."),
    Rule(
        code="kl.negative", verdict=Verdict.FAIL,
        title="the step's kl is negative",
        message="the step's kl is negative ({observed}); a KL is never negative (expected {bound})",
        fix="KL(N(mu, sigma^2) || N(0, I)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar), summed or averaged; the "
            "common slip is -0.5 * (1 + logvar - mu^2 - exp(logvar)) without the leading minus",
        test=_negative,
        doc="The smallest value of the step's `kl` against -`negative_kl_tolerance` (1e-6). The KL of two Gaussians "
            "is never negative; when the kl is exactly a negated analytic KL, `kl.sign_flipped` names that instead. "
            "A KL estimate that may dip below 0 by design (a Monte Carlo estimate) can raise the tolerance."),
    Rule(
        code="kl.formula_mismatch", verdict=Verdict.WARN,
        title="the kl matches no reduction of the analytic KL",
        message="kl matches no reduction of the analytic KL{closest}",
        fix="compute kl = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) from the returned mu and logvar (a Monte Carlo "
            "estimate or free bits explain a mismatch; then this warning is expected)",
        test=_mismatch,
        doc="The step's `kl` against the analytic KL 0.5 * (mu^2 + exp(logvar) - 1 - logvar) of its own mu and "
            "logvar, under every usual reduction (sum or mean over latent dims and batch, per sample, per "
            "channel) times 1, 2, -1, -2, to 1e-3 relative (wider for float16/bfloat16 rounding), on every batch. "
            "A Monte Carlo KL, free bits or a non-standard prior match none: `--ignore kl.formula_mismatch`."),
    Rule(
        code="kl.sign_flipped", verdict=Verdict.FAIL,
        title="the kl has a flipped sign",
        message="kl has a flipped sign: kl = -{size} x the analytic KL ({reduction}), {lowest} at its lowest",
        fix="kl = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) (or -0.5 * (1 + logvar - mu^2 - exp(logvar))); a "
            "negative KL rewards the head for leaving the prior",
        test=_sign_flipped,
        doc="The step's `kl` equals minus the analytic KL (or minus twice it) under one reduction, on every "
            "measured batch, and the KL is far enough from 0 for the sign to be told apart. Minimising it pushes "
            "the head AWAY from the prior: sigma and mu grow without limit."),
    Rule(
        code="kl.missing_half", verdict=Verdict.WARN,
        title="the kl is twice the analytic KL (missing 1/2)",
        message="kl is twice the analytic KL (missing 1/2; {reduction})",
        fix="multiply by 0.5: KL = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)",
        test=_missing_half,
        doc="The step's `kl` equals 2 x the analytic KL under one reduction on every measured batch. The KL "
            "weight is then effectively doubled; a deliberate factor of 2 folded into the weight can "
            "`--ignore kl.missing_half`."),
    Rule(
        code="kl.batch_summed", verdict=Verdict.WARN,
        title="the kl sums over the batch while fm_loss averages",
        message="kl sums over the batch ({observed}) while fm_loss does not: the KL's weight grows with the batch "
                "size",
        fix="average the KL over the batch: .sum(dims).mean() or .mean()",
        test=_batch_summed,
        doc="The reduction the step's `kl` matches sums over the batch (sum over everything, or a per-sample mean "
            "summed over the batch) while fm_loss, matched against the squared error of v_pred and v_target, does "
            "not. The KL's weight relative to the FM loss then changes with the batch size (and the GPU count)."),
    Rule(
        code="kl.stress_probe_not_run", verdict=Verdict.WARN,
        title="the module producing logvar could not be located: the logvar bound is not probed",
        message="stress probe not run: {reason}",
        fix="return mu/logvar computed from a trainable module's output (e.g. the module 'head'), so the logvar "
            "bound can be probed",
        test=_not_probed,
        doc=_PROBE_DOC + "This finding says no trainable module's output changes logvar when pushed: logvar is a "
            "free nn.Parameter or is computed outside the trainable modules, so a missing bound cannot be seen "
            "(an untrained head has |logvar| ~ 0.1). Expected for such a design: `--ignore kl.stress_probe_not_run`."),
    Rule(
        code="kl.stress_raised", verdict=Verdict.WARN,
        title="the step raises when the head's outputs grow",
        message="the step raised under the stress probe ({observed})",
        fix="a step that raises when the head's outputs grow has no numeric bound on logvar; " + CLAMP_FIX,
        test=_raised,
        doc=_PROBE_DOC + "This finding says the step raised an AssertionError, FloatingPointError, OverflowError or "
            "ValueError under the push (a NaN guard): the guard stops the run instead of keeping logvar bounded. "
            "A pipeline that deliberately asserts on large activations may `--ignore kl.stress_raised`."),
    Rule(
        code="kl.unbounded", verdict=Verdict.FAIL,
        title="logvar is unbounded: growing head outputs drive it past the bound",
        message="logvar is unbounded: pushing {module} drives |logvar| to {observed} {unit} (expected {bound})",
        fix=CLAMP_FIX, test=_unbounded,
        doc=_PROBE_DOC + "The largest |logvar| over both pushes is held to `logvar_bound` (20 nats): a clamp to "
            "[-6, 6] or 6 * tanh(logvar / 6) passes, a raw logvar reaches ~10^4. A bound wider than 20 nats by "
            "design can raise `logvar_bound`."),
    Rule(
        code="kl.nonfinite_under_stress", verdict=Verdict.FAIL,
        title="the KL becomes non-finite when the head's outputs grow",
        message="the KL becomes non-finite under the stress probe (pushing {module}: kl {observed})",
        fix=CLAMP_FIX, test=_nonfinite_under_stress,
        doc=_PROBE_DOC + "Under each push the step's kl and the analytic KL of its mu and logvar must stay finite: "
            "an exp(logvar) that overflows (logvar > 88 in float32) turns the loss into Inf/NaN mid-run. Bounding "
            "logvar before the KL is computed fixes it."),
    Rule(
        code="kl.logvar_at_bound", verdict=Verdict.WARN,
        title="a hard clamp holds most logvar values at the bound",
        message="{share} of logvar values sit at the bound (share {observed}, warn above {bound})",
        fix="the clamp holds most logvars (no gradient through a hard clamp): check the KL weight and what drives "
            "sigma to the bound, or use a smooth bound (6 * tanh(logvar / 6))",
        test=_at_bound,
        doc="The share of the measured logvar values within 1% of the bound range the stress probe found (its "
            "min and max under the push), judged when that bound is within `logvar_bound`. Above `at_bound_warn` "
            "(0.5) a hard clamp holds most of them, and a clamped value passes no gradient. A narrow clamp by "
            "design can raise `at_bound_warn`."),
    Rule(
        code="kl.weight_nonfinite", verdict=Verdict.FAIL,
        title="kl_weight is not finite",
        message="kl_weight is not finite ({observed})",
        fix="fix the schedule", test=_weight_nonfinite,
        doc="`kl_weight` as the step returns it at 0, 1%, 5%, 10% and 50% of total_steps must be finite: a "
            "schedule that divides by a zero warmup length gives NaN or Inf, and the loss with it."),
    Rule(
        code="kl.weight_negative", verdict=Verdict.FAIL,
        title="kl_weight is negative",
        message="kl_weight is negative ({listing})",
        fix="a negative weight rewards the head for leaving the prior; keep beta >= 0",
        test=_weight_negative,
        doc="The smallest `kl_weight` over the probed steps (0, 1%, 5%, 10%, 50% of total_steps) against 0: a "
            "negative weight turns the KL into a reward for leaving the prior (a cyclical schedule that "
            "overshoots, a sign slip)."),
    Rule(
        code="kl.weight_zero", verdict=Verdict.WARN,
        title="kl_weight is 0 at every probed step",
        message="kl_weight is 0 at every probed step ({listing}): the KL is never applied in the first half of the "
                "run",
        fix="ramp the KL weight from 0 to its target over the first ~10% of total_steps",
        test=_weight_zero,
        doc="`kl_weight` read at 0, 1%, 5%, 10% and 50% of total_steps is never positive: the head is not held to "
            "the prior in the first half of the run (a warmup keyed on epochs that never advance). A schedule "
            "that starts the KL late by design can `--ignore kl.weight_zero`."),
    Rule(
        code="kl.no_warmup", verdict=Verdict.WARN,
        title="no KL warmup: kl_weight starts at (or near) its target",
        message="no KL warmup: {how} ({listing})",
        fix="warm the KL weight up from 0: beta = beta_max * min(1, step / (0.1 * total_steps))",
        test=_no_warmup,
        doc="`kl_weight` at step 0 over the largest probed `kl_weight` (steps 0, 1%, 5%, 10%, 50% of total_steps), "
            "against `warmup_start_warn` (0.5). A KL at full weight from step 0 crushes the head onto the prior "
            "before the flow has learned anything. Needs total_steps. A constant small weight by design can raise "
            "`warmup_start_warn` to 1."),
    Rule(
        code="kl.dominates", verdict=Verdict.FAIL,
        title="the weighted KL dominates the FM loss",
        message="the weighted KL is {ratio}x fm_loss (expected {bound}): the KL term dominates and will crush the "
                "head onto the prior",
        fix="match the normalisations (both means over elements, or both sums over latent dims) and lower the KL "
            "weight",
        test=_dominates,
        doc="The weighted KL (the largest probed kl_weight x the mean of the step's kl) over fm_loss. Beyond "
            "`balance_warn` (10x) it warns, beyond `balance_fail` (100x) it fails: the KL gradient drowns the "
            "flow's, typically a KL summed over thousands of latent dims against a per-element MSE."),
    Rule(
        code="kl.negligible", verdict=Verdict.FAIL,
        title="the weighted KL is negligible next to the FM loss",
        message="the weighted KL is {smaller}x smaller than fm_loss (ratio {observed}, expected {bound})",
        fix="raise the KL weight or match the KL's normalisation to the FM loss",
        test=_negligible,
        doc="The weighted KL over fm_loss below 1 / `balance_warn` warns, below 1 / `balance_fail` fails: the KL "
            "cannot hold the head's scale. Judged only once the analytic KL per element exceeds "
            "`balance_informative_kl` (0.05 nats): at initialisation the head sits at the prior and a tiny KL is "
            "expected."),
    Rule(
        code="kl.collapsed_source", verdict=Verdict.WARN,
        title="mu is exactly 0 and has no gradient path",
        message="collapsed source: mu is exactly 0 for every sample and has no gradient path",
        fix="compute mu from the text embedding through the trainable head",
        test=_collapsed_source,
        doc="mu is exactly 0 on every measured sample, and a step run with autograd gives mu no gradient path to "
            "the trainable modules: z0 is plain noise, independent of the text. A zero-initialised head (mu = 0 "
            "with a gradient path) is reported, not flagged."),
    Rule(
        code="kl.posterior_collapse", verdict=Verdict.WARN,
        title="posterior collapse: mu is the same for every caption",
        message="posterior collapse: {near_zero}mu is the same for every caption of a batch (between-caption share "
                "{observed}, KL {kl} nats/element)",
        fix="feed the head the per-sample text embedding (not a constant, a padding token or a batch mean); if "
            "the head was trained, lower the KL weight or lengthen its warmup",
        test=_posterior_collapse,
        doc="The share of mu's energy that varies between the captions of a batch (batches of two or more) against "
            "`collapse_text_share` (1e-6): below it mu ignores the text and z0 carries no caption. A batch whose "
            "captions are all the same reads as collapsed: measure with distinct captions."),
)
