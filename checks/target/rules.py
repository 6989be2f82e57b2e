"""`target`'s rules: everything the check can conclude, each under its own code, as a pure test of the evidence
(:mod:`.evidence`) and the thresholds. The comparison of a target with the path velocity is shared with the
measurement table through :mod:`.compare`.

What the target is and how the path was built; the gradient paths and the precision of the path tensors are in
:mod:`.gradient_rules`. ``RULES`` is the whole table, in the order findings of one verdict are listed.
"""

from __future__ import annotations

from typing import Any, Optional

from fmcheck.findings import Hit
from fmcheck.judges import at_most
from fmcheck.verdict import Verdict

from .compare import Mismatch, assess, assess_declared, classify, judged, velocity_text
from .evidence import Evidence, Prediction
from .gradient_rules import GRADIENT_RULES, rule

GENERAL_FIX = ("Train the output toward the time derivative of your own x_t: for x_t = a(t) x0 + b(t) x1 it is "
               "a'(t) x0 + b'(t) x1, detached (x_t = (1-t) x0 + t x1 -> x1 - x0; x_t = t x0 + (1-t) x1 -> x0 - x1; "
               "x_t = cos(pi t/2) x0 + sin(pi t/2) x1 -> pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0)).")
NEGATIVE_WEIGHT_FIX = ("A loss weight must be >= 0 for every t: a negative weight maximises the error there and "
                       "trains the output away from its target. Check the sign of the weighting formula (e.g. "
                       "diffusers' compute_loss_weighting_for_sd3) and of any factor multiplied into the loss.")
COMPARED = ("The target judged is the loss's implied target (what the loss gradient trains the velocity module's raw "
            "output toward) when it can be measured, else the step's v_target; it is compared per sample with the "
            "path velocity d x_t / dt of the path fitted to (x0, x1, x_t, t) and with the usual wrong targets. ")


def _fields(ev: Evidence, j: Any) -> dict[str, Any]:
    m = j.match
    return {"label": j.subject.label, "cos": f"{m.cos_median:.3f}", "ratio": f"{m.ratio_median:.3g}",
            "caveat": j.caveat, "velocity_text": velocity_text(j.path)}


def _velocity_judged(ev: Evidence, th: Any):
    j = judged(ev, th)
    if j is None or j.path.prediction is not Prediction.VELOCITY:
        return None, None
    return j, assess(j, th)


def _mismatch(kind: Mismatch):
    """The test of one kind of wrong target: the cosine fails and the target is that quantity."""

    def test(ev: Evidence, th: Any) -> Optional[Hit]:
        j, a = _velocity_judged(ev, th)
        if j is None or a.cos is Verdict.PASS:
            return None
        found = classify(j.match, th, ev.path.source_is_noise)
        if found.mismatch is not kind:
            return None
        best, fields = found.best, _fields(ev, j)
        fields.update(best=best.name, best_cos=f"{best.cos:.3f}", best_ratio=f"{best.ratio:.3g}",
                      concrete=f" (it is {found.concrete})" if found.concrete else "",
                      near=", ".join(f"{c.name} (cos {c.cos:.2f})" for c in found.near))
        return Hit.of(j.match.cos_median, f">= {th.cos_warn:g}", "cos", verdict=a.verdict, **fields)

    return test


def _timestep_span(ev: Evidence, th: Any) -> Optional[Hit]:
    j, a = _velocity_judged(ev, th)
    if j is None or a.cos is not Verdict.PASS or not a.in_span_units:
        return None
    scale, ratio = j.path.t_scale, j.match.ratio_median
    span = scale * a.end
    return Hit.of(ratio, f"{1 / th.norm_ratio_warn:.4g}..{th.norm_ratio_warn:g}", "x", verdict=a.ratio,
                  **_fields(ev, j), scale=f"{scale:g}", span=f"{span:.4g}", ratio_end=f"{ratio / a.end:.3g}")


def _scaled(ev: Evidence, th: Any) -> Optional[Hit]:
    j, a = _velocity_judged(ev, th)
    if j is None or a.cos is not Verdict.PASS or a.in_span_units or a.ratio is Verdict.PASS:
        return None
    return Hit.of(j.match.ratio_median, f"{1 / th.norm_ratio_warn:.4g}..{th.norm_ratio_warn:g}", "x",
                  verdict=a.ratio, **_fields(ev, j))


def _partly_wrong(ev: Evidence, th: Any) -> Optional[Hit]:
    j, a = _velocity_judged(ev, th)
    if j is None or a.cos is not Verdict.PASS or a.share_verdict is Verdict.PASS:
        return None
    return Hit.of(a.share, f"<= {th.disagree_share_warn:g}", "of samples", share=f"{a.share:.0%}",
                  cos_fail=f"{th.cos_fail:g}", **_fields(ev, j))


def _declared(ev: Evidence, th: Any) -> Optional[Hit]:
    j = judged(ev, th)
    if j is None or j.path.prediction is Prediction.VELOCITY:
        return None
    d = assess_declared(j, th)
    if d.verdict is Verdict.PASS:
        return None
    best = j.match.candidates[0]
    return Hit.of(d.entry.cos, f">= {th.cos_warn:g}", "cos", verdict=d.verdict, label=j.subject.label,
                  name=d.name, prediction=d.prediction.value, cos=f"{d.entry.cos:.3f}", ratio=f"{d.entry.ratio:.3g}",
                  best=best.name, best_cos=f"{best.cos:.3f}")


def _negative_weighting(ev: Evidence, th: Any) -> Optional[Hit]:
    if ev.path.problem is not None or not ev.implied.ok:
        return None
    share = ev.implied.negative_share
    if at_most("", share, warn=None, fail=0.0).verdict is Verdict.PASS:
        return None
    return Hit.of(share, "0", "of samples", share=f"{share:.0%}")


def _path_not_audited(ev: Evidence, th: Any) -> Optional[Hit]:
    return None if ev.path.problem is None else Hit.of(ev.path.problem, problem=ev.path.problem)


def _audited_path(ev: Evidence):
    return ev.path if ev.path.problem is None and not ev.path.inferred else None


def _xt_off_span(ev: Evidence, th: Any) -> Optional[Hit]:
    path = _audited_path(ev)
    if path is None:
        return None
    verdict = at_most("", path.xt_residual, warn=th.xt_residual_warn, fail=th.xt_residual_fail).verdict
    if verdict is Verdict.PASS:
        return None
    return Hit.of(path.xt_residual, f"<= {th.xt_residual_warn:g}", "of ||x_t||", verdict=verdict,
                  share=f"{path.xt_residual:.1%}")


def _path_not_fitted(ev: Evidence, th: Any) -> Optional[Hit]:
    path = _audited_path(ev)
    if path is None or path.fit_ok:
        return None
    extra = f" after drawing {path.extra_batches} more batch(es)" if path.extra_batches else ""
    described = ""
    if path.v_combination is not None:
        c, d, residual = path.v_combination
        described = f"; v_target ~ {c:.3g} x0 + {d:.3g} x1" + (
            f" (but {residual:.0%} of it is outside span(x0, x1))" if residual > 0.05 else "")
    return Hit.of(path.distinct_t, ">= 3 distinct t spanning >= 0.02", "distinct t", reason=path.fit_reason,
                  extra=extra, described=described)


def _t_mismatch(ev: Evidence, th: Any) -> Optional[Hit]:
    path = _audited_path(ev)
    if path is None or not path.fit_ok:
        return None
    residual = path.fit_residual
    verdict = at_most("", residual, warn=th.schedule_residual_warn, fail=th.schedule_residual_fail).verdict
    if verdict is Verdict.PASS:
        return None
    return Hit.of(residual, f"<= {th.schedule_residual_warn:g}", "relative", verdict=verdict,
                  share=f"{residual:.1%}")


def _unaudited(ev: Evidence, th: Any) -> Optional[Hit]:
    path = _audited_path(ev)
    if path is None or not path.fit_ok or path.v_target_returned or (ev.implied.ok and ev.implied.compared):
        return None
    return Hit.of("no v_target, no implied target")


FAIL, WARN = Verdict.FAIL, Verdict.WARN
HERE = GENERAL_FIX + " Here: {velocity_text}."
IS_ANOTHER = ("{label} is not the path velocity (median cos {cos}); it is {best} (cos {best_cos}, norm ratio "
              "{best_ratio}){caveat}")
# in the order the report lists them within a verdict: what the target is, then the path, gradients, precision
RULES = (
    rule("sign_flipped", FAIL, "The target has the flipped sign of the path velocity",
          "{label} has the flipped sign{concrete}: median cos {cos} with the path velocity{caveat}",
          "Negate the target: train toward d x_t / dt ({velocity_text}). " + GENERAL_FIX,
          _mismatch(Mismatch.SIGN_FLIPPED),
          COMPARED + "Fires when the median cosine is below cos_warn and the target is closest to minus the path "
          "velocity (x0 - x1 for x_t = (1-t) x0 + t x1): the sign convention of one paper (t=1 at the data) mixed "
          "with another's (t=1 at the noise). A correct pipeline does not give it."),
    rule("epsilon", FAIL, "The target is the noise (an eps / DDPM target), not a velocity",
          IS_ANOTHER,
          "eps (or -eps, or a plain-noise source x0) is the DDPM noise-prediction target, not a "
          "velocity. " + HERE, _mismatch(Mismatch.EPSILON),
          COMPARED + "Fires when the cosine fails and the target matches the reparameterisation noise eps, -eps, "
          "or (with a plain noise source) x0 itself at cos >= cos_warn: a DDPM codebase's noise-prediction target "
          "kept. Declare `prediction = 'epsilon'` if the model is meant to predict the noise."),
    rule("x0", FAIL, "The target is the source sample x0, not a velocity",
          IS_ANOTHER,
          "x0 alone is the source, not a velocity. " + HERE, _mismatch(Mismatch.X0),
          COMPARED + "Fires when the cosine fails and the target matches x0 (the head's sample) at cos >= "
          "cos_warn. With a plain-noise source the same target is reported as target.epsilon."),
    rule("x1", FAIL, "The target is the data sample x1 (an x0-prediction target), not a velocity",
          IS_ANOTHER,
          "x1 alone is the data (an x0-prediction target), not a velocity. " + HERE,
          _mismatch(Mismatch.X1),
          COMPARED + "Fires when the cosine fails and the target matches the data x1 at cos >= cos_warn: a "
          "sample-prediction target. Declare `prediction = 'sample'` if the model is meant to predict the data."),
    rule("xt_as_target", FAIL, "The target is the model's input x_t, not a velocity",
          IS_ANOTHER,
          "x_t is the model's input, not a velocity. " + HERE, _mismatch(Mismatch.XT),
          COMPARED + "Fires when the cosine fails and the target matches x_t at cos >= cos_warn: the loss trains "
          "the network to copy its input."),
    rule("score", FAIL, "The target is a score (-x0 / a(t)), not a velocity",
          IS_ANOTHER,
          "-x0/sigma(t) is a score target, not a velocity. " + HERE, _mismatch(Mismatch.SCORE),
          COMPARED + "Fires when the cosine fails and the target matches -x0 / a(t), the score of a Gaussian path "
          "(a(t): the fitted share of x0 left in x_t), at cos >= cos_warn: a score-matching codebase's target."),
    rule("wrong_path", FAIL, "The target is x1 - x0 (or x0 - x1) on a path that is not linear",
          IS_ANOTHER,
          HERE, _mismatch(Mismatch.WRONG_PATH),
          COMPARED + "Fires when the cosine fails and the target matches the linear difference of the endpoints "
          "while the fitted path (cosine, VP, a warped schedule) has another velocity: the target of the linear "
          "path kept after the interpolation was changed."),
    rule("noise_term_missing", FAIL, "The target lacks the noise term of a stochastic path",
          IS_ANOTHER,
          HERE, _mismatch(Mismatch.NOISE_TERM_MISSING),
          COMPARED + "With a returned `noise` output, x_t = a x0 + b x1 + s(t) noise is fitted and the path "
          "velocity gains s'(t)/s(t) (x_t - mu_t). Fires when the target matches a'(t) x0 + b'(t) x1 without that "
          "term (a Schrodinger bridge trained on plain x1 - x0). Constant-sigma paths need no term and pass."),
    rule("not_velocity", FAIL, "The target is not the path velocity (nor a usual wrong target)",
          "{label} is not the path velocity: median cos {cos}; closest candidates: {near}{caveat}", HERE,
          _mismatch(Mismatch.OTHER),
          COMPARED + "Fires when the median cosine is below cos_warn (WARN) or cos_fail (FAIL) and no usual wrong "
          "target matches. A correct target expressed in another time variable than the t returned (e.g. "
          "phi = pi t / 2) or a path the fit resolves poorly can give it: return that t, or raise cos_warn / "
          "cos_fail, or `--ignore target.not_velocity`."),
    rule("scaled", FAIL, "The target is a multiple of the path velocity (mis-scaled)",
          "{label} is {ratio}x the path velocity (median norm ratio; cos {cos}): a mis-scaled target{caveat}",
          "Remove the extra factor from the target: it must be exactly d x_t / dt ({velocity_text}). If the "
          "sampler integrates in another time variable (e.g. phi = pi t / 2), return that variable as t.",
          _scaled,
          COMPARED + "Fires when the direction matches (cosine passes) but the median norm ratio "
          "||target|| / ||path velocity|| lies outside [1/norm_ratio_warn, norm_ratio_warn] (WARN) or "
          "[1/norm_ratio_fail, norm_ratio_fail] (FAIL): a weighting folded into the target (0.5 (x1 - x0)) or a "
          "target in other time units than the t returned."),
    rule("timestep_span", WARN, "t may be in timesteps of another span than the power of ten it was read in",
          "{label} is {ratio}x the velocity per t / {scale}, but {ratio_end}x the velocity per t / {span}: the "
          "path reaches its end at raw t {span}, so t may be in units of {span} timesteps{caveat}",
          "If t runs over 0..{span} (num_train_timesteps) and the sampler integrates over t / {span}, this is "
          "right; if it integrates over t / {scale}, scale the target. Returning t in [0, 1] (as the sampler "
          "integrates it) settles it.",
          _timestep_span,
          "t above 1.5 is read in timestep units and divided by the next power of ten (0..999 -> 1000: a "
          "convention, reported, not a finding). Fires when the norm ratio fails per t / (power of ten) but "
          "passes per t / (the raw t where the fitted path reaches its end, e.g. 500): which one the sampler "
          "integrates over is not in the step. Return t in [0, 1], or `--ignore target.timestep_span`."),
    rule("partly_wrong", WARN, "The target is wrong for part of the batch or of the t range",
          "{share} of the samples have cos < {cos_fail} with the path velocity although the median is {cos}: the "
          "target is wrong for part of the batch or of the t range",
          "Compare the target with d x_t / dt per t range; look for a branch on t (clamping, a different formula "
          "near t=0 or t=1).",
          _partly_wrong,
          COMPARED + "Fires when the median cosine passes but more than disagree_share_warn of the samples have "
          "cos < cos_fail: a branch on t, a clamp near an end. A path whose ends the fit resolves poorly (a VP "
          "schedule's bend near t=0) can give it on a few samples: raise disagree_share_warn."),
    rule("declared_prediction_mismatch", FAIL, "The target is not what the declared `prediction` means",
          "{label} is not {name}, what the declared prediction '{prediction}' means (median cos {cos}, norm ratio "
          "{ratio}); it resembles {best} (cos {best_cos})",
          "Either train the output toward {name} (prediction '{prediction}') or declare the prediction the loss "
          "trains (pipeline field 'prediction': 'velocity', 'epsilon' or 'sample'), so the sampler converts the "
          "right quantity.",
          _declared,
          "With the pipeline field `prediction` = 'epsilon' the target must be the source noise x0, with 'sample' "
          "the data x1: judged on the median cosine (cos_warn, cos_fail) and norm ratio (norm_ratio_warn, "
          "norm_ratio_fail) against that quantity. Fires when either fails; the message names what it resembles."),
    rule("negative_weighting", FAIL, "The loss weight is negative for some samples",
          "the loss weight is negative for {share} of the samples (implied k_i from the loss gradient): the loss "
          "trains the output away from its target there", NEGATIVE_WEIGHT_FIX, _negative_weighting,
          "The loss gradient at two probes of the velocity module's output gives, per sample, the weight k_i of "
          "a weighted squared error. Any k_i < 0 fails: the loss maximises the error there (a weighting formula "
          "with the wrong sign, log(sigma / (1 - sigma)) as a weight). A correct loss never gives it."),
    rule("xt_off_span", FAIL, "x_t is not built from the returned x0 and x1 (extra noise, other samples)",
          "x_t is not a mix of the returned x0 and x1: {share} of ||x_t|| lies outside span(x0, x1)",
          "Build x_t from exactly the x0 and x1 you return (same samples, same order), with no extra noise term. "
          "If your path adds noise on purpose (torchcfm with sigma > 0, a Schrodinger bridge, a stochastic "
          "interpolant), return that noise as the step output 'noise' (torchcfm: return_noise=True): the check "
          "then fits its std s(t) and expects the target a'(t) x0 + b'(t) x1 + s'(t)/s(t) (x_t - mu_t).",
          _xt_off_span,
          "Per sample, x_t is regressed on (x0, x1) (and the returned `noise`, when there is one); the share of "
          "||x_t|| left outside that span warns above xt_residual_warn and fails above xt_residual_fail. A path "
          "with a noise term that the step does not return as `noise` gives it on correct code: return the noise."),
    rule("t_mismatch", FAIL, "x_t was not built with the t returned (t shifted, warped or shuffled after x_t)",
          "x_t does not follow t: the per-sample mix (a, b) of x0, x1 scatters {share} around any smooth a(t), b(t)",
          "Return the t that x_t was built with, one per sample, after any shift or warp of t (and the same t the "
          "velocity net receives).",
          _t_mismatch,
          "The per-sample mix (a_i, b_i) of x0 and x1 in x_t is fitted as smooth curves a(t), b(t); their RMS "
          "scatter around the curves, relative, warns above schedule_residual_warn and fails above "
          "schedule_residual_fail: x_t was built with another t than the one returned."),
    rule("path_not_fitted", WARN, "The path velocity could not be fitted (too little spread in t)",
          "path velocity not fitted: {reason}{extra}{described}",
          "Sample t per sample (t = torch.rand(B)), or yield more batches, so a(t) and b(t) can be fitted; with "
          "x_t = (1-t) x0 + t x1 the target must be 1.0 x1 - 1.0 x0.",
          _path_not_fitted,
          "An inconclusive audit: a(t) and b(t) need >= 3 distinct t values spanning >= 0.02 (up to max_batches "
          "batches are drawn for them). With one t for the whole run the target cannot be compared with the path "
          "velocity; the coefficients of v_target in x0, x1 are reported instead."),
    rule("path_not_audited", WARN, "The path could not be audited (step outputs of unexpected shapes)",
          "path not audited: {problem}",
          "Return x0, x1, x_t, v_target as (B, ...) tensors with the same number of values per sample, and t as one "
          "time per sample (shape (B,) or broadcastable like (B, 1, 1, 1)).",
          _path_not_audited,
          "An inconclusive audit: the path fit needs x0, x1, x_t (and v_target) as (B, ...) tensors with as many "
          "values per sample as x0, and t as one time per sample. The message says which output does not fit."),
    rule("unaudited", WARN, "The target is not audited (no v_target and no implied target)",
          "the step returns no 'v_target' and the loss's implied target could not be measured: the target is not "
          "audited",
          "Return 'v_target' (and 'v_pred'), or declare the pipeline field 'velocity' so the target can be read "
          "from the loss gradient.",
          _unaudited,
          "An inconclusive audit: the step returns no v_target and the implied-target audit could not run (an L1 "
          "or Huber loss, randomness that is not replayed, no velocity module found). Nothing says whether the "
          "target is right."),
    *GRADIENT_RULES,
)
