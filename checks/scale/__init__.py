"""`scale`: is z1 the VAE latent scaled exactly as the VAE's config says, and does decode undo it?

The seed's first item and its costliest bug: a latent scale applied twice, not at all, inverted, or a shift/mean
ignored. Training still "works", but z1 lives in other units than z0 and the target v* = x1 - x0 is dominated by
one side. The check watches the user's own ``encode``/``decode`` call the raw VAE, fits the affine map from the raw
latent the VAE produced to the user's z1, and names the convention that map is.

The package: ``measure`` (runs the user's code; ``recorder`` watches the VAE), ``maths`` (maps, moments, the
conventions, fits), ``analysis`` (which hypothesis the numbers support, as ``evidence``), ``rules`` (the rules
table), ``table`` (the measurements), ``doc``, and ``standalone`` (`fmcheck scale --vae`).
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Check, Judgement
from fmcheck.findings import evaluate

from .doc import DOC
from .rules import RULES, ScaleThresholds


class ScaleCheck(Check):
    id = "scale"
    title = "VAE latent scaling round trip"
    purpose = ("z1 = the VAE latent scaled once as its config says (not twice, missing, inverted, shift ignored), "
               "decode its inverse.")
    order = 10
    requires = ("vae", "encode")
    Thresholds = ScaleThresholds
    doc = DOC
    rules = RULES  # `scale --vae` judges a subset of the same table (rules.STANDALONE_RULES)
    publishes = {"applied_scaling": "applied"}  # the scaling as applied: `fmcheck compare`'s fingerprint reads it

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import measure

        return measure(ctx)

    def judge(self, obs: dict[str, Any], t: ScaleThresholds) -> Judgement:
        from .analysis import analyse
        from .table import measurements, passed

        evidence = analyse(obs, t)
        findings = evaluate(self.rules, evidence, t)
        rows, details = measurements(obs, evidence, t, findings)
        return Judgement(measurements=rows, summary=passed(evidence, obs), details=details, findings=findings)


__all__ = ["ScaleCheck", "ScaleThresholds"]
