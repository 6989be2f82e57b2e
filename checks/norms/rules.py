"""What the ``norms`` check concludes: its thresholds, the typed evidence (built from the observation ``measure``
returns) and the rules. Pure: no torch, no user code.

The check names which side is off scale; the cause of a mis-scaled x1 (scaling missing, applied twice or inverted, a
config that does not fit the VAE, a shift ignored) is the ``scale`` check's to name: it compares z1 with the VAE's own
latents, which this check never sees (one owner per cause).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Hit, Rule, Thresholds
from fmcheck.verdict import Verdict


class NormsThresholds(Thresholds):
    ratio_warn: float = Field(2.0, ge=1, description="E||x1|| / E||x0|| within this factor (either way) passes")
    ratio_fail: float = Field(3.0, ge=1, description="E||x1|| / E||x0|| beyond this factor (either way) fails; "
                                                     "between ratio_warn and ratio_fail warns")
    channel_spread_warn: Optional[float] = Field(
        4.0, ge=1, description="largest / smallest per-channel std of x1 above this warns (a few channels dominate "
                               "v*: per-channel latents_mean/latents_std not applied); unset to turn off")


@dataclass(frozen=True)
class NormsEvidence:
    """Mean per-sample L2 norms and per-dimension RMS of x0 and x1, and what the figure and hints need."""

    n0: float  # E||x0||
    n1: float  # E||x1||
    rms0: float  # per-dimension RMS of x0 (a unit-variance latent has ~1)
    rms1: float
    samples: int
    non_finite_samples: dict[str, int] = field(default_factory=dict)  # samples with NaN/Inf norms, per side
    channel_std: Optional[tuple[float, ...]] = None  # per-channel std of x1 (image or video latents only)
    mu_rms: Optional[float] = None  # per-dimension RMS of the head's mu and sigma, when the step returns them
    sigma_rms: Optional[float] = None

    @classmethod
    def from_observation(cls, obs: dict[str, Any]) -> "NormsEvidence":
        norms = obs["norms"]
        return cls(n0=norms["x0"]["mean"], n1=norms["x1"]["mean"], rms0=norms["x0"]["rms_per_dim"],
                   rms1=norms["x1"]["rms_per_dim"], samples=obs["samples"],
                   non_finite_samples=dict(obs.get("non_finite_samples") or {}),
                   channel_std=tuple(obs["channel_std"]) if obs.get("channel_std") else None,
                   mu_rms=obs.get("mu_rms"), sigma_rms=obs.get("sigma_rms"))

    @property
    def non_finite(self) -> list[str]:
        """The sides whose mean norm is NaN/Inf: their norms, and the ratio, are then not defined."""
        return [k for k, n in (("x0", self.n0), ("x1", self.n1)) if not math.isfinite(n)]

    @property
    def ratio(self) -> float:
        if self.non_finite:
            return math.nan  # a ratio of NaN/Inf norms is no measurement of units
        return self.n1 / self.n0 if self.n0 > 0 else math.inf

    @property
    def x1_off(self) -> bool:
        """The side off scale is the one whose per-dimension RMS is farther from 1 on a log scale."""
        if self.rms0 > 0 and self.rms1 > 0:
            return abs(math.log(self.rms1)) >= abs(math.log(self.rms0))
        return self.ratio > 1

    @property
    def channel_spread(self) -> Optional[float]:
        """Largest / smallest per-channel std of x1; None without channels or when x1 is not finite."""
        if not self.channel_std or "x1" in self.non_finite:
            return None
        low = min(self.channel_std)
        return max(self.channel_std) / low if low > 0 else math.inf

    def head(self) -> str:
        """The ratio with the norms behind it: the first words of every row summary."""
        return (f"E||x1|| / E||x0|| = {ratio_text(self.ratio)} (E||x0|| {self.n0:.4g}, E||x1|| {self.n1:.4g}, "
                f"{self.samples} samples)")


def ratio_verdict(ratio: float, th: NormsThresholds) -> Optional[Verdict]:
    """None within ``ratio_warn`` either way, WARN within ``ratio_fail``, else FAIL (a ratio that is 0, NaN or Inf
    fails): the bands of ``fmcheck.judges.ratio_within``."""
    if not math.isfinite(ratio) or ratio <= 0:
        return Verdict.FAIL
    spread = max(ratio, 1 / ratio)
    if spread <= th.ratio_warn:
        return None
    return Verdict.WARN if spread <= th.ratio_fail else Verdict.FAIL


def ratio_text(ratio: float) -> str:
    """The ratio with 3 significant digits, more when 3 would print a ratio that is not 1 as 1."""
    text = f"{ratio:.3g}"
    return f"{ratio:.6g}" if text == "1" and ratio != 1 else text


def larger_text(factor: float) -> str:
    """'5.52x larger', or '0.03% larger' for a factor so close to 1 that 'x' would print '1x larger'."""
    if factor < 1.1:
        return f"{(factor - 1) * 100:.2g}% larger"
    return f"{factor:.3g}x larger"


# -- tests -----------------------------------------------------------------------------------------------------
def _non_finite(ev: NormsEvidence, th: NormsThresholds):
    if not ev.non_finite:
        return None
    where = ", ".join(f"{k} ({ev.non_finite_samples[k]} of {ev.samples} samples)" if k in ev.non_finite_samples
                      else k for k in ev.non_finite)
    return Hit.of(", ".join(ev.non_finite), "finite", where=where)


def _scale(x1_side: bool):
    def test(ev: NormsEvidence, th: NormsThresholds):
        if ev.non_finite or ev.x1_off is not x1_side:
            return None
        ratio = ev.ratio
        verdict = ratio_verdict(ratio, th)
        if verdict is None:
            return None
        bigger = "x1 (the data latent)" if ratio > 1 else "x0 (the source)"
        factor = max(ratio, 1 / ratio) if ratio > 0 else math.inf
        moments = ""
        if not x1_side and ev.mu_rms is not None:
            moments = (f" Per-dimension RMS of mu {ev.mu_rms:.3g}, of sigma {ev.sigma_rms:.3g}: bound the larger one "
                       "(smaller init of the head's last layer, logvar clamp, KL weight).")
        return Hit.of(ratio, f"{1 / th.ratio_warn:.4g}..{th.ratio_warn:.4g}", "x", verdict=verdict,
                      head=ev.head(), bigger=bigger, larger=larger_text(factor), rms0=f"{ev.rms0:.3g}",
                      rms1=f"{ev.rms1:.3g}", moments=moments)
    return test


def _channel_spread(ev: NormsEvidence, th: NormsThresholds):
    spread = ev.channel_spread
    if spread is None or th.channel_spread_warn is None or spread <= th.channel_spread_warn:
        return None
    return Hit.of(spread, f"<= {th.channel_spread_warn:g}", "x", stds=list(ev.channel_std), head=ev.head())


RATIO_MESSAGE = ("{head}, expected {bound}: {bigger} is {larger}; v* = x1 - x0 is dominated by it (per-dimension "
                 "RMS x0 {rms0}, x1 {rms1}; a unit-variance latent has ~1)")
NO_RATIO_FIX = ("Fix the scale at its source; do not add a ratio correction r = ||z1|| / ||z0||: it hides the "
                "mismatch and the sampler does not apply it.")
RATIO_DOC = ("The mean per-sample L2 norm of x1 (the data latent z1) over that of x0 (the source z0), on the first "
             "`measure_batches` batches: within `ratio_warn` (2x) either way passes, within `ratio_fail` (3x) "
             "warns, beyond fails (the seed's 2-3x rule: beyond it v* = x1 - x0 is one endpoint only). ")

# The `scale` check's findings that name why z1 is off scale: with one of them in the run, norms.z1_scale is the same
# cause seen from its ratio and is listed as covered by it (without a VAE, scale skips and norms still says it).
SCALE_CAUSES = ("scale.missing", "scale.twice", "scale.inverted", "scale.shift_ignored", "scale.shift_sign",
                "scale.shift_after_scale", "scale.shift_without_scale", "scale.std_ignored",
                "scale.per_channel_ignored", "scale.config_not_used", "scale.unrecognised", "scale.config_std_off")

RULES = (
    Rule(
        code="norms.nonfinite", verdict=Verdict.FAIL,
        title="x0 or x1 holds NaN/Inf: their norms are not defined",
        message="non-finite values (NaN/Inf) in {where}: the norms, and their ratio, are not defined",
        fix="Find where the step's x0/x1 turn NaN/Inf (the structure check names the output and batch) and fix "
            "that first; the norm ratio is measurable once they are finite.",
        test=_non_finite,
        doc="Whether the mean per-sample L2 norm of x0 and of x1 is finite, with the number of samples whose norm "
            "is NaN or Inf. A non-finite latent has no units to compare; the `structure` check names the first "
            "output and batch that turns non-finite."),
    Rule(
        code="norms.z1_scale", verdict=Verdict.FAIL,
        title="x1 (the data latent) is off scale against x0",
        message=RATIO_MESSAGE,
        fix="The data latent x1 is off scale: `fmcheck scale` names the cause (scaling_factor missing, applied twice "
            "or inverted, a config that does not fit this VAE, a shift ignored). " + NO_RATIO_FIX,
        test=_scale(True),
        covered_by=SCALE_CAUSES,
        doc=RATIO_DOC + "This finding is for the case where x1 is the side off scale: its per-dimension RMS is "
            "farther from 1 (on a log scale) than x0's. Which scaling mistake it is, is `scale`'s to name: when a "
            "`scale` finding names it in the same run, this one is listed as covered by it. A "
            "source deliberately wider or narrower than the data can raise `ratio_warn` / `ratio_fail`."),
    Rule(
        code="norms.z0_scale", verdict=Verdict.FAIL,
        title="x0 (the text head's source) is off scale against x1",
        message=RATIO_MESSAGE,
        fix="The source x0 is off scale: the text head's output (mu, sigma) sets it.{moments} " + NO_RATIO_FIX,
        test=_scale(False),
        doc=RATIO_DOC + "This finding is for the case where x0 is the side off scale: its per-dimension RMS is "
            "farther from 1 than x1's, so the text head's mu or sigma sets the mismatch (the per-dimension RMS of "
            "each is in the fix when the step returns them). A source wider than the data by design can raise "
            "`ratio_warn` / `ratio_fail`."),
    Rule(
        code="norms.channel_spread", verdict=Verdict.WARN,
        title="a few channels of x1 dominate v*",
        message="x1 per-channel std spread {observed}x (stds {stds}); a few channels dominate v*. {head}",
        fix="Normalise the latent per channel as the VAE defines it (latents_mean / latents_std in its config: z1 = "
            "(z - mean) / std * scaling_factor), or check `fmcheck scale`; do not rescale channels by hand-tuned "
            "factors.",
        test=_channel_spread,
        covered_by=("scale.per_channel_ignored",),
        doc="The largest over the smallest per-channel std of x1 (dimension 1 of an image or video latent), against "
            "`channel_spread_warn` (4x): per-channel latents_mean / latents_std not applied leaves a few channels "
            "with most of v*'s energy. A VAE whose channels legitimately differ can raise or unset "
            "`channel_spread_warn`."),
)
