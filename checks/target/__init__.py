"""`target`: does the model learn the velocity of the user's own path, detached, with gradient where it belongs?

The package: ``measure.py`` (the I/O with the user's code: the path audit, ``implied.py`` and ``inferred.py`` for the
implied-target audit, ``autograd.py`` for the gradient paths), ``maths.py`` (pure maths), ``evidence.py`` (the typed
evidence the rules read), ``compare.py`` (the target against the path velocity, shared by the rules and the
measurement table), ``rules.py`` (everything the check concludes, under its code), ``judge.py`` (the measurement
table) and ``doc.py``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from fmcheck.api import Check, Judgement, Thresholds

from .doc import DOC
from .rules import RULES


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
    doc = DOC
    rules = RULES

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import measure

        return measure(ctx, ctx.thresholds.max_batches)

    def judge(self, obs: dict[str, Any], th: TargetThresholds) -> Judgement:
        from .evidence import Evidence
        from .judge import details, measurements, passed

        evidence = Evidence.from_observation(obs)
        table = measurements(evidence, th)
        return self.conclude(evidence, th, table.measurements, passed(table), details(obs, th))
