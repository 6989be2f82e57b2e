"""`target`: does the model learn the velocity of the user's own path, detached, with gradient where it belongs?

The audits, each in its own module:

- path: fit x_t = a(t) x0 + b(t) x1 (+ s(t) noise when the step returns its noise) per sample, then over t, and
  compare v_target with the path velocity (here; the maths in ``_path_fit.py``);
- implied target: what the loss trains the velocity module's raw output toward, and with what weight, from the loss
  gradient at two probes (``_target_implied.py``; a loss-only step's path in ``_target_inferred.py``);
- autograd: v_target must not reach trainable parameters (moving target); per loss term, which trainable and frozen
  modules receive gradient, and how much of it flows through x_t or through the target (``_target_autograd.py``);
- precision: x_t built in half precision, v_pred / v_target dtypes (here).

Judging is pure and lives in ``_target_judge.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
from fmcheck.judges import info
from fmcheck.verdict import Verdict

from ._target_autograd import _measure_autograd
from ._target_judge import _Findings, _judge_autograd, _judge_implied, _judge_path, _judge_precision

PATH_KEYS = ("x0", "x1", "t", "xt")  # v_target is optional: the implied audit infers it from the loss gradient
NOISE_TERM_MIN = 1e-6  # ||s_i noise_i|| / ||x_t|| above this: the returned 'noise' is a term of the path


class TargetThresholds(Thresholds):
    cos_warn: float = Field(0.99, ge=-1, le=1, description="median cos(v_target, path velocity) below this warns")
    cos_fail: float = Field(0.9, ge=-1, le=1, description="median cos(v_target, path velocity) below this fails")
    norm_ratio_warn: float = Field(1.1, ge=1, description="median ||v_target|| / ||path velocity|| outside "
                                                          "[1/x, x] warns")
    norm_ratio_fail: float = Field(1.25, ge=1, description="median ||v_target|| / ||path velocity|| outside "
                                                           "[1/x, x] fails (a mis-scaled target)")
    disagree_share_warn: float = Field(0.1, ge=0, le=1, description="share of samples with cos < cos_fail above "
                                                                    "this warns (a target wrong for some t only)")
    xt_residual_warn: float = Field(0.01, ge=0, description="share of ||x_t|| outside span(x0, x1) above this warns")
    xt_residual_fail: float = Field(0.05, ge=0, description="share of ||x_t|| outside span(x0, x1) above this fails "
                                                            "(extra noise, x_t from other x0/x1)")
    schedule_residual_warn: float = Field(0.02, ge=0, description="RMS scatter of the per-sample (a, b) around the "
                                                                  "fitted a(t), b(t), relative, above this warns")
    schedule_residual_fail: float = Field(0.1, ge=0, description="the same scatter above this fails (x_t was not "
                                                                 "built with the t returned)")
    max_batches: int = Field(16, ge=1, description="batches drawn at most while t has fewer than 8 distinct values")


# ---------------------------------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------------------------------
def _work(x):
    """float64 needs a device that has it (MPS does not)."""
    return x.cpu() if x.device.type == "mps" else x


def _gather_path(outputs: list) -> dict[str, Any]:
    """Pool x0, x1, xt, v_target, eps and per-sample t over the batches' cached outputs."""
    import torch

    from fmcheck.checks import _path_fit as pf

    parts: dict[str, list] = {k: [] for k in ("x0", "x1", "xt", "v_target", "eps", "noise", "t")}
    for out in outputs:
        missing = out.missing(PATH_KEYS)
        if missing:
            raise Skip(f"step output lacks {', '.join(repr(k) for k in missing)} (needed for the path fit)")
        x0 = out["x0"]
        if not isinstance(x0, torch.Tensor) or x0.dim() < 1:
            raise Skip("step output 'x0' is not a batched tensor (need shape (B, ...))")
        n = x0.shape[0]
        for key in ("x0", "x1", "xt", "v_target"):
            if key == "v_target" and key not in out:
                continue
            value = out[key]
            if not isinstance(value, torch.Tensor) or value.dim() < 1 or value.shape[0] != n:
                return {"problem": f"'{key}' is not a (B, ...) tensor with the batch size {n} of x0"}
            if value[0].numel() != x0[0].numel():
                return {"problem": f"'{key}' has {value[0].numel()} values per sample, x0 has {x0[0].numel()}"}
            parts[key].append(_work(value.detach()))
        t = pf.per_sample_t(out.tensor("t").detach().cpu(), n)
        if t is None:
            return {"problem": f"'t' of shape {tuple(out.tensor('t').shape)} is not one time per sample"}
        parts["t"].append(t)
        for key in ("eps", "noise"):  # the reparam noise; the path's own noise term (torchcfm's return_noise)
            extra = out.get(key)
            if isinstance(extra, torch.Tensor) and extra.dim() >= 1 and extra.shape[0] == n and \
                    extra[0].numel() == x0[0].numel():
                parts[key].append(_work(extra.detach()))
    pooled = {k: torch.cat([p.reshape(p.shape[0], -1) for p in v]) for k, v in parts.items()
              if v and k not in ("t", "eps", "noise", "v_target")}
    for key in ("eps", "noise", "v_target"):
        pooled[key] = torch.cat([p.reshape(p.shape[0], -1) for p in parts[key]]) \
            if len(parts[key]) == len(outputs) else None
    pooled["t"] = torch.cat(parts["t"]).numpy()
    return pooled


def _draw_for_spread(ctx, limit: int) -> tuple[list, int]:
    """Cached outputs of the first batches, more of them while t has too few distinct values."""
    import torch

    from fmcheck.checks import _path_fit as pf

    count = len(ctx.batches(ctx.settings.measure_batches))
    outputs = [ctx.outputs(i) for i in range(count)]
    while count < limit and ctx.time_left() > 10:
        times = [pf.per_sample_t(o.tensor("t").detach().cpu(), o["x0"].shape[0]) for o in outputs
                 if "t" in o and isinstance(o.get("x0"), torch.Tensor) and o["x0"].dim() >= 1]
        if not times or any(t is None for t in times):
            break
        values, _ = pf.normalise_time(torch.cat(times).cpu().numpy())
        if pf.spread_ok(values, pf.WANT_DISTINCT_T):
            break
        if len(ctx.batches(count + 1)) <= count:
            break
        outputs.append(ctx.outputs(count))
        count += 1
    return outputs, count


def _measure_path(ctx, limit: int, store: dict) -> dict[str, Any]:
    """The path audit on the pooled cached outputs; ``store["fit"]`` receives the ScheduleFit for the implied audit."""
    import numpy as np
    import torch

    from fmcheck.checks import _path_fit as pf

    initial = len(ctx.batches(ctx.settings.measure_batches))
    outputs, count = _draw_for_spread(ctx, max(limit, initial))
    pooled = _gather_path(outputs)
    obs: dict[str, Any] = {"batches": count, "extra_batches": count - initial}
    if "problem" in pooled:
        obs["problem"] = pooled["problem"]
        return obs
    x0, x1, xt, v, eps = pooled["x0"], pooled["x1"], pooled["xt"], pooled["v_target"], pooled["eps"]
    raw_t = pooled["t"]
    t, scale = pf.normalise_time(raw_t)
    obs.update(samples=int(x0.shape[0]), t_scale=scale, t_raw_max=float(np.max(raw_t)),
               t_raw_min=float(np.min(raw_t)))
    noise, noise_s = pooled["noise"], None
    samples = pf.fit_samples(x0, x1, xt)
    if noise is not None:
        with_noise = pf.fit_samples_with_noise(x0, x1, noise, xt)
        size = float((with_noise.s[:, None] * pf.flat(noise)).norm()) / max(float(pf.flat(xt).norm()), 1e-30)
        obs["noise_term"] = {"share": size, "residual_without": samples.relative_residual()}
        if size > NOISE_TERM_MIN:  # a returned noise that x_t actually carries: model it (else sigma = 0)
            samples, noise_s = with_noise.samples, with_noise.s
    # no reparam noise, no mu/logvar: the source is plain noise, and x0 is what a DDPM codebase calls eps
    obs["source_is_noise"] = eps is None and "mu" not in outputs[0] and "logvar" not in outputs[0]
    obs["v_target_returned"] = v is not None
    a, b, usable = (samples.a.cpu().numpy(), samples.b.cpu().numpy(), samples.usable.cpu().numpy())
    obs["usable_share"] = float(usable.mean())
    obs["xt_residual"] = samples.relative_residual()
    obs["v_combination"] = None
    if v is not None:
        combo = pf.fit_combination(v, x0, x1)
        c_med, d_med = (float(x) for x in torch.stack([combo.a.median(), combo.b.median()]).cpu().tolist())
        obs["v_combination"] = {"x0": c_med, "x1": d_med, "residual": combo.relative_residual()}
    count_t, width = pf.spread(t)
    obs["distinct_t"], obs["t_range"] = count_t, width
    # the data of the path figure (`--plot`): per-sample (t, a, b), then the fitted curves once there is a fit
    keep = _thin(int(usable.sum()))
    obs["schedule"] = {"t": t[usable][keep].tolist(), "a": a[usable][keep].tolist(), "b": b[usable][keep].tolist(),
                       "t_scale": scale}
    if usable.sum() < pf.MIN_DISTINCT_T:
        obs["fit"] = {"ok": False, "reason": "x0 and x1 are (nearly) parallel in almost every sample: the mix of "
                                             "x0 and x1 in x_t cannot be identified"}
        return obs
    fit = pf.fit_schedule(t[usable], a[usable], b[usable])
    obs["fit"] = {"ok": fit.ok, "reason": fit.reason}
    if not fit.ok:
        return obs
    store["fit"] = fit
    fa_lo, fb_lo = (float(v_[0]) for v_ in fit.values(np.array([fit.t_lo])))
    fa_hi, fb_hi = (float(v_[0]) for v_ in fit.values(np.array([fit.t_hi])))
    obs["fit"].update(residual=fit.residual, describe=fit.describe(), direction=pf.describe_direction(fit),
                      ends={"t": [fit.t_lo, fit.t_hi], "a": [fa_lo, fa_hi], "b": [fb_lo, fb_hi]})
    da, db = fit.derivatives(t)
    fa, _ = fit.values(t)
    device = x0.device
    da_t = torch.as_tensor(da, dtype=torch.float64, device=device)
    db_t = torch.as_tensor(db, dtype=torch.float64, device=device)
    expected = pf.expected_velocity(x0, x1, da_t, db_t)
    without_noise = None
    if noise_s is not None:
        log_slope, described = pf.noise_log_slope(t[usable], noise_s.cpu().numpy()[usable])
        store["noise_slope"] = log_slope
        term = torch.as_tensor(log_slope(t), dtype=torch.float64, device=device) * noise_s
        obs["noise_term"].update(describe=described, s_median=float(noise_s.abs().median()),
                                 log_slope_rms=float(np.sqrt(np.mean(log_slope(t) ** 2))))
        without_noise = expected
        expected = expected + term[:, None] * pf.flat(noise)
    grid = np.linspace(fit.t_lo, fit.t_hi, 101)
    (grid_a, grid_b), (grid_da, grid_db) = fit.values(grid), fit.derivatives(grid)
    obs["schedule"].update(grid={"t": grid.tolist(), "a": grid_a.tolist(), "b": grid_b.tolist(),
                                 "da": grid_da.tolist(), "db": grid_db.tolist()})
    obs["velocity_combination"] = {"x0": float(np.median(da)), "x1": float(np.median(db))}
    if v is None:
        return obs
    cos, ratio = pf.cosine_and_ratio(v, expected)
    finite = torch.isfinite(cos) & torch.isfinite(ratio)
    cos_f, ratio_f = cos[finite], ratio[finite]
    summary = torch.stack([cos_f.median(), ratio_f.median(), cos_f.quantile(0.05)]).cpu().tolist()
    obs["cos_median"], obs["ratio_median"], obs["cos_p05"] = (float(x) for x in summary)
    obs["cos_samples"] = [round(float(x), 5) for x in cos_f.cpu().tolist()]
    keep = _thin(len(obs["cos_samples"]))
    obs["schedule"]["cos"] = {"t": t[finite.cpu().numpy()][keep].tolist(),
                              "cos": np.asarray(obs["cos_samples"])[keep].tolist()}
    candidates = pf.candidate_targets(x0, x1, xt, expected, eps,
                                      torch.as_tensor(fa, dtype=torch.float64, device=device), without_noise)
    obs["candidates"] = [{"name": r.name, "cos": r.cos, "ratio": r.ratio} for r in pf.resemblances(v, candidates)]
    return obs


SCATTER_POINTS = 512  # per-sample points kept for the figure (the JSON report carries them)


def _thin(count: int) -> Any:
    """Evenly spaced indices of at most SCATTER_POINTS out of ``count``."""
    import numpy as np

    return np.unique(np.linspace(0, count - 1, min(count, SCATTER_POINTS)).round().astype(int)) if count else \
        np.zeros(0, dtype=int)


def _measure_precision(out) -> dict[str, Any]:
    import torch

    def dtype_of(key):
        value = out.get(key)
        return str(value.dtype) if isinstance(value, torch.Tensor) else None

    obs: dict[str, Any] = {"dtypes": {k: dtype_of(k) for k in ("x0", "x1", "xt", "v_target", "v_pred")}}
    shares = {}
    for key in ("x0", "x1", "xt"):
        value = out.get(key)
        if isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float64) and value.numel():
            x = value.detach()
            shares[key] = torch.stack([(x == x.to(half).to(x.dtype)).float().mean()
                                       for half in (torch.float16, torch.bfloat16)])
    host = {k: v.cpu().tolist() for k, v in shares.items()}
    obs["half_exact_share"] = {k: {"float16": v[0], "bfloat16": v[1]} for k, v in host.items()}
    return obs


class TargetCheck(Check):
    id = "target"
    title = "Target, detach and gradient paths"
    purpose = ("What the loss trains the velocity output toward (read from the loss gradient) is the velocity of "
               "the user's own path, with a positive weight; the target is detached; gradient reaches the right "
               "modules.")
    order = 30
    # x0, x1, t, xt are needed unless the step returns only its loss and declares its velocity module (then the
    # path is inferred in measure; a Skip names what is missing otherwise)
    Thresholds = TargetThresholds
    doc = CheckDoc(
        what=(
            "**Implied-target audit** (the primary verdict whenever the velocity module's raw output can be found: "
            "the pipeline field `velocity`, else the outermost trainable module called with the step's `xt`, "
            "found through forward hooks as `structure` does). The step's own labels can be in another "
            "parameterisation than the network's output, so the loss is asked instead. The step runs twice more "
            "on batch 0 with its randomness replayed (the same seed as the cached outputs); a forward hook "
            "replaces the module's output by a leaf tensor holding the output itself (raw), then raw + delta "
            "(delta: seeded Gaussian noise of the output's RMS). For a loss that is a per-sample weighted squared "
            "error of any affine function of the output (plain MSE, diffusers' `precondition_outputs`, any loss "
            "weighting) the gradient is g_i = k_i (raw_i - target_i), so per sample k_i = <g1 - g0, delta> / "
            "||delta||^2 is the implied loss weight and target_i = raw_i - g0_i / k_i the implied target. The "
            "implied target is compared with the fitted path velocity exactly as v_target is below (median cosine, "
            "norm ratio, the candidate it resembles); a negative k_i for any sample fails (the loss trains the "
            "output away from its target there); the weight's shape in t is reported (k / median k, a power law "
            "k ~ t^p (1 - t)^q when one fits) and drawn by `--plot` (`target-weight.png`). The audit is not used, "
            "and says why, when the two probes' raw outputs differ (randomness not replayed: a private generator "
            "that advances), when g1 - g0 misses k delta by more than 2% (an L1 or Huber loss, weights varying "
            "inside a sample), when the loss has no gradient to the output, or when the output's layout cannot be "
            "matched to x0 (Flux-style packed tokens are unpacked through the module's x_t input). If the module "
            "was only found by hooks, the step's `v_pred` is not its output and the step's `v_target` matches the "
            "path velocity while the implied target does not, the audits disagree and the verdict is at most WARN "
            "(declaring `velocity` settles it). With the implied audit deciding, the step's v_target comparison "
            "is reported as a cross-check (a preconditioned target, e.g. the latents, is expected there); a step "
            "that returns no `v_target` (nor `v_pred`: a loss module that keeps them as locals) is audited by the "
            "implied target alone, and warns that the target is not audited when that cannot run. A step that "
            "returns only `loss` with a declared `velocity` module is audited too, and the report lists what was "
            "inferred: x_t and t from the module's arguments (the argument shaped like its output; the only "
            "per-sample scalar), x1 from the pipeline's `encode` (seeded like the step), v_pred from its output, "
            "the target from the loss gradient, and the path from x_t and x1 alone: for a source independent of "
            "the data, B(t), a smooth fit of <x_t, x1> / ||x1||^2, is b(t), A(t), a fit of ||x_t - B(t) x1||, is "
            "a(t) up to a factor, and the path velocity is (A'/A)(x_t - B x1) + B' x1. The "
            "optional pipeline field `prediction` (`velocity`, the default; `epsilon`; `sample`) says what the "
            "output is meant to be: with `epsilon` the target must be the source noise x0, with `sample` the data "
            "x1.\n\n"
            "Worked example, diffusers' SD3 DreamBooth loss with `precondition_outputs`: x_t = (1 - sigma) x1 + "
            "sigma noise, model_pred = raw * (-sigma) + x_t, target = x1, so the loss is "
            "sigma^2 ||raw - (noise - x1)||^2: the raw output is trained toward noise - x1 = d x_t / d sigma, the "
            "path velocity, with weight sigma^2. `fmcheck target --module fixtures.bugs._target_sd3:build` (a "
            "one-layer SD3Transformer2DModel, logit-normal sigma, no weighting) reports `median cos(implied target, "
            "path velocity)` 1.0, norm ratio 1.0, `implied weight k(t) / median` ~ t^2.00 (spread 9.86x), and "
            "notes that the step's v_target (the latents) is a relabelled target (median cos -0.709 with the path "
            "velocity). With the `sigma_sqrt` weighting (sigma^-2) the implied weight is constant in t; with the "
            "wrong sign of sigma (`fixtures/libs/diffusers_sd3_precondition_wrong_sign.py`) the implied target "
            "has the flipped sign: median cos -1.000, FAIL.\n\n"
            "**Path audit** (cached outputs of the first `measure_batches` batches, pooled; more batches, up to "
            "`max_batches`, while t has fewer than 8 distinct values). Per sample, least squares of x_t on "
            "(x0, x1) gives the mix x_t ~ a_i x0 + b_i x1 and the residual: the share of ||x_t|| outside "
            "span(x0, x1) (`x_t off span(x0, x1)`). `t` is read as one time per sample ((B,), (B, 1, 1, 1), a "
            "scalar); a t above 1.5 is in timestep units (diffusers' 0..1000) and is divided by the next power of "
            "ten (999 -> 1000), reported, not warned about. Over the batch, a(t) and b(t) are fitted as smooth "
            "curves: Legendre polynomials of "
            "degree 1-12 in t (or in sqrt(t) / sqrt(1-t), which hold VP paths' square-root ends), the simplest "
            "whose leave-one-out error over the distinct t values is within 1.5x of the best. The scatter of the "
            "(a_i, b_i) around the curves (`(a, b) off the fitted a(t), b(t)`) shows whether x_t was built with "
            "the returned t. The expected velocity is d x_t / dt = a'(t) x0 + b'(t) x1; per sample, the cosine "
            "and the norm ratio ||v_target|| / ||a' x0 + b' x1|| are computed, judged on their medians, and the "
            "share of samples with cos < `cos_fail` is reported. A path with a noise term, x_t = a(t) x0 + b(t) x1 "
            "+ s(t) noise, is modelled when the step returns that noise as the output `noise` (torchcfm's "
            "`return_noise=True`): x_t is regressed per sample on (x0, x1, noise), s(t)^2 is fitted as a smooth "
            "curve and the path velocity gains the term s'(t)/s(t) (x_t - mu_t) (zero for torchcfm's constant "
            "sigma, (1 - 2t) / (2t (1 - t)) for the Schrodinger bridge); a target without a needed term fails as "
            "`a'(t) x0 + b'(t) x1 without the noise term`. Noise the step does not return stays in the span "
            "residual. A wrong candidate that matches the target at cos >= 0.999 turns a near-miss WARN into a "
            "FAIL. Nothing assumes a convention: linear, reversed "
            "(t=1 at the source), cosine/trig, VP and sigma_min paths all pass when the target is their "
            "derivative. When the target fails, it is compared with the usual wrong targets (x0 - x1, x1 - x0, "
            "x0, x1, eps, -eps, the score-like -x0/a(t), x_t, the scaled path velocity) and the summary says which "
            "it is. v_target is also expressed as c x0 + d x1 per sample (medians reported).\n\n"
            "**Detach and gradient paths** (one fresh forward of batch 0, step_index 0, with autograd). The "
            "autograd graph of v_target is walked to its leaves (AccumulateGrad nodes): any trainable parameter "
            "it reaches is a moving target and fails, by name. The roles come from the graph: the velocity net "
            "is the pipeline's `velocity` module (else the parameters v_pred reaches but x_t does not), the head "
            "the trainable parameters x0, mu or logvar reach. For each loss term (`fm_loss`, `kl`, `loss`), "
            "torch.autograd.grad gives the gradient norm of every trainable and frozen module; fm_loss's "
            "gradient is also split into the part through x_t and the part through v_target (the upstream "
            "gradient at those nodes pulled back to the parameters). Expected: fm_loss reaches the velocity net "
            "(else fail) and the head through x_t (else warn: the reparameterisation path is closed); nothing "
            "through v_target (else fail); kl reaches the head (else warn) and nothing else (else warn); no "
            "frozen parameter (the `frozen` modules and the `vae`) that requires grad receives any (else fail); "
            "with reentrant gradient checkpointing (torch.utils.checkpoint, use_reentrant=True), where "
            "torch.autograd.grad raises or silently skips the parameters inside, the gradients are taken with "
            "backward() and tensor hooks instead (and the parameters' .grad restored), and a note says so; "
            "every other trainable module gets some gradient (else warn). Without kl (plain N(0, I) source) the "
            "KL path is not audited and says so.\n\n"
            "**Precision** (batch 0). x_t in float16/bfloat16 while x0 and x1 are float32 warns; so does a float32 "
            "x_t whose values are (almost) all exact half-precision numbers when those of x0 and x1 are not "
            "(computed in half, cast back). A half-precision v_target next to float32 x0 warns; v_pred and "
            "v_target dtypes are reported when they differ. (Shapes that disagree are rejected before any check "
            "runs.)"
        ),
        why=(
            "The model learns whatever the target says. In noise-free flow matching the target is the velocity of "
            "the path, v* = d x_t / dt (x1 - x0 for the linear path, constant in t). An epsilon (DDPM) target, a "
            "score, x0 or x1, a flipped sign or an extra factor all still train (the loss falls) but the sampler, "
            "which integrates v from the source to the data, goes somewhere else. A target that is not detached "
            "moves: the head's gradient then also pulls z0 towards what the net predicts, and the head and KL "
            "collapse. Conversely the head must receive gradient through x_t via the reparameterised z0, or it is "
            "trained by the KL alone. Frozen modules (VAE, text encoder) that receive gradient waste memory and, "
            "with a careless optimizer, drift. An x_t built in half precision loses 3 significant digits of the "
            "interpolation that the velocity net must undo."
        ),
        bug_example=(
            "```python\n"
            "xt = (1 - t) * x0 + t * x1\n"
            "v_target = x0 - x1                      # flipped sign (the path's velocity is x1 - x0)\n"
            "v_target = eps                          # DDPM habit: predicts the noise\n"
            "v_target = x1 - x0                      # not detached: x0 carries the head's graph\n"
            "xt = (1 - t) * x0.detach() + t * x1     # reparam path closed: the head gets no FM gradient\n"
            "z1 = vae.encode(x).latent_dist.sample() # without torch.no_grad(), VAE not frozen\n"
            "model_pred = raw * sigmas + noisy       # SD3 precondition_outputs with the wrong sign (-sigmas)\n"
            "loss = (torch.log(sigmas / (1 - sigmas)) * (model_pred - target) ** 2).mean()  # negative weight\n"
            "```\n"
            "fmcheck reports, for the first: `v_target has the flipped sign (it is x0 - x1): median cos -1.000 with "
            "the path velocity`; for the third: `moving target: v_target carries autograd history into 6 trainable "
            "parameter(s) (head.layers.0.weight, ...)`."
        ),
        fix=(
            "v_target = d x_t / dt of your own path, detached: for x_t = (1-t) x0 + t x1, v_target = "
            "(x1 - x0).detach(); for t=1 at the source, (x0 - x1).detach(); for the cosine path, "
            "pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0). Keep x0 = mu + sigma * eps un-detached inside x_t so the head "
            "is trained through it. Freeze the VAE and text encoder (requires_grad_(False)) and encode under "
            "torch.no_grad(). Build x_t in float32 and cast afterwards. Return t in [0, 1] as the network sees it."
        ),
        causes=(
            "sign convention mixed up between papers (t=1 at the data vs at the noise)",
            "a DDPM/score codebase's target kept (eps, -eps/sigma, x0-prediction)",
            "a weighting folded into the target (0.5 (x1 - x0), sigma-scaled targets)",
            "missing .detach() on the target or on x0/x1 inside it",
            "z0 detached before x_t (or a no_grad region around the source sample)",
            "the VAE encode outside torch.no_grad() with its parameters not frozen",
            "x_t computed under an autocast region or from .half() tensors",
            "t warped (shifted, logit-normal) after x_t was built, or extra noise added to x_t",
            "precondition_outputs with the wrong sign of sigma, or a loss weighting that goes negative",
            "a stochastic path (Schrodinger bridge) trained on the plain x1 - x0 without its noise term",
        ),
        blind_spots=(
            "The path is identified from x0, x1 and x_t as returned: if the step returns other tensors than the "
            "ones the loss uses (e.g. a detached copy of a non-detached target), the audit sees the copies.",
            "Noise in x_t that the step does not return as `noise` fails the span residual even where it is a "
            "constant-std noise term whose target needs no extra term (torchcfm's sigma > 0 written without "
            "return_noise): nothing in (x0, x1, t, x_t) tells it from a stray term.",
            "A loss-only step's path is inferred from one batch with low-degree curves: exact for linear paths "
            "(rectified flow, SD3), approximate for trigonometric ones (a correct cosine path measured median cos "
            "0.92 on 32 samples of 64 values: WARN); a source correlated with the data (OT pairing) biases b(t).",
            "The implied-target audit assumes the velocity module's first call in the step is the one the loss "
            "trains (self-conditioning or a second call is noted, not audited) and a per-sample weighted squared "
            "error; other losses fall back to the step's v_target.",
            "A target deliberately expressed in another time variable (v-prediction w.r.t. phi = pi t / 2) is "
            "reported as mis-scaled: return that variable as t.",
            "Timestep units are normalised by the next power of ten above max(t) (1000 for 0..999). When t spans "
            "another range (0..500) and the path reaches its end inside it, a target that is right per t / 500 "
            "but not per t / 1000 warns with both readings instead of failing; where the path does not reach its "
            "end, the power of ten is used.",
            "The gradient map is taken at step_index 0 on one batch: a loss term switched on later (KL warmup) is "
            "still audited through its unweighted `kl` output; behaviour that changes with the step is not.",
        ),
    )

    def measure(self, ctx) -> dict[str, Any]:
        limits = self.Thresholds(**ctx.settings.thresholds.get(self.id, {}))
        from fmcheck.checks import _target_implied as ti

        store: dict[str, Any] = {}
        try:
            path = _measure_path(ctx, limits.max_batches, store)
        except Skip as missing:
            if ctx.pipeline.velocity is None:
                raise
            # a step that returns only its loss: the path is inferred around the declared velocity module
            implied = ti.measure_implied(ctx, store, None)
            if not implied.get("compared"):
                raise Skip(f"{missing}; the path could not be inferred around the velocity module either: "
                           f"{implied.get('not_compared') or implied.get('reason')}") from None
            path = {"inferred": True, "fit": {"ok": True, "direction": implied["direction"],
                                              "describe": implied["describe"]},
                    "source_is_noise": True}
        path["prediction"] = ctx.pipeline.prediction
        if not path.get("inferred"):
            implied = ti.measure_implied(ctx, store, path.get("t_scale"))
        precision = _measure_precision(ctx.outputs(0))
        autograd = _measure_autograd(ctx)
        return {"path": path, "implied": implied, "precision": precision, "autograd": autograd}

    def judge(self, obs: dict[str, Any], th: TargetThresholds) -> Judgement:
        out = _Findings()
        implied = obs.get("implied", {"ok": False, "reason": "not run"})
        decided = "problem" not in obs["path"] and _judge_implied(implied, obs["path"], th, out)
        if obs["path"].get("inferred"):
            out.add(info("values inferred", "; ".join(implied["inferred"]),
                         expected="the step returns only 'loss': these come from the velocity module and encode"))
            out.add(info("path (inferred)", f"{implied['describe']}; {implied['direction']}"))
        else:
            _judge_path(obs["path"], th, out, primary=not decided)
        _judge_autograd(obs["autograd"], out)
        _judge_precision(obs["precision"], out)
        path = {k: v for k, v in obs["path"].items() if k != "cos_samples"}
        if "schedule" in path:
            path["schedule"] = {**path["schedule"], "guides": {"cos": [[th.cos_warn, "warn"], [th.cos_fail, "fail"]]}}
        details = {
            "path": path,
            "implied": {k: v for k, v in implied.items() if k != "cos_samples"},
            "gradients": obs["autograd"]["grads"],
            "roles": obs["autograd"]["roles"],
            "moving_target": obs["autograd"]["moving_target"],
            "target_reaches_frozen": obs["autograd"]["target_reaches_frozen"],
            "x1_reaches": obs["autograd"]["x1_reaches"][:20],
            "precision": obs["precision"],
        }
        judgement = Judgement(measurements=out.measurements, summary="", details=details)
        verdict = judgement.final_verdict()
        issues = sorted(out.issues, key=lambda i: -i[0].severity)
        if verdict is Verdict.PASS or not issues:
            judgement.summary = "; ".join(out.good) or "target, detach and gradient paths as expected"
            return judgement
        worst = [i for i in issues if i[0] is issues[0][0]]
        summary = worst[0][1]
        if len(issues) > 1:
            summary += f" (+{len(issues) - 1} more: " + "; ".join(i[1] for i in issues[1:3])
            summary += "; ...)" if len(issues) > 3 else ")"
        judgement.summary = summary
        hints = []
        for _, _, fix in issues:
            if fix and fix not in hints:
                hints.append(fix)
        judgement.hint = " | ".join(hints)
        return judgement
