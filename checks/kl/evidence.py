"""The ``kl`` check's thresholds and typed evidence, built from the observation ``measure`` returns. Pure: no
torch, no user code."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Thresholds
from fmcheck.verdict import Verdict

from .maths import BATCH_SUMMED  # torch-free constants

FLIPPED = ("flipped sign", "flipped sign and missing 1/2")


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


# -- evidence --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Posterior:
    """Statistics of q(z0 | text) over the measured batches (``maths.posterior_stats``)."""

    logvar_min: float
    logvar_max: float
    logvar_finite: bool
    kl_per_element: float
    mu_energy: float = 1.0
    text_share: float = 1.0  # share of mu's energy that differs between the captions of a batch
    multi_sample_batches: int = 1  # batches of two or more samples (only they can show collapse)
    largest_batch: int = 2
    mu_has_grad_path: bool = False  # measured only when mu is exactly 0

    @property
    def max_abs_logvar(self) -> float:
        return max(abs(self.logvar_min), abs(self.logvar_max)) if self.logvar_finite else math.inf


@dataclass(frozen=True)
class Formula:
    """The user's ``kl`` against the analytic KL (``maths.match_formula``), and its own values."""

    reduction: Optional[str]  # None: no reduction x factor matches
    factor: Optional[float]
    label: Optional[str]
    ambiguous: bool
    tolerance: float
    kl_min: float
    kl_mean: float
    kl_finite: bool = True
    closest: Optional[str] = None
    closest_ratio: Optional[float] = None
    fm_reduction: Optional[str] = None  # how fm_loss reduces the squared error, when that could be told

    @property
    def flipped(self) -> bool:
        return self.label in FLIPPED and not self.ambiguous

    @property
    def batch_summed(self) -> bool:
        """The kl sums over the batch while fm_loss does not (the KL's weight grows with the batch size)."""
        return (self.reduction is not None and not self.ambiguous and self.label == "correct"
                and self.reduction in BATCH_SUMMED and self.fm_reduction not in BATCH_SUMMED)


@dataclass(frozen=True)
class Stress:
    """The stress probe (``probe.stress_probe``): which module was pushed and what logvar and the KL did."""

    located: Optional[str]  # None: no module could be located (``reason`` says why)
    reason: Optional[str] = None
    why: Optional[str] = None
    raised: Optional[str] = None  # the step raised under the probe
    ran: bool = False  # at least one pushed step completed
    logvar_max_abs: float = math.nan
    kl_finite: bool = True
    kls: tuple[float, ...] = ()
    bound: Optional[tuple[float, float]] = None  # logvar range under the probe (the bound it found)
    factor: float = 100.0
    shift: float = 100.0


@dataclass(frozen=True)
class Warmup:
    """``kl_weight`` read at 0, 1%, 5%, 10%, 50% of total_steps: (step, fraction, weight)."""

    weights: tuple[tuple[int, float, float], ...]
    total_steps: Optional[int] = None
    note: Optional[str] = None

    @property
    def listing(self) -> str:
        return ", ".join(f"{w:.4g}@{s}" for s, _, w in self.weights)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(w) for _, _, w in self.weights)

    @property
    def target(self) -> float:
        return max(w for _, _, w in self.weights)

    @property
    def start(self) -> Optional[float]:
        """kl_weight at step 0 over the target, when there is a positive target and a schedule to judge."""
        if not self.finite or self.total_steps is None or self.target <= 0:
            return None
        return self.weights[0][2] / self.target

    @property
    def target_weight(self) -> Optional[float]:
        """The weight the balance is judged at: the largest probed, when finite and positive."""
        return self.target if self.finite and self.target > 0 else None


@dataclass(frozen=True)
class KLEvidence:
    posterior: Posterior
    stress: Stress
    formula: Optional[Formula] = None  # None: the step returns no kl
    warmup: Optional[Warmup] = None  # None: the step returns no kl_weight
    at_bound_share: Optional[float] = None  # share of logvar at the bound the probe found (a clamp holding it)
    fm_loss_mean: Optional[float] = None

    @classmethod
    def from_observation(cls, obs: dict[str, Any]) -> "KLEvidence":
        post = obs["posterior"]
        posterior = Posterior(
            logvar_min=post["logvar_min"], logvar_max=post["logvar_max"], logvar_finite=post["logvar_finite"],
            kl_per_element=post["kl_per_element"], mu_energy=post["mu_energy"], text_share=post["text_share"],
            multi_sample_batches=post.get("multi_sample_batches", 1), largest_batch=post.get("largest_batch", 1),
            mu_has_grad_path=post.get("mu_has_grad_path", False))
        s = obs["stress"]
        runs = s.get("runs") or []
        stress = Stress(
            located=s["located"], reason=s.get("reason"), why=s.get("why"), raised=s.get("raised"), ran=bool(runs),
            logvar_max_abs=s.get("logvar_max_abs", math.nan), kl_finite=s.get("kl_finite", True),
            kls=tuple(r["kl"] for r in runs if r["kl"] is not None),
            bound=tuple(s["bound"]) if s.get("bound") else None,
            factor=s.get("factor", 100.0), shift=s.get("shift", 100.0))
        formula = None
        if "formula" in obs:
            f = obs["formula"]
            formula = Formula(reduction=f["reduction"], factor=f["factor"], label=f["label"],
                              ambiguous=f["ambiguous"], tolerance=f["tolerance"], kl_min=obs["kl_user_min"],
                              kl_mean=obs["kl_user_mean"], kl_finite=obs["kl_user_finite"], closest=f["closest"],
                              closest_ratio=f["closest_ratio"], fm_reduction=obs.get("fm_reduction"))
        warmup = None
        if obs.get("warmup") is not None:
            w = obs["warmup"]
            warmup = Warmup(weights=tuple(tuple(x) for x in w["weights"]), total_steps=w["total_steps"],
                            note=w.get("note"))
        return cls(posterior=posterior, stress=stress, formula=formula, warmup=warmup,
                   at_bound_share=obs.get("at_bound_share"), fm_loss_mean=obs.get("fm_loss_mean"))

    # -- derived numbers the rules and the measurements table share
    def balance(self, th: KLThresholds) -> Optional[float]:
        """Weighted KL (target kl_weight x mean kl) over fm_loss, or None when it is not judged: an output is
        missing, a number is not finite, or the KL is below 1 while the head still sits at the prior."""
        ratio = self.balance_ratio()
        if ratio is None or (ratio < 1 and self.posterior.kl_per_element < th.balance_informative_kl):
            return None
        return ratio

    def balance_ratio(self) -> Optional[float]:
        weight = self.warmup.target_weight if self.warmup is not None else None
        if weight is None or self.formula is None or self.fm_loss_mean is None:
            return None
        weighted = abs(weight * self.formula.kl_mean)
        fm = self.fm_loss_mean
        if not (math.isfinite(weighted) and math.isfinite(fm)) or fm <= 0:
            return None
        return weighted / fm if weighted > 0 else 0.0


def balance_verdict(ratio: float, th: KLThresholds) -> Optional[Verdict]:
    """WARN beyond ``balance_warn`` either way, FAIL beyond ``balance_fail``; a ratio of 0 fails."""
    if not math.isfinite(ratio) or ratio <= 0:
        return Verdict.FAIL
    spread = max(ratio, 1 / ratio)
    if spread <= th.balance_warn:
        return None
    return Verdict.WARN if spread <= th.balance_fail else Verdict.FAIL


def stress_pinned_judged(ev: KLEvidence, th: KLThresholds) -> bool:
    """The share at the bound is judged only when the probe's bound itself is within ``logvar_bound``."""
    limit = ev.stress.logvar_max_abs if ev.stress.ran else math.inf
    return ev.at_bound_share is not None and limit <= th.logvar_bound
