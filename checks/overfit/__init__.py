"""`overfit`: train the user's own step and optimizer on a fixed small set until the outcome is certain.

The seed's last step ("fix 128 samples; the FM MSE must fall, cos(u_theta, v*) rise and KL stay stable"), answered in
seconds: each sample's randomness is replayed on every pass, statistics accumulate on the device, the host reads them
at fixed checkpoints, and a stop rule (``maths.py``) ends the run at the checkpoint that decides (``measure.py``).
The verdict comes from the rules (``rules.py``) over that recorded run.
"""

from __future__ import annotations

from typing import Any

from fmcheck.api import Check, Judgement

from . import rules as _rules
from . import table as _table
from . import words as _words
from .budget import timeout_for
from .doc import DOC
from .measure import REPLAY_SALT
from .rules import Evidence
from .thresholds import OverfitThresholds

__all__ = ["OverfitCheck", "OverfitThresholds", "REPLAY_SALT", "timeout_for"]


class OverfitCheck(Check):
    id = "overfit"
    title = "Overfit a fixed small set"
    purpose = "Train the user's step and optimizer on 128 fixed samples: fm_loss falls, cos rises, scale holds."
    order = 50
    requires = ("optimizer",)
    requires_outputs = ()  # v_pred and v_target when there; a step that returns only its loss is judged on it
    Thresholds = OverfitThresholds

    @staticmethod
    def timeout_for(settings) -> float:
        """The runner's per-check limit when --timeout is not set: the time budget plus a margin."""
        return timeout_for(settings)

    doc = DOC
    rules = _rules.RULES

    def measure(self, ctx) -> dict[str, Any]:
        from .measure import measure

        return measure(ctx, ctx.thresholds)

    def judge(self, obs: dict[str, Any], thresholds: OverfitThresholds) -> Judgement:
        evidence = Evidence.from_observation(obs)
        return self.conclude(evidence, thresholds, _table.measurements(obs, evidence, thresholds),
                             passed=_words.passed(evidence, thresholds), details=_table.details(obs, thresholds))
