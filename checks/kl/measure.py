"""Measurement for the ``kl`` check: the I/O with the user's step (outputs, the stress probe, the kl_weight
schedule). Returns plain data; judging is in ``rules``."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from fmcheck.api import Skip

WARMUP_FRACTIONS = (0.0, 0.01, 0.05, 0.10, 0.50)
FORMULA_RTOL = 1e-3  # relative agreement of the user's kl with a reduction of the analytic KL (float32 and up)
NOT_APPLICABLE = "no mu/logvar: the source is not a learned Gaussian, KL not applicable"


def measure(ctx) -> dict[str, Any]:
    import torch

    from . import maths as km
    from . import probe as kp

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
