"""The `overfit` check's thresholds: the stop rule (``maths.Rules``) and the rules (``rules.py``) read them."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from fmcheck.api import Thresholds


class OverfitThresholds(Thresholds):
    loss_drop: float = Field(0.5, gt=0, lt=1, description="with the set's randomness replayed: fm_loss / "
                             "mean(v_target^2) must fall by this fraction of its initial value (window means)")
    cos_pass: float = Field(0.8, gt=-1, le=1, description="with the set's randomness replayed: cos(v_pred, v_target) "
                            "(window mean) must reach this")
    scale_warn: float = Field(2.0, ge=1, description="a pass whose ||x0||/||x1|| drifted beyond this factor (out of "
                                                      "the band between its start and 1) is a warning")
    scale_fail: float = Field(3.0, ge=1, description="||x0||/||x1|| drifting beyond this factor fails at once "
                                                     "(scale drift); a pass also needs its recent trend, continued "
                                                     "for as many steps again, to stay inside it")
    diverge: float = Field(10.0, gt=1, description="fm_loss above this multiple of its initial value fails at once")
    trend_after: float = Field(0.3, ge=0, le=1, description="fraction of the step budget after which a hopeless "
                                                            "run fails early (see trend_reach)")
    trend_optimism: float = Field(2.0, ge=1, description="the trends of fm_loss and cos are extrapolated this many "
                                                         "times faster than their recent slopes")
    trend_reach: float = Field(0.5, gt=0, le=1, description="a run is hopeless when those optimistic trends bring "
                                                            "less than this share of the improvement needed, on "
                                                            "both measures, by the end of the step budget")
    fresh_loss_drop: float = Field(0.25, gt=0, lt=1, description="with fresh randomness each pass (the set's "
                                   "randomness could not be replayed): the relative fm_loss fall a pass needs")
    fresh_cos_gain: float = Field(0.4, gt=0, le=1, description="with fresh randomness: the share of its initial gap "
                                  "to 1 that cos must close (the floor of a conditional mean is unknown, so no "
                                  "absolute cos)")
    min_steps: int = Field(32, ge=0, description="no pass before this many steps, in either regime: a head's "
                           "scale drift under a weak KL takes tens of steps to show")
    start_step: Optional[int] = Field(None, ge=0, description="step_index of the first overfit step (default: "
                                                              "total_steps // 2, past any warmup; 100000 when "
                                                              "total_steps is unknown)")
