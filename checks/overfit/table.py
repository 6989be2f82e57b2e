"""The `overfit` check's measurements table (`--verbose`, the JSON) and its curves (`--plot`), from the observation.

The verdict does not come from here: it comes from the rules (``rules.py``) over the same recorded run.
"""

from __future__ import annotations

import math
from typing import Any

from fmcheck.report import Measurement
from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.verdict import Verdict

from . import maths as om
from .rules import Evidence


def measurements(obs: dict[str, Any], ev: Evidence, thresholds) -> list[Measurement]:
    """What was measured: the numbers the verdict rests on first, then the run's settings and the curves' ends."""
    samples, replayed = obs["samples"], ev.replayed
    randomness = ("replayed (every pass draws the same t, noise and eps)" if replayed else
                  f"fresh each pass: {', '.join(ev.changed_outputs)} changed between two calls of batch 0 with the "
                  "same weights and seeds (a generator fmcheck cannot reach, a stateful sampler or a re-pairing such "
                  "as minibatch OT)")
    base = [info("samples", samples, "samples",
                 f"{obs['requested_samples']} requested, whole batches ({obs['batches']})"
                 if samples >= obs["requested_samples"] else
                 f"all the data holds ({obs['batches']} batches); {obs['requested_samples']} requested"),
            info("steps to verdict", ev.step, "steps", f"of a budget of {ev.budget_steps}"),
            info("seconds to verdict", round(obs["timing"]["seconds_to_verdict"], 2), "s"),
            info("randomness of the set", "replayed" if replayed else "fresh", "", randomness),
            info("time budget", round(obs["time_budget"], 2), "s", obs["budget_note"])]
    if ev.outcome == om.STOPPED:
        return base
    if ev.outcome == om.NONFINITE:
        key = ev.nonfinite[0] if ev.nonfinite else "?"
        base.append(flag("first non-finite output", False, value=f"{key} at step {ev.step}", expected="all finite"))
        if ev.initial is not None and not math.isnan(ev.initial.fm):
            base.append(info("fm_loss initial", ev.initial.fm))
        return base
    if ev.initial is None or ev.final is None:  # a step hung before the first checkpoint
        return base

    initial, final = obs["initial"], obs["points"][-1]
    loss_name = ev.loss_name
    head = [base[1]]  # steps to verdict, then the numbers the verdict rests on
    # A bound missed is a FAIL row only where a FAIL finding stands on the run; when a budget ended it, a WARN.
    fails = ev.outcome in om.FAILURES
    bar = (lambda bound: {"warn": None, "fail": bound}) if fails else (lambda bound: {"warn": bound, "fail": None})
    if ev.has_v:
        head.append(at_least("cos final", final["cos"], **bar(ev.cos_needed(thresholds))))
    head.append(at_least(f"relative {loss_name} fall", ev.fall, **bar(ev.drop_needed(thresholds)), unit="fraction"))
    if obs["has_scale"]:
        head.append(ratio_within("scale drift", final["drift"], warn_factor=thresholds.scale_warn,
                                 fail_factor=thresholds.scale_fail if fails else None))
    if ev.outcome in (om.SCALE_DRIFT, om.SCALE_MOVING):
        head.insert(1, head.pop())  # the scale first when it decides
    rows = head + [base[0], base[3], base[2], base[4]]
    if ev.has_v:
        rows += [info("cos initial", initial["cos"]), info("cos best", obs["best_cos"])]
    else:
        rows.append(info("cos(v_pred, v_target)", "not measured", "",
                         "step output lacks 'v_pred', 'v_target': judged on the loss alone"))
    diverge_at = thresholds.diverge * initial["fm"]
    rows += [info(f"{loss_name} initial", initial["fm"]),
             at_most(f"{loss_name} final", final["fm"], **bar(diverge_at))  # divergence
             if math.isfinite(diverge_at) and diverge_at > 0 else info(f"{loss_name} final", final["fm"])]
    if ev.has_v:
        rows += [info("fm_loss / mean(v_target^2) initial", initial["rel"]),
                 info("fm_loss / mean(v_target^2) final", final["rel"],
                      "", "the share of the target not yet explained (its fall is judged above)")]
    if obs["has_scale"]:
        rows += [info("||x0||/||x1|| initial", initial["ratio"]), info("||x0||/||x1|| final", final["ratio"])]
    else:
        rows.append(info("scale ratio", "not watched", "", "step output lacks 'x0' and 'x1'"))
    if ev.has_v:
        rows += [info("||v_target|| initial", initial["vnorm"]), info("||v_target|| final", final["vnorm"])]
    if obs["has_kl"]:
        rows += [info("kl initial", initial["kl"]), info("kl final", final["kl"])]
    rows += [info("grad norm initial (first pass)", obs["grad_initial"]), info("grad norm final", final["grad"])]
    for name, value in obs["module_grad_final"].items():
        rows.append(flag(f"grad norm '{name}' final", bool(value), value=value, expected="> 0", bad=Verdict.WARN))
    for name, count in obs["params_missing_from_optimizer"].items():
        rows.append(at_most(f"'{name}' parameters not in the optimizer", count, warn=0, fail=None, unit="params"))
    extras = [name for name, used in obs["extras"].items() if used]
    rows += [info("kl_weight at the overfit's steps", obs["kl_weight"]) if obs["kl_weight"] is not None
             else info("kl_weight", "not exposed"),
             info("step_index range run", f"{obs['start_step']}..{obs['start_step'] + max(obs['steps_run'], 1) - 1}"),
             info("learning rate (max over groups)", obs["lr"]),
             info("training extras run", ", ".join(extras) if extras else "none")]
    return rows


def details(obs: dict[str, Any], thresholds) -> dict[str, Any]:
    """Curves at step 0 (before any update; the gradient norm of the first pass) and at every checkpoint, with the
    thresholds that apply to them and how to group them into panels (the overfit figure of `--plot`)."""
    points = obs["points"]
    if obs["initial"] is not None:
        points = [{**obs["initial"], "grad": obs["grad_initial"], "step": 0}, *points]
    curves = {"step": [p["step"] for p in points], "fm_loss": [p["fm"] for p in points],
              "fm_relative": [p["rel"] for p in points], "grad_norm": [p["grad"] for p in points]}
    if obs.get("has_v", True):
        curves["cos"] = [p["cos"] for p in points]
    if obs["has_scale"]:
        curves["scale_ratio"] = [p["ratio"] for p in points]
    if obs["has_kl"]:
        curves["kl"] = [p["kl"] for p in points]
    initial = obs["initial"] or {}
    replayed = obs["randomness"] == "replayed"
    cos_needed = (thresholds.cos_pass if replayed or initial.get("cos") is None
                  else initial["cos"] + thresholds.fresh_cos_gain * (1 - initial["cos"]))
    drop_needed = thresholds.loss_drop if replayed else thresholds.fresh_loss_drop
    guides: dict[str, list] = {"cos": [[cos_needed, "pass"]]} if "cos" in curves else {}
    if initial.get("rel"):
        guides["fm_relative"] = [[(1 - drop_needed) * initial["rel"], "pass"]]
    if initial.get("ratio"):
        guides["scale_ratio"] = [[max(initial["ratio"], 1.0) * thresholds.scale_fail, "fail"],
                                 [min(initial["ratio"], 1.0) / thresholds.scale_fail, "fail"]]
    panels = [{"keys": ["fm_loss", "fm_relative"], "title": "fm_loss, and / mean(v_target^2)", "log": True},
              {"keys": ["cos"], "title": "cos(v_pred, v_target)", "log": False},
              {"keys": ["scale_ratio"], "title": "||x0|| / ||x1||", "log": True},
              {"keys": ["grad_norm"], "title": "grad norm", "log": True},
              {"keys": ["kl"], "title": "kl", "log": True}]
    decision = obs["decision"]
    return {"curves": curves, "curve_guides": guides,
            "curve_panels": [p for p in panels if p["keys"][0] in curves],
            "curve_title": f"overfit: {decision['outcome']} at step {decision['step']}",
            "outcome": decision["outcome"], "steps_run": obs["steps_run"], "window": obs["window"],
            "randomness": obs["randomness"], "changed_outputs": obs["changed_outputs"], "timing": obs["timing"]}
