"""Pure maths of the ``kl`` check: the analytic KL of a diagonal Gaussian against N(0, I), the ways training code
reduces it to a number, which of those ways a user's ``kl`` is, and posterior statistics.

Everything takes tensors and returns tensors or plain Python data; nothing here runs the user's code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# Factors a hand-written KL may carry relative to the analytic one, in the order they are preferred when several
# explain the number equally well (a KL of exactly 0 is explained by every factor).
FACTORS: tuple[tuple[float, str], ...] = (
    (1.0, "correct"),
    (2.0, "missing 1/2"),
    (-1.0, "flipped sign"),
    (-2.0, "flipped sign and missing 1/2"),
)

# Reductions whose value scales with the batch size (the KL's effective weight then changes with the batch size).
BATCH_SUMMED = ("sum over everything", "mean over latent dims, sum over batch")


def kl_elements(mu, logvar):
    """Per-element analytic KL(N(mu, exp(logvar)) || N(0, 1)) = 0.5 * (mu^2 + exp(logvar) - 1 - logvar), float64."""
    mu = mu.detach().double()
    logvar = logvar.detach().double()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def reductions(elements) -> dict[str, Any]:
    """The ways training code turns per-element KL of shape (B, ...) into its ``kl``: name -> tensor.

    Scalars for the usual reductions; per-sample vectors (shape (B,)) for a ``kl`` returned per sample.
    """
    per = elements if elements.dim() >= 2 else elements.reshape(elements.shape[0], 1)
    flat = per.flatten(1)
    out = {
        "sum over latent dims, mean over batch": flat.sum(1).mean(),
        "mean over all elements": flat.mean(),
        "sum over everything": flat.sum(),
        "mean over latent dims, sum over batch": flat.mean(1).sum(),
    }
    if per.dim() >= 3:
        out["sum over dims 2.., mean over batch and dim 1"] = per.flatten(2).sum(2).mean()
        out["sum over the last dim, mean over the others"] = per.sum(-1).mean()
    out["per sample: sum over latent dims"] = flat.sum(1)
    out["per sample: mean over latent dims"] = flat.mean(1)
    return out


@dataclass
class FormulaMatch:
    """How a user's ``kl`` relates to the analytic KL over one or more batches."""

    reduction: Optional[str]  # None: no candidate matches
    factor: Optional[float]
    label: Optional[str]  # "correct", "missing 1/2", ...
    rel_error: float  # worst relative error of the chosen candidate over the batches, in units of the tolerance
    ambiguous: bool  # both signs fit (the KL is ~0): the sign and the 1/2 cannot be told apart
    tolerance: float = 0.0  # the largest relative tolerance used (rtol, or the rounding error of a low precision)
    closest: Optional[str] = None  # for no match: the reduction whose value is nearest in log ratio
    closest_ratio: Optional[float] = None  # user kl / that reduction (mean over batches)
    matches: list[str] = field(default_factory=list)


def rounding_rtol(mu, logvar, eps: float) -> float:
    """The relative error with which a KL summed from per-element terms computed at precision ``eps`` (the machine
    epsilon of the user's dtype) reproduces the exact KL: four standard deviations of independent rounding errors of
    the terms mu^2, exp(logvar), 1 and logvar, over the KL itself. The KL near the prior is a small difference of
    terms near 1 (exp(logvar) - 1 - logvar), so in float16 or bfloat16 it is only good to a few percent."""
    mu = mu.detach().double()
    logvar = logvar.detach().double()
    terms = 0.5 * (mu.pow(2) + logvar.exp() + 1.0 + logvar.abs())
    total = kl_elements(mu, logvar).sum().abs()
    noise = 4.0 * eps * terms.pow(2).sum().sqrt() / total if float(total) > 0 else math.inf
    return float(noise)


def match_formula(user_kls: Sequence[Any], element_batches: Sequence[Any], rtol: float = 1e-3,
                  atol: float = 1e-7, batch_rtols: Optional[Sequence[float]] = None) -> FormulaMatch:
    """Which reduction x factor of the analytic KL reproduces the user's ``kl`` on every batch (within ``rtol``, or
    within ``batch_rtols[i]`` on batch i where that is larger: see ``rounding_rtol``).

    ``user_kls[i]`` is the user's ``kl`` on batch i (a number, a 0-d tensor or a per-sample tensor) and
    ``element_batches[i]`` the per-element analytic KL of that batch (``kl_elements``). A candidate is considered
    only where its shape fits the user's ``kl`` on every batch. Errors are reported relative to each batch's
    tolerance (``rel_error`` <= 1 means a match).
    """
    import torch

    if not user_kls or len(user_kls) != len(element_batches):
        raise ValueError("match_formula needs one user kl per batch of analytic KL elements")
    errors: dict[tuple[str, float], list[float]] = {}
    ratios: dict[str, list[float]] = {}
    names: list[str] = []
    tolerances = [max(rtol, b) for b in batch_rtols] if batch_rtols is not None else [rtol] * len(user_kls)
    for user, elements, tol in zip(user_kls, element_batches, tolerances):
        user_t = torch.as_tensor(user).detach().double().cpu().flatten()
        for name, value in reductions(elements).items():
            if name not in names:
                names.append(name)
            cand = value.detach().double().cpu().flatten()
            if cand.numel() != user_t.numel():
                continue
            for factor, _ in FACTORS:
                scaled = factor * cand
                err = float(((user_t - scaled).abs() / (scaled.abs() + atol)).max()) / tol
                errors.setdefault((name, factor), []).append(err)
            denom = float(cand.sum())
            ratios.setdefault(name, []).append(float(user_t.sum()) / denom if denom != 0 else math.inf)
    worst = {key: max(errs) for key, errs in errors.items() if len(errs) == len(user_kls)}
    fitting = [key for key, err in worst.items() if err <= 1.0]
    labels = dict(FACTORS)
    if fitting:
        factor_rank = {f: i for i, (f, _) in enumerate(FACTORS)}
        fitting.sort(key=lambda k: (factor_rank[k[1]], names.index(k[0])))
        name, factor = fitting[0]
        return FormulaMatch(reduction=name, factor=factor, label=labels[factor], rel_error=worst[(name, factor)],
                            ambiguous=any(f * factor < 0 for _, f in fitting) or max(tolerances) > 0.3,
                            tolerance=max(tolerances),
                            matches=[f"{n} x {f:g}" for n, f in fitting])
    closest, closest_ratio, best = None, None, math.inf
    for name, values in ratios.items():
        if len(values) != len(user_kls):
            continue
        ratio = sum(values) / len(values)
        distance = abs(math.log(abs(ratio))) if ratio != 0 and math.isfinite(ratio) else math.inf
        if distance < best or closest is None:
            best, closest, closest_ratio = distance, name, ratio
    return FormulaMatch(reduction=None, factor=None, label=None,
                        rel_error=min(worst.values()) if worst else math.inf, ambiguous=False, closest=closest,
                        closest_ratio=closest_ratio, tolerance=max(tolerances))


def posterior_stats(mus: Sequence[Any], logvars: Sequence[Any]) -> dict[str, float]:
    """Statistics of q(z0 | text) over batches (each (B, ...)): logvar and sigma ranges, the analytic KL, and how
    much mu varies between the samples (captions) of a batch.

    ``mu_between_var``: the variance of mu across the samples of each batch (mean over latent dimensions, then over
    batches): 0 when every caption gets the same mu. ``text_share``: that variance over the mean of mu^2, the share
    of mu's energy that differs between captions (scale-free). ``text_signal_ratio``: that variance over the mean
    sigma^2, how far apart two captions' posteriors are in units of their own spread. ``multi_sample_batches``: how
    many batches had two or more samples; with none, the between-caption statistics are 0 by construction and say
    nothing about collapse.
    """
    import torch

    flat_mu = [m.detach().double().flatten(1) for m in mus]
    flat_lv = [torch.broadcast_to(lv.detach().double(), m.shape).flatten(1) for m, lv in zip(mus, logvars)]
    mu = torch.cat([m.flatten() for m in flat_mu])  # 1-D: batches may differ in latent shape
    logvar = torch.cat([lv.flatten() for lv in flat_lv])
    spread = [m.var(dim=0, unbiased=False).mean() for m in flat_mu if m.shape[0] > 1]
    between = torch.stack(spread).mean() if spread else torch.zeros((), dtype=torch.float64)
    per_sample = torch.cat([kl_elements(m, lv).sum(1) for m, lv in zip(flat_mu, flat_lv)])
    sigma = (0.5 * logvar).exp()
    finite = torch.isfinite(logvar)
    shown = torch.where(finite, logvar, torch.zeros_like(logvar))
    spread_lv = shown.std() if shown.numel() > 1 else torch.zeros((), dtype=torch.float64)
    stats = torch.stack([
        shown.min(), shown.max(), shown.mean(), spread_lv, finite.all().double(), sigma.min(), sigma.max(),
        sigma.mean(), logvar.exp().mean(), mu.abs().max(), mu.pow(2).mean(), between, kl_elements(mu, logvar).mean(),
        per_sample.mean(),
    ]).cpu().tolist()
    names = ("logvar_min", "logvar_max", "logvar_mean", "logvar_std", "logvar_finite", "sigma_min", "sigma_max",
             "sigma_mean", "sigma2_mean", "mu_abs_max", "mu_energy", "mu_between_var", "kl_per_element",
             "kl_per_sample")
    out = dict(zip(names, stats))
    out["logvar_finite"] = bool(out["logvar_finite"])
    out["samples"] = sum(int(m.shape[0]) for m in flat_mu)
    # batches of two or more samples: only they can show mu varying between captions (a batch of one cannot)
    out["multi_sample_batches"] = len(spread)
    out["largest_batch"] = max(int(m.shape[0]) for m in flat_mu)
    out["latent_dims"] = int(flat_mu[0].shape[1])
    out["text_share"] = out["mu_between_var"] / out["mu_energy"] if out["mu_energy"] > 0 else 0.0
    out["text_signal_ratio"] = out["mu_between_var"] / out["sigma2_mean"] if out["sigma2_mean"] > 0 else math.inf
    return out


def share_at_bounds(logvars: Sequence[Any], low: float, high: float, rel: float = 0.01) -> float:
    """Share of logvar values within ``rel`` of the bound range from ``low`` or ``high`` (a clamp holding them)."""
    import torch

    logvar = torch.cat([lv.detach().double().flatten() for lv in logvars])
    margin = rel * max(high - low, 1e-12)
    at = (logvar <= low + margin) | (logvar >= high - margin)
    return float(at.double().mean())
