"""`norms`: are z0 (the source x0) and z1 (the data latent x1) in the same units?

The seed's first lesson: with ||x0|| ~ 150 and ||x1|| ~ 900-1200 the velocity v* = x1 - x0 is all x1, and the head
and its KL stall. This check reads the cached step outputs of a few batches (``measure``), compares the per-sample L2
norms (``maths``) and concludes which side is off scale (``rules``); the cause of a mis-scaled x1 is `scale`'s.
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Check, Judgement
from fmcheck.judges import flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

from .doc import DOC
from .measure import NORM_KEYS
from .rules import RULES, NormsEvidence, NormsThresholds

__all__ = ["NormsCheck", "NormsThresholds"]

LABELS = {"x0": "||x0||", "x1": "||x1||", "xt": "||x_t||", "v_target": "||v_target||"}


class NormsCheck(Check):
    id = "norms"
    title = "Norms of x0, x1, x_t, v*"
    purpose = "z0 and z1 in the same units: E||x1|| / E||x0|| within 2x, per-dim RMS, per-channel std of x1."
    order = 20
    requires_outputs = ("x0", "x1")
    Thresholds = NormsThresholds
    doc = DOC
    rules = RULES

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import measure

        return measure(ctx)

    def judge(self, obs: dict[str, Any], th: NormsThresholds) -> Judgement:
        ev = NormsEvidence.from_observation(obs)
        # the data of the latents figure (`--plot`): histograms on shared bins and per-channel statistics
        latents = {**obs["distributions"], "mean_norm": {"x0": ev.n0, "x1": ev.n1}, "ratio": ev.ratio}
        details = {"samples": obs["samples"], "batches": obs["batches"], "latents": latents}
        return self.conclude(ev, th, measurements(obs, ev, th), f"{ev.head()}: z0 and z1 in the same units",
                             details)


def measurements(obs: dict[str, Any], ev: NormsEvidence, th: NormsThresholds) -> list[Measurement]:
    """The measurements table (--verbose, JSON); every non-PASS row is backed by a rule on the same evidence."""
    norms = obs["norms"]
    ms = [ratio_within("E||x1|| / E||x0||", ev.ratio, warn_factor=th.ratio_warn, fail_factor=th.ratio_fail)]
    ms += [info(f"E{LABELS[key]}", norms[key]["mean"], note=f"per-sample L2 over {obs['dims'][key]} dims")
           for key in NORM_KEYS if key in norms]
    ms += [info(f"per-dim RMS {key}", norms[key]["rms_per_dim"],
                note="a unit-variance latent has ~1" if key in ("x0", "x1") else "")
           for key in NORM_KEYS if key in norms]
    if ev.mu_rms is not None:
        ms += [info("per-dim RMS mu", ev.mu_rms), info("per-dim RMS sigma", ev.sigma_rms)]
    if ev.channel_std:
        ms.append(info("x1 per-channel std", ", ".join(f"{s:.3g}" for s in ev.channel_std)))
        ms.append(info("x1 per-channel mean", ", ".join(f"{m:.3g}" for m in obs["channel_mean"])))
        name = "x1 channel std spread (max/min)"
        spread = ev.channel_spread
        if spread is None:  # x1 holds NaN/Inf: no spread to judge (norms.nonfinite says so)
            ms.append(info(name, "not defined", note="x1 is not finite"))
        elif th.channel_spread_warn is not None:
            ms.append(flag(name, spread <= th.channel_spread_warn, value=spread, unit="x",
                           expected=f"<= {th.channel_spread_warn:g}", bad=Verdict.WARN))
    return ms
