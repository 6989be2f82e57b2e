"""Check ``kl``: KL and logvar health of the text head's Gaussian q(z0 | text) = N(mu, diag(exp(logvar))).

The seed's fourth lesson: a Gaussian head with a KL to N(0, I) stalls or explodes when logvar is unbounded (sigma -> 0
makes the KL huge) or when the KL is at full weight from step 0. Measured here: logvar and sigma statistics, a stress
probe of the logvar bound, the user's ``kl`` against the analytic KL, the ``kl_weight`` warmup, the weighted KL
against ``fm_loss``, and posterior collapse.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from ._kl_math import BATCH_SUMMED  # torch-free constants; the maths is imported inside measure

WARMUP_FRACTIONS = (0.0, 0.01, 0.05, 0.10, 0.50)
FORMULA_RTOL = 1e-3  # relative agreement of the user's kl with a reduction of the analytic KL (float32 and up)
NOT_APPLICABLE = "no mu/logvar: the source is not a learned Gaussian, KL not applicable"
CLAMP_HINT = ("bound logvar before it is used: logvar = logvar.clamp(-6, 6), or smoothly, logvar = 6 * torch.tanh("
              "logvar / 6), and compute the KL from the bounded logvar")


class KLThresholds(Thresholds):
    logvar_bound: float = Field(
        20.0, description="largest |logvar| allowed, on the measured batches and under the stress probe (nats; "
                          "a clamp to [-6, 6] or 6 * tanh(logvar / 6) passes)")
    at_bound_warn: float = Field(
        0.5, description="share of logvar values sitting at the bound the stress probe found (within 1% of the "
                         "bound range) above which it warns: a hard clamp passes them no gradient")
    negative_kl_tolerance: float = Field(
        1e-6, description="a user kl below minus this fails (the KL of two Gaussians is never negative)")
    warmup_start_warn: float = Field(
        0.5, description="kl_weight at step 0 over the largest probed kl_weight above which it warns (no warmup)")
    balance_warn: float = Field(
        10.0, description="weighted KL (largest probed kl_weight x kl) and fm_loss more than this factor apart warns")
    balance_fail: float = Field(100.0, description="... and more than this factor apart fails")
    balance_informative_kl: float = Field(
        0.05, description="analytic KL per latent element (nats) below which a weighted KL much SMALLER than "
                          "fm_loss is not judged: the head still sits at the prior, as it does at initialisation")
    collapse_text_share: float = Field(
        1e-6, description="share of mu's energy that differs between the samples of a batch below which mu counts "
                          "as independent of the text (collapse warns)")


@dataclasses.dataclass
class Finding:
    verdict: Verdict
    text: str
    fix: Optional[str] = None


class KLCheck(Check):
    id = "kl"
    title = "KL and logvar health"
    purpose = ("Gaussian text head: logvar bounded (stress probe), kl formula vs analytic KL, kl_weight warmup, "
               "KL/FM balance, posterior collapse")
    order = 40
    Thresholds = KLThresholds
    doc = CheckDoc(
        what=(
            "For a text head that outputs a Gaussian q(z0 | text) = N(mu, diag(exp(logvar))) trained with a KL to "
            "N(0, I), on the step outputs `mu`, `logvar`, `kl`, `kl_weight`, `fm_loss`:\n\n"
            "- **logvar health**: min, max, mean of logvar, sigma statistics, and the share of logvar values sitting "
            "at the bound (a hard clamp holding them passes no gradient).\n"
            "- **stress probe**: the module that produces mu/logvar is found from the step itself (forward hooks "
            "record which trainable module's output holds the step's mu and logvar values; a candidate counts when "
            "pushing its output changes logvar), whether it returns one tensor chunked later, a tuple, a dict or "
            "separate layers. For one step (no autograd) its output o is pushed to sign * (100 * o + 100), once "
            "with each sign, and the step's logvar must stay within +-`logvar_bound` and its `kl` finite. An "
            "untrained head has |logvar| ~ 0.1, so only this probe reveals a missing bound.\n"
            "- **formula**: the user's `kl` against the analytic KL = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) "
            "under every usual reduction (sum over latent dims then mean over the batch, mean over all elements, "
            "sum over everything, per channel, per sample, ...) times 1, 2 (a missing 1/2), -1 (a flipped sign): "
            "which one it is, on every measured batch, to 1e-3 relative. A negative `kl` fails.\n"
            "- **warmup**: `kl_weight` (a float or a 0-d tensor) read from the step at 0, 1%, 5%, 10% and 50% of "
            "`total_steps`.\n"
            "- **balance**: the weighted KL at the target weight (the largest probed `kl_weight`) against `fm_loss`.\n"
            "- **collapse**: whether mu differs between the captions of a batch at all (the share of mu's energy "
            "that varies across samples), with the between-caption variance of mu against the mean sigma^2 and the "
            "KL per element. Batches of one sample cannot show it: with no batch of two or more, collapse is "
            "reported as not measurable, without a verdict."
        ),
        why=(
            "Noise-free flow matching from a text head starts the flow at z0 ~ N(mu, sigma^2). If logvar is "
            "unbounded, the KL's -logvar term and the exp(logvar) term explode as soon as the head's outputs grow "
            "(sigma -> 0 makes the KL huge, sigma -> inf makes z0 meaningless), and the run stalls or diverges long "
            "after the pre-flight looked fine. A KL at full weight from step 0 crushes the head onto the prior "
            "before the flow has learned anything; a KL term whose normalisation does not match the FM loss "
            "(summed over 16k latent dims against a per-element MSE) drowns the other term; a flipped sign rewards "
            "the head for moving AWAY from the prior; a head whose mu ignores the text makes z0 plain noise."
        ),
        bug_example=(
            "```python\n"
            "mu, logvar = head(q).chunk(2, dim=-1)          # no clamp\n"
            "z0 = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)\n"
            "kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum()   # sums over the batch too\n"
            "loss = fm_loss + 0.1 * kl                     # full weight from step 0\n"
            "```\n"
            "fmcheck reports: max |logvar| under the stress probe 130 (bound 20), kl = sum over everything "
            "(scales with batch size), kl_weight 0.1 at step 0 = 100% of target."
        ),
        fix=(
            "```python\n"
            "mu, logvar = head(q).chunk(2, dim=-1)\n"
            "logvar = logvar.clamp(-6, 6)                   # or 6 * torch.tanh(logvar / 6)\n"
            "kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).mean()   # same normalisation as the MSE\n"
            "beta = beta_max * min(1.0, step / (0.1 * total_steps))  # linear warmup over the first 10%\n"
            "loss = fm_loss + beta * kl\n"
            "```"
        ),
        causes=(
            "logvar used raw (no clamp, no smooth bound), or the clamp applied after the KL is computed",
            "KL written as 0.5 * (1 + logvar - mu^2 - exp(logvar)) without the leading minus (a negative KL)",
            "KL summed over the batch (`.sum()`) while the FM loss is a mean: the KL weight grows with the batch size",
            "the KL weight read from a config at its final value from step 0; a warmup keyed on epochs that never "
            "advance",
            "the head fed a constant (a padding token, a detached zero tensor, the batch mean of the text "
            "embeddings) so mu is the same for every caption",
        ),
        blind_spots=(
            "The probe pushes a trainable module's OUTPUT: a logvar that is a free nn.Parameter, or computed "
            "outside the trainable modules, is not probed (the check warns that it could not locate the module).",
            "A bound wider than `logvar_bound` (e.g. logvar = 0.01 * raw) can pass if the pushed values stay inside "
            "it; the probe moves raw outputs to about +-100.",
            "The step's returned `logvar` is taken to be the one training uses: a pipeline that returns the raw "
            "logvar but clamps a copy internally reads as unbounded.",
            "A Monte Carlo KL estimate, a free-bits floor, or a KL to a non-standard prior matches none of the "
            "analytic reductions (warns with the closest one and the ratio).",
            "At initialisation the head sits at the prior (KL ~ 0.001 nats per element), so a weighted KL much "
            "smaller than fm_loss is only judged once the KL per element exceeds `balance_informative_kl`.",
            "Collapse means mu identical for every caption of a batch: a head whose mu depends on the text only "
            "weakly is not flagged, a batch whose captions are all the same is; a zero-initialised head (mu exactly "
            "0 with a gradient path) is reported, not flagged.",
            "Without `total_steps` the warmup is not probed; without `kl_weight` neither warmup nor balance is "
            "judged.",
        ),
    )

    # ------------------------------------------------------------------------------------------------ measure
    def measure(self, ctx) -> dict[str, Any]:
        import torch

        from . import _kl_math as km
        from . import _kl_probe as kp

        first = ctx.outputs(0)
        missing = first.missing(("mu", "logvar"))
        if len(missing) == 2:
            raise Skip(NOT_APPLICABLE)
        if missing:
            present = "mu" if missing[0] == "logvar" else "logvar"
            raise Skip(f"step output has '{present}' but no '{missing[0]}': cannot form the Gaussian N(mu, "
                       "exp(logvar)); return both")
        outputs = ctx.all_outputs()
        mus = [o.tensor("mu") for o in outputs]
        logvars = []
        for o, mu in zip(outputs, mus):
            lv = o.tensor("logvar")
            try:
                lv = torch.broadcast_to(lv, mu.shape)
            except RuntimeError:
                raise Skip(f"step outputs 'mu' {tuple(mu.shape)} and 'logvar' {tuple(lv.shape)} have shapes that "
                           "do not broadcast") from None
            logvars.append(lv)
        ctx.progress(1, 5, part="posterior")
        posterior = km.posterior_stats(mus, logvars)
        if posterior["mu_energy"] == 0.0:
            graph = ctx.run_step(ctx.batches(1)[0], 0, grad=True)
            posterior["mu_has_grad_path"] = bool(getattr(graph["mu"], "requires_grad", False))
            del graph

        observation: dict[str, Any] = {"posterior": posterior}

        # -- the user's kl against the analytic KL
        elements = [km.kl_elements(mu, lv) for mu, lv in zip(mus, logvars)]
        if "kl" in first:
            user_kls = [o.tensor("kl").detach() for o in outputs]
            # a kl computed in float16 / bfloat16 is only as exact as its rounding allows
            dtypes = [t.dtype for t in (*mus, *logvars, *user_kls) if t.is_floating_point()]
            eps = max(torch.finfo(d).eps for d in dtypes) if dtypes else torch.finfo(torch.float32).eps
            batch_rtols = [km.rounding_rtol(mu, lv, eps) for mu, lv in zip(mus, logvars)]
            match = km.match_formula(user_kls, elements, rtol=FORMULA_RTOL, batch_rtols=batch_rtols)
            flat = torch.cat([k.double().flatten().cpu() for k in user_kls])
            observation["formula"] = dataclasses.asdict(match)
            observation["kl_user_min"] = float(flat.min())
            observation["kl_user_mean"] = float(torch.stack([k.double().mean().cpu() for k in user_kls]).mean())
            observation["kl_user_finite"] = bool(torch.isfinite(flat).all())
            if all(k in first for k in ("v_pred", "v_target", "fm_loss")):
                squared = [(o.tensor("v_pred").double() - o.tensor("v_target").double()).pow(2) for o in outputs]
                fm_match = km.match_formula([o.tensor("fm_loss").detach() for o in outputs], squared)
                observation["fm_reduction"] = fm_match.reduction if fm_match.factor == 1.0 else None
        if "fm_loss" in first:
            observation["fm_loss_mean"] = sum(o.number("fm_loss") for o in outputs) / len(outputs)

        # -- stress probe
        ctx.progress(2, 5, part="stress probe")
        batch0 = ctx.batches(1)[0]
        stress = kp.stress_probe(lambda: ctx.run_step(batch0, 0, grad=False), ctx.pipeline.trainable_modules(),
                                 first.tensor("mu"), first.tensor("logvar"))
        observation["stress"] = dataclasses.asdict(stress)
        observation["stress"]["logvar_max_abs"] = stress.logvar_max_abs
        observation["stress"]["kl_finite"] = stress.kl_finite
        if stress.runs and stress.raised is None and math.isfinite(stress.logvar_max_abs):
            low = min(r.logvar_min for r in stress.runs)
            high = max(r.logvar_max for r in stress.runs)
            observation["stress"]["bound"] = [low, high]
            if high > low:
                observation["at_bound_share"] = km.share_at_bounds(logvars, low, high)

        # -- warmup schedule
        ctx.progress(3, 5, part="warmup")
        total = ctx.pipeline.total_steps
        if "kl_weight" in first:
            weights: list[tuple[int, float, float]] = [(0, 0.0, first.number("kl_weight"))]
            note = None
            if total:
                for fraction in WARMUP_FRACTIONS[1:]:
                    step_index = int(round(fraction * total))
                    if step_index in [s for s, _, _ in weights]:
                        continue
                    probed = ctx.run_step(batch0, step_index, grad=False)
                    if "kl_weight" not in probed:
                        note = f"{probed.where} returned no 'kl_weight' although step 0 did"
                        break
                    weights.append((step_index, fraction, probed.number("kl_weight")))
            observation["warmup"] = {"total_steps": total, "weights": weights, "note": note}
        ctx.progress(5, 5, part="done")
        return observation

    # -------------------------------------------------------------------------------------------------- judge
    def judge(self, observation: dict[str, Any], thresholds: KLThresholds) -> Judgement:
        ms: list[Measurement] = []
        findings: list[Finding] = []
        post = observation["posterior"]
        bound = thresholds.logvar_bound

        # -- logvar health
        ms.append(info("logvar min", post["logvar_min"], "nats"))
        ms.append(info("logvar max", post["logvar_max"], "nats"))
        ms.append(info("logvar mean", post["logvar_mean"], "nats"))
        ms.append(info("sigma min / mean / max",
                       f"{post['sigma_min']:.4g} / {post['sigma_mean']:.4g} / {post['sigma_max']:.4g}"))
        now_abs = max(abs(post["logvar_min"]), abs(post["logvar_max"])) if post["logvar_finite"] else math.inf
        m = at_most("max |logvar| on the measured batches", now_abs, warn=None, fail=bound, unit="nats")
        ms.append(m)
        if m.verdict is not Verdict.PASS:
            findings.append(Finding(Verdict.FAIL, f"logvar already reaches |logvar| = {now_abs:.4g} (bound {bound:g})",
                                    CLAMP_HINT))

        # -- formula
        self._judge_formula(observation, thresholds, ms, findings)
        # -- stress probe
        stress = observation["stress"]
        if stress["located"] is None:
            ms.append(flag("stress probe: module producing logvar located", False, value="none", bad=Verdict.WARN,
                           expected="a trainable module whose output feeds logvar"))
            findings.append(Finding(
                Verdict.WARN, f"stress probe not run: {stress['reason']}",
                "return mu/logvar computed from a trainable module's output (e.g. the module 'head'), so the "
                "logvar bound can be probed"))
        else:
            ms.append(info("stress probe: module pushed", f"{stress['located']} ({stress['why']})"))
            ms.append(info("stress probe: push", f"o -> +-({stress['factor']:g} * o + {stress['shift']:g})"))
            if stress["raised"] is not None:
                ms.append(flag("stress probe: step completes", False, value=stress["raised"], bad=Verdict.WARN))
                findings.append(Finding(
                    Verdict.WARN, f"the step raised under the stress probe ({stress['raised']})",
                    "a step that raises when the head's outputs grow has no numeric bound on logvar; " + CLAMP_HINT))
            if stress["runs"]:
                max_abs = stress["logvar_max_abs"]
                m = at_most("max |logvar| under the stress probe", max_abs, warn=None, fail=bound, unit="nats")
                ms.append(m)
                if "bound" in stress:
                    low, high = stress["bound"]
                    ms.append(info("logvar range under the stress probe", f"[{low:.4g}, {high:.4g}]", "nats"))
                if m.verdict is not Verdict.PASS:
                    findings.append(Finding(
                        Verdict.FAIL,
                        f"logvar is unbounded: pushing {stress['located']} drives |logvar| to {max_abs:.4g} "
                        f"(bound {bound:g})", CLAMP_HINT))
                kl_ok = stress["kl_finite"]
                stressed_kls = [r["kl"] for r in stress["runs"] if r["kl"] is not None]
                ms.append(flag("KL finite under the stress probe", kl_ok,
                               value=", ".join(f"{k:.4g}" for k in stressed_kls) if stressed_kls else kl_ok,
                               expected="finite"))
                if not kl_ok:
                    findings.append(Finding(Verdict.FAIL, "the KL becomes non-finite under the stress probe",
                                            CLAMP_HINT))
        if "at_bound_share" in observation and stress.get("logvar_max_abs", math.inf) <= bound:
            share = observation["at_bound_share"]
            m = at_most("share of logvar at the bound", share, warn=thresholds.at_bound_warn, fail=None)
            ms.append(m)
            if m.verdict is not Verdict.PASS:
                findings.append(Finding(
                    Verdict.WARN, f"{share:.0%} of logvar values sit at the bound",
                    "the clamp holds most logvars (no gradient through a hard clamp): check the KL weight and "
                    "what drives sigma to the bound, or use a smooth bound (6 * tanh(logvar / 6))"))

        # -- warmup and balance
        target_weight = self._judge_warmup(observation, thresholds, ms, findings)
        self._judge_balance(observation, thresholds, target_weight, ms, findings)
        # -- collapse
        self._judge_collapse(post, thresholds, ms, findings)

        return self._conclude(observation, ms, findings)

    def _judge_formula(self, obs, thresholds, ms, findings) -> None:
        if "formula" not in obs:
            ms.append(info("kl formula", "not checked: the step returns no 'kl'"))
            return
        match = obs["formula"]
        kl_min = obs["kl_user_min"]
        m = at_least("kl (user) minimum", kl_min, warn=None, fail=-thresholds.negative_kl_tolerance)
        ms.append(m)
        flipped = match["label"] in ("flipped sign", "flipped sign and missing 1/2") and not match["ambiguous"]
        if not obs["kl_user_finite"]:
            findings.append(Finding(Verdict.FAIL, "the step's kl is not finite",
                                    "compute the KL from a bounded logvar; " + CLAMP_HINT))
        elif m.verdict is Verdict.FAIL and not flipped:  # a flipped sign is reported below, with its formula
            findings.append(Finding(
                Verdict.FAIL, f"the step's kl is negative ({kl_min:.4g}); a KL is never negative",
                "KL(N(mu, sigma^2) || N(0, I)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar), summed or averaged; "
                "the common slip is -0.5 * (1 + logvar - mu^2 - exp(logvar)) without the leading minus"))
        if match["reduction"] is None:
            ratio = match["closest_ratio"]
            text = (f"kl matches no reduction of the analytic KL (closest: {match['closest']}, kl / analytic = "
                    f"{ratio:.4g}, tolerance {match['tolerance']:.2g})" if match["closest"] is not None and ratio is not None else
                    "kl matches no reduction of the analytic KL")
            ms.append(flag("kl formula vs analytic KL", False, value="no match", bad=Verdict.WARN,
                           expected="a reduction of 0.5 * (mu^2 + exp(logvar) - 1 - logvar)"))
            findings.append(Finding(
                Verdict.WARN, text,
                "compute kl = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) from the returned mu and logvar (a Monte "
                "Carlo estimate or free bits explain a mismatch; then this warning is expected)"))
            return
        reduction, label = match["reduction"], match["label"]
        precision = f" (to {match['tolerance']:.2%}: low-precision rounding)" if match["tolerance"] > FORMULA_RTOL \
            else ""
        if match["ambiguous"]:
            ms.append(info("kl formula vs analytic KL", f"{reduction}{precision}; the KL is too close to 0 for "
                                                        "its sign and 1/2 to be told apart"))
            return
        ok_text = f"{reduction} x {match['factor']:g} ({label}){precision}"
        if flipped:
            ms.append(flag("kl formula vs analytic KL", False, value=ok_text, expected="x 1 (correct)"))
            findings.append(Finding(
                Verdict.FAIL, f"kl has a flipped sign: kl = -{abs(match['factor']):g} x the analytic KL "
                              f"({reduction}), {kl_min:.4g} at its lowest",
                "kl = 0.5 * (mu^2 + exp(logvar) - 1 - logvar) (or -0.5 * (1 + logvar - mu^2 - exp(logvar))); "
                "a negative KL rewards the head for leaving the prior"))
        elif label == "missing 1/2":
            ms.append(flag("kl formula vs analytic KL", False, value=ok_text, bad=Verdict.WARN,
                           expected="x 1 (correct)"))
            findings.append(Finding(Verdict.WARN, f"kl is twice the analytic KL (missing 1/2; {reduction})",
                                    "multiply by 0.5: KL = 0.5 * (mu^2 + exp(logvar) - 1 - logvar)"))
        else:
            batch_summed = reduction in BATCH_SUMMED
            fm_summed = obs.get("fm_reduction") in BATCH_SUMMED
            if batch_summed and not fm_summed:
                ms.append(flag("kl formula vs analytic KL", False, value=ok_text, bad=Verdict.WARN,
                               expected="averaged over the batch"))
                findings.append(Finding(
                    Verdict.WARN, f"kl sums over the batch ({reduction}) while fm_loss does not: the KL's weight "
                                  "grows with the batch size",
                    "average the KL over the batch: .sum(dims).mean() or .mean()"))
            else:
                ms.append(flag("kl formula vs analytic KL", True, value=ok_text, expected="x 1 (correct)"))
        if obs.get("fm_reduction"):
            ms.append(info("fm_loss normalisation", obs["fm_reduction"]))

    def _judge_warmup(self, obs, thresholds, ms, findings) -> Optional[float]:
        warm = obs.get("warmup")
        if warm is None:
            ms.append(info("kl_weight schedule", "not probed: the step returns no 'kl_weight'"))
            return None
        weights = warm["weights"]
        if warm.get("note"):
            ms.append(info("kl_weight schedule", f"probing stopped: {warm['note']}"))
        for step_index, fraction, weight in weights:
            ms.append(info(f"kl_weight at step {step_index} ({fraction:.0%})", weight))
        values = [w for _, _, w in weights]
        listing = ", ".join(f"{w:.4g}@{s}" for s, _, w in weights)
        if not all(math.isfinite(w) for w in values):
            ms.append(flag("kl_weight finite", False, value=listing, expected="finite"))
            findings.append(Finding(Verdict.FAIL, f"kl_weight is not finite ({listing})", "fix the schedule"))
            return None
        low = min(values)
        m = at_least("kl_weight minimum", low, warn=None, fail=0.0)
        ms.append(m)
        if m.verdict is Verdict.FAIL:
            findings.append(Finding(Verdict.FAIL, f"kl_weight is negative ({listing})",
                                    "a negative weight rewards the head for leaving the prior; keep beta >= 0"))
        target = max(values)
        if warm["total_steps"] is None:
            ms.append(info("kl_weight warmup", "not probed: the pipeline has no total_steps"))
            return target if target > 0 else None
        if target <= 0:
            ms.append(flag("kl_weight reaches a positive value", False, value=listing, bad=Verdict.WARN))
            findings.append(Finding(Verdict.WARN, f"kl_weight is 0 at every probed step ({listing}): the KL is "
                                                  "never applied in the first half of the run",
                                    "ramp the KL weight from 0 to its target over the first ~10% of total_steps"))
            return None
        start = weights[0][2] / target
        m = at_most("kl_weight at step 0 / target", start, warn=thresholds.warmup_start_warn, fail=None)
        ms.append(m)
        full_at = next((f for _, f, w in weights if w >= 0.99 * target), None)
        if full_at is not None:
            ms.append(info("kl_weight reaches its target by", f"{full_at:.0%} of total_steps"))
        if m.verdict is not Verdict.PASS:
            constant = max(values) - min(values) <= 1e-12 * max(1.0, abs(target))
            text = (f"no KL warmup: kl_weight never changes ({listing})" if constant else
                    f"no KL warmup: kl_weight starts at {start:.0%} of its target ({listing})")
            findings.append(Finding(Verdict.WARN, text,
                                    "warm the KL weight up from 0: beta = beta_max * min(1, step / (0.1 * "
                                    "total_steps))"))
        return target

    def _judge_balance(self, obs, thresholds, target_weight, ms, findings) -> None:
        if target_weight is None or "kl_user_mean" not in obs or "fm_loss_mean" not in obs:
            ms.append(info("weighted KL / fm_loss", "not judged: needs 'kl', 'kl_weight' and 'fm_loss' outputs"))
            return
        fm = obs["fm_loss_mean"]
        weighted = abs(target_weight * obs["kl_user_mean"])
        if not (math.isfinite(weighted) and math.isfinite(fm)) or fm <= 0:
            ms.append(info("weighted KL / fm_loss", "not judged: non-finite or zero fm_loss"))
            return
        ratio = weighted / fm if weighted > 0 else 0.0
        kl_elem = obs["posterior"]["kl_per_element"]
        name = "weighted KL / fm_loss"
        ms.append(info("KL weight used (largest probed)", target_weight))
        if ratio < 1 and kl_elem < thresholds.balance_informative_kl:
            ms.append(info(name, ratio, "x", f"not judged below 1: KL {kl_elem:.3g} nats/element, the head is at "
                                                 "the prior"))
            return
        m = ratio_within(name, ratio, warn_factor=thresholds.balance_warn, fail_factor=thresholds.balance_fail)
        ms.append(m)
        if m.verdict is not Verdict.PASS:
            if ratio > 1:
                text = (f"the weighted KL is {ratio:.3g}x fm_loss: the KL term dominates and will crush the head "
                        "onto the prior")
                fix = ("match the normalisations (both means over elements, or both sums over latent dims) and "
                       "lower the KL weight")
            else:
                text = f"the weighted KL is {1 / ratio if ratio > 0 else math.inf:.3g}x smaller than fm_loss"
                fix = "raise the KL weight or match the KL's normalisation to the FM loss"
            findings.append(Finding(m.verdict, text, fix))

    def _judge_collapse(self, post, thresholds, ms, findings) -> None:
        ms.append(info("KL per element (analytic)", post["kl_per_element"], "nats"))
        if post.get("multi_sample_batches", 1):
            ms.append(info("between-caption var(mu) / mean sigma^2", post["text_signal_ratio"]))
        if post["mu_energy"] == 0.0:
            has_path = post.get("mu_has_grad_path", False)
            ms.append(flag("mu depends on the text", has_path, value="mu = 0 exactly", bad=Verdict.WARN,
                           expected="a gradient path from mu to the trainable modules"))
            if not has_path:
                findings.append(Finding(
                    Verdict.WARN, "collapsed source: mu is exactly 0 for every sample and has no gradient path",
                    "compute mu from the text embedding through the trainable head"))
            return
        if not post.get("multi_sample_batches", 1):
            # One sample per batch: mu cannot vary between captions within a batch, so a share of 0 is no evidence
            # of collapse. No verdict; say what would settle it.
            ms.append(info("share of mu varying between captions", "not measurable", "",
                           f"every measured batch has {post.get('largest_batch', 1)} sample: a batch of two or more "
                           "captions would measure it"))
            return
        share = post["text_share"]
        m = at_least("share of mu varying between captions", share, warn=thresholds.collapse_text_share, fail=None)
        ms.append(m)
        if m.verdict is not Verdict.PASS:
            near_zero = "KL ~ 0 and " if post["kl_per_element"] < 0.01 else ""
            findings.append(Finding(
                Verdict.WARN,
                f"posterior collapse: {near_zero}mu is the same for every caption of a batch (between-caption "
                f"share {share:.3g}, KL {post['kl_per_element']:.3g} nats/element)",
                "feed the head the per-sample text embedding (not a constant, a padding token or a batch mean); "
                "if the head was trained, lower the KL weight or lengthen its warmup"))

    def _conclude(self, obs, ms, findings) -> Judgement:
        post = obs["posterior"]
        bad = sorted((f for f in findings if f.verdict is not Verdict.PASS), key=lambda f: -f.verdict.severity)
        details = {"stress": obs["stress"], "formula": obs.get("formula"), "warmup": obs.get("warmup")}
        if bad:
            summary = "; ".join(f.text for f in bad[:2]) + (f" (+{len(bad) - 2} more)" if len(bad) > 2 else "")
            hint = " | ".join(dict.fromkeys(f.fix for f in bad if f.fix))
            return Judgement(measurements=ms, summary=summary, hint=hint, details=details)
        parts = [f"logvar in [{post['logvar_min']:.3g}, {post['logvar_max']:.3g}]"]
        stress = obs["stress"]
        if stress.get("runs"):
            parts.append(f"bounded under stress (max |logvar| {stress['logvar_max_abs']:.3g})")
        if obs.get("formula", {}).get("reduction"):
            parts.append(f"kl = {obs['formula']['reduction']} ({obs['formula']['label']})")
        warm = obs.get("warmup")
        if warm and warm["total_steps"]:
            parts.append("kl_weight " + " -> ".join(f"{w:.3g}" for _, _, w in warm["weights"]))
        return Judgement(measurements=ms, summary="; ".join(parts), details=details)
