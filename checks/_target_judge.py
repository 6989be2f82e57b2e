"""`target`'s judging: pure functions of the measured observation and the thresholds (no torch, no user code).

The path audit (x_t's span and schedule, v_target against the path velocity), the implied-target audit (what the
loss trains the velocity module's output toward, and the implied weight), the declared `prediction`, the gradient
paths and the precision of the path tensors, each adding measurements and, for what is not PASS, a one-line
problem and a fix to a shared ``_Findings``.
"""

from __future__ import annotations

from typing import Any

from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.report import Measurement
from fmcheck.verdict import Verdict

HALF = ("torch.float16", "torch.bfloat16")
ZERO_REL = 1e-8  # a gradient norm below this fraction of the largest one in its term counts as none
IDENTIFIED = 0.999  # a wrong candidate this close to the target names it: a near-miss WARN becomes a FAIL
TIE = 0.005  # candidates whose median cosine is within this of the best are reported together
DETACH_FIX = ("Detach the target: v_target = (x1 - x0).detach() (or build it from x0.detach(), x1.detach()). Only "
              "u_theta(x_t, t) may carry gradient; the head gets its gradient through x_t (the reparameterised z0).")


class _Findings:
    """Measurements plus, for each non-PASS one, a one-line diagnosis and a fix."""

    def __init__(self) -> None:
        self.measurements: list[Measurement] = []
        self.issues: list[tuple[Verdict, str, str]] = []
        self.good: list[str] = []

    def add(self, measurement: Measurement, problem: str = "", fix: str = "") -> Measurement:
        self.measurements.append(measurement)
        if measurement.verdict in (Verdict.WARN, Verdict.FAIL) and problem:
            self.issues.append((measurement.verdict, problem, fix))
        return measurement


def _fmt_ratio(x: float) -> str:
    return f"{x:.3g}x"


def _candidate_fix(name: str) -> str:
    fixes = {
        "eps (the reparam noise)": "eps is the DDPM noise-prediction target, not a velocity",
        "-eps": "-eps is a noise (score-like) target, not a velocity",
        "x0": "x0 alone is the source, not a velocity",
        "x0 (the source noise: an eps target)": "the source noise is the DDPM eps target, not a velocity",
        "x1": "x1 alone is the data (an x0-prediction target), not a velocity",
        "x_t": "x_t is the model's input, not a velocity",
        "score-like -x0/a(t)": "-x0/sigma(t) is a score target, not a velocity",
    }
    return fixes.get(name, "")


def _path_velocity_text(path: dict[str, Any]) -> str:
    combo = path.get("velocity_combination")
    fit = path.get("fit", {})
    text = ""
    if combo:
        text = f"median a'(t) = {combo['x0']:.3g}, b'(t) = {combo['x1']:.3g}"
    if fit.get("describe"):
        text += f"; path fitted as {fit['describe']}, {fit.get('direction', '')}"
    return text


def _judge_path(path: dict[str, Any], th: Any, out: _Findings, primary: bool = True) -> None:
    """The step outputs' path audit; with ``primary`` False (the implied audit decided) v_target is a cross-check."""
    if "problem" in path:
        out.add(flag("path fit", False, value=path["problem"], bad=Verdict.WARN),
                f"path not audited: {path['problem']}",
                "Return x0, x1, x_t, v_target as (B, ...) tensors with the same number of values per sample, and t "
                "as one time per sample (shape (B,) or broadcastable like (B, 1, 1, 1)).")
        return
    if path.get("t_scale"):
        # timesteps (0..1000, what diffusers' transformers take) are a convention, not a bug: the target is judged
        # against d x_t / d(t / scale), and a target in other time units shows as a mis-scaled target below
        scale = path["t_scale"]
        out.add(info("t in timestep units", path["t_raw_max"],
                     expected=f"t / {scale:g} is the path's time in [0, 1] (raw t {path['t_raw_min']:.4g}.."
                              f"{path['t_raw_max']:.4g})"))
        out.good.append(f"t in timestep units: judged as t / {scale:g}")
    residual = path["xt_residual"]
    out.add(at_most("x_t off span(x0, x1)", residual, warn=th.xt_residual_warn, fail=th.xt_residual_fail),
            f"x_t is not a mix of the returned x0 and x1: {residual:.1%} of ||x_t|| lies outside span(x0, x1)",
            "Build x_t from exactly the x0 and x1 you return (same samples, same order), with no extra noise term. "
            "If your path adds noise on purpose (torchcfm with sigma > 0, a Schrodinger bridge, a stochastic "
            "interpolant), return that noise as the step output 'noise' (torchcfm: return_noise=True): the check "
            "then fits its std s(t) and expects the target a'(t) x0 + b'(t) x1 + s'(t)/s(t) (x_t - mu_t).")
    noise = path.get("noise_term")
    if noise and "describe" in noise:
        out.add(info("noise term of x_t (step output 'noise')", noise["share"], unit="of ||x_t||",
                     expected=f"{noise['describe']}; RMS s'/s {noise['log_slope_rms']:.3g} (the target's "
                              f"s'/s (x_t - mu_t) term); off span(x0, x1) without it: "
                              f"{noise['residual_without']:.1%}"))
        out.good.append(f"x_t carries the returned noise ({noise['share']:.1%} of ||x_t||, {noise['describe']}): "
                        "the path velocity includes its s'/s term")
    fit = path["fit"]
    if not fit["ok"]:
        combo = path["v_combination"]
        extra = f" after drawing {path['extra_batches']} more batch(es)" if path["extra_batches"] else ""
        described = "" if combo is None else (
            f"; v_target ~ {combo['x0']:.3g} x0 + {combo['x1']:.3g} x1"
            + (f" (but {combo['residual']:.0%} of it is outside span(x0, x1))" if combo["residual"] > 0.05 else ""))
        out.add(flag("t spread for the path fit", False,
                     value=f"{path['distinct_t']} distinct, range {path['t_range']:.3g}",
                     expected=">= 3 distinct values spanning >= 0.02", bad=Verdict.WARN),
                f"path velocity not fitted: {fit['reason']}{extra}{described}",
                "Sample t per sample (t = torch.rand(B)), or yield more batches, so a(t) and b(t) can be fitted; "
                "with x_t = (1-t) x0 + t x1 the target must be 1.0 x1 - 1.0 x0.")
        return
    out.add(info("path", f"{fit['describe']}; {fit['direction']}"))
    out.add(info("samples (batches)", f"{path['samples']} ({path['batches']})",
                 expected=f"{path['distinct_t']} distinct t, range {path['t_range']:.3g}"))
    sched = fit["residual"]
    out.add(at_most("(a, b) off the fitted a(t), b(t)", sched, warn=th.schedule_residual_warn,
                    fail=th.schedule_residual_fail),
            f"x_t does not follow t: the per-sample mix (a, b) of x0, x1 scatters {sched:.1%} around any smooth "
            "a(t), b(t)",
            "Return the t that x_t was built with, one per sample, after any shift or warp of t (and the same t "
            "the velocity net receives).")
    if not path.get("v_target_returned", True):
        if primary:
            out.add(flag("target audited", False, value="no v_target, no implied target", bad=Verdict.WARN),
                    "the step returns no 'v_target' and the loss's implied target could not be measured: the target "
                    "is not audited",
                    "Return 'v_target' (and 'v_pred'), or declare the pipeline field 'velocity' so the target can be "
                    "read from the loss gradient.")
        else:
            out.add(info("v_target", "not returned: the loss's implied target is audited instead"))
        return
    if primary:
        _judge_match(path, path, th, out, subject="v_target")
        return
    # the implied audit decides; the step's v_target is reported as a cross-check
    cos, ratio = path["cos_median"], path["ratio_median"]
    out.add(info("median cos(v_target, path velocity)", cos, expected="cross-check (the implied target decides)"))
    out.add(info("median ||v_target|| / ||path velocity||", ratio, expected="cross-check"))


def _candidate_list(path: dict[str, Any], found: dict[str, Any]) -> list[dict[str, Any]]:
    candidates = [dict(c) for c in found["candidates"]]
    for c in candidates:
        if c["name"] == "x0" and path.get("source_is_noise"):
            c["name"] = "x0 (the source noise: an eps target)"
    return candidates


def _path_end(path: dict[str, Any]) -> Any:
    """For t in timestep units: the normalised t where the fitted path reaches its far end (x1 for t=1 at the data,
    x0 for t=1 at the source), when that is well inside [0, 1] (t over 0..500 read as 0..0.5); else None."""
    fit = path.get("fit") or {}
    ends = fit.get("ends")
    if not path.get("t_scale") or not ends:
        return None
    t_hi = ends["t"][1]
    a_hi, b_hi = ends["a"][1], ends["b"][1]
    reached = (abs(b_hi - 1) < 0.05 and abs(a_hi) < 0.05) or (abs(a_hi - 1) < 0.05 and abs(b_hi) < 0.05)
    return t_hi if reached and 0.05 < t_hi < 0.9 else None


def _judge_match(path: dict[str, Any], found: dict[str, Any], th: Any, out: _Findings,
                 subject: str, cap: Verdict = Verdict.FAIL, caveat: str = "") -> bool:
    """Judge ``found``'s cos / norm ratio against the path velocity (``subject``: "v_target" or "implied target")
    and name the candidate it resembles; True when it matches."""
    general_fix = ("Train the output toward the time derivative of your own x_t: for x_t = a(t) x0 + b(t) x1 it is "
                   "a'(t) x0 + b'(t) x1, detached (x_t = (1-t) x0 + t x1 -> x1 - x0; x_t = t x0 + (1-t) x1 -> "
                   "x0 - x1; x_t = cos(pi t/2) x0 + sin(pi t/2) x1 -> pi/2 (cos(pi t/2) x1 - sin(pi t/2) x0)).")
    label = "the loss's implied target" if subject != "v_target" else "v_target"
    if path.get("prediction", "velocity") != "velocity":
        return _judge_declared(path, found, th, out, subject, label)
    cos, ratio = found["cos_median"], found["ratio_median"]
    cos_m = at_least(f"median cos({subject}, path velocity)", cos, warn=th.cos_warn, fail=th.cos_fail)
    identified = next((c for c in _candidate_list(path, found) if c["cos"] >= IDENTIFIED and "path velocity" not in
                       c["name"]), None)
    if cos_m.verdict is Verdict.WARN and identified is not None:
        # not a near miss: the target IS another quantity (e.g. the path velocity without its noise term)
        cos_m = cos_m.model_copy(update={"verdict": Verdict.FAIL})
    ratio_m = ratio_within(f"median ||{subject}|| / ||path velocity||", ratio, warn_factor=th.norm_ratio_warn,
                           fail_factor=th.norm_ratio_fail)
    end = _path_end(path)
    in_span_units = end is not None and ratio_m.verdict is not Verdict.PASS and ratio_within(
        "", ratio / end, warn_factor=th.norm_ratio_warn, fail_factor=th.norm_ratio_fail).verdict is Verdict.PASS
    if in_span_units:  # right per t / (the span of t), wrong per t / (power of ten): which one the sampler uses?
        ratio_m = ratio_m.model_copy(update={"verdict": Verdict.WARN})
    cos_m, ratio_m = (m.model_copy(update={"verdict": cap}) if m.verdict.severity > cap.severity else m
                      for m in (cos_m, ratio_m))
    out.add(cos_m)
    out.add(ratio_m)
    out.add(info(f"5th percentile cos ({subject})", found["cos_p05"]))
    samples = found["cos_samples"]
    share = sum(1 for c in samples if c < th.cos_fail) / len(samples) if samples else 0.0
    share_m = out.add(at_most(f"share of samples with cos < {th.cos_fail:g}" + (f" ({subject})" if subject !=
                                                                                 "v_target" else ""),
                              share, warn=th.disagree_share_warn, fail=None))
    if subject == "v_target":
        combo = path["v_combination"]
        out.add(info("v_target ~ c x0 + d x1", f"c {combo['x0']:.3g}, d {combo['x1']:.3g}",
                     expected=f"c = a'(t), d = b'(t): {_path_velocity_text(path)}"))
    velocity_text = _path_velocity_text(path)
    candidates = _candidate_list(path, found)
    if cos_m.verdict is not Verdict.PASS:
        best = candidates[0]
        alike = [c["name"] for c in candidates if c["cos"] >= best["cos"] - TIE]
        best = next((c for c in candidates if c["name"] in alike and "noise term" in c["name"]), best)
        concrete = [n for n in alike if "path velocity" not in n]
        if "minus the path velocity (flipped sign)" in alike:
            what = f"{label} has the flipped sign"
            if concrete:
                what += f" (it is {concrete[0]})"
            problem = f"{what}: median cos {cos:.3f} with the path velocity"
            fix = f"Negate the target: train toward d x_t / dt ({velocity_text}). " + general_fix
        elif best["cos"] >= th.cos_warn and best["name"] != "the path velocity":
            ratio_text = f", norm ratio {best['ratio']:.3g}"
            problem = (f"{label} is not the path velocity (median cos {cos:.3f}); it is {best['name']} "
                       f"(cos {best['cos']:.3f}{ratio_text})")
            fix = f"{_candidate_fix(best['name'])}. ".lstrip(". ") + general_fix + f" Here: {velocity_text}."
        else:
            near = ", ".join(f"{c['name']} (cos {c['cos']:.2f})" for c in candidates[:3])
            problem = f"{label} is not the path velocity: median cos {cos:.3f}; closest candidates: {near}"
            fix = general_fix + f" Here: {velocity_text}."
        out.issues.append((cos_m.verdict, problem + caveat, fix))
    elif in_span_units:
        span = path["t_scale"] * end
        out.issues.append((ratio_m.verdict,
                           f"{label} is {_fmt_ratio(ratio)} the velocity per t / {path['t_scale']:g}, but "
                           f"{_fmt_ratio(ratio / end)} the velocity per t / {span:.4g}: the path reaches its end at "
                           f"raw t {span:.4g}, so t may be in units of {span:.4g} timesteps" + caveat,
                           f"If t runs over 0..{span:.4g} (num_train_timesteps) and the sampler integrates over "
                           f"t / {span:.4g}, this is right; if it integrates over t / {path['t_scale']:g}, scale the "
                           "target. Returning t in [0, 1] (as the sampler integrates it) settles it."))
    elif ratio_m.verdict is not Verdict.PASS:
        out.issues.append((ratio_m.verdict,
                           f"{label} is {_fmt_ratio(ratio)} the path velocity (median norm ratio; cos {cos:.3f}): "
                           "a mis-scaled target" + caveat,
                           "Remove the extra factor from the target: it must be exactly d x_t / dt "
                           f"({velocity_text}). If the sampler integrates in another time variable (e.g. "
                           "phi = pi t / 2), return that variable as t."))
    if share_m.verdict is not Verdict.PASS and cos_m.verdict is Verdict.PASS:
        out.issues.append((share_m.verdict,
                           f"{share:.0%} of the samples have cos < {th.cos_fail:g} with the path velocity although "
                           f"the median is {cos:.3f}: the target is wrong for part of the batch or of the t range",
                           "Compare the target with d x_t / dt per t range; look for a branch on t (clamping, a "
                           "different formula near t=0 or t=1)."))
    fit = path["fit"]
    matched = cos_m.verdict is Verdict.PASS and ratio_m.verdict is Verdict.PASS
    if matched and subject == "v_target":
        out.good.append(f"v_target = path velocity (median cos {cos:.4f}, norm ratio {ratio:.3f}; "
                        f"{fit['direction']})")
    return matched


DECLARED = {"epsilon": ("x0", "the source noise x0"), "sample": ("x1", "the data x1")}


def _judge_declared(path: dict[str, Any], found: dict[str, Any], th: Any, out: _Findings,
                    subject: str, label: str) -> bool:
    """A declared ``prediction`` other than velocity: the target must be the source noise (epsilon) or the data
    (sample), judged on the medians of the candidate table."""
    prediction = path["prediction"]
    key, name = DECLARED[prediction]
    entry = next(c for c in found["candidates"] if c["name"] == key)
    cos, ratio = entry["cos"], entry["ratio"]
    cos_m = out.add(at_least(f"median cos({subject}, {key})", cos, warn=th.cos_warn, fail=th.cos_fail))
    ratio_m = out.add(ratio_within(f"median ||{subject}|| / ||{key}||", ratio, warn_factor=th.norm_ratio_warn,
                                   fail_factor=th.norm_ratio_fail))
    matched = cos_m.verdict is Verdict.PASS and ratio_m.verdict is Verdict.PASS
    if not matched:
        best = _candidate_list(path, found)[0]
        worst = cos_m.verdict if cos_m.verdict.severity >= ratio_m.verdict.severity else ratio_m.verdict
        out.issues.append((worst, f"{label} is not {name}, what the declared prediction '{prediction}' means "
                                  f"(median cos {cos:.3f}, norm ratio {ratio:.3g}); it resembles {best['name']} "
                                  f"(cos {best['cos']:.3f})",
                           f"Either train the output toward {name} (prediction '{prediction}') or declare the "
                           "prediction the loss trains (pipeline field 'prediction': 'velocity', 'epsilon' or "
                           "'sample'), so the sampler converts the right quantity."))
    elif subject == "v_target":
        out.good.append(f"v_target = {name} as the declared prediction '{prediction}' (median cos {cos:.4f})")
    return matched


NEGATIVE_WEIGHT_FIX = ("A loss weight must be >= 0 for every t: a negative weight maximises the error there and "
                       "trains the output away from its target. Check the sign of the weighting formula (e.g. "
                       "diffusers' compute_loss_weighting_for_sd3) and of any factor multiplied into the loss.")


def _judge_implied(implied: dict[str, Any], path: dict[str, Any], th: Any, out: _Findings) -> bool:
    """The implied-target audit; True when it decided the target verdict (the step's v_target is then a
    cross-check)."""
    if not implied.get("ok"):
        out.add(info("implied target", f"not measured: {implied.get('reason', '?')}",
                     expected="the loss gradient w.r.t. the velocity module's output"))
        return False
    weight = implied["weight"]
    compared = bool(implied.get("compared"))
    # the module was found by hooks, the step's v_pred is not its output and v_target matches the path: the two
    # audits disagree and fmcheck cannot tell which module the sampler integrates, so the implied audit only warns
    found_by_hooks = implied.get("how") != "pipeline field 'velocity'"
    adapter_ok = path.get("cos_median", -1.0) >= th.cos_warn and \
        1 / th.norm_ratio_warn <= path.get("ratio_median", 0.0) <= th.norm_ratio_warn
    undecided = found_by_hooks and implied.get("v_pred_is_raw") is False and adapter_ok
    cap, caveat = Verdict.FAIL, ""
    if undecided:
        cap = Verdict.WARN
        caveat = (f" (while the step's v_target matches the path velocity; {implied['module']} was found by forward "
                  "hooks: declare the pipeline field 'velocity' to settle which output the sampler uses)")
    matched = compared and _judge_match(path, implied, th, out, subject="implied target", cap=cap, caveat=caveat)
    if compared and implied.get("candidates"):
        ranked = _candidate_list(path, implied)
        alike = [c for c in ranked if c["cos"] >= ranked[0]["cos"] - TIE]
        best = next((c for c in alike if c["name"] == "the path velocity"), alike[0])
        same = [c["name"] for c in alike if c is not best and "path velocity" not in c["name"]]
        named = best["name"] + (f" = {same[0]}" if same else "")
        out.add(info("implied target resembles", f"{named} (cos {best['cos']:.4f}, norm ratio {best['ratio']:.3g})",
                     expected="the path velocity (or the declared prediction)"))
    out.add(info("velocity module (implied audit)", implied["module"], expected=implied["how"]))
    if implied.get("calls", 1) > 1:
        out.add(info("velocity module calls per step", implied["calls"], expected="the first call is audited"))
    negative = weight["negative_share"]
    out.add(at_most("share of samples with a negative loss weight", negative, warn=None, fail=0.0),
            f"the loss weight is negative for {negative:.0%} of the samples (implied k_i from the loss gradient): "
            "the loss trains the output away from its target there",
            NEGATIVE_WEIGHT_FIX)
    out.add(info("implied weight k(t) / median", weight["describe"],
                 expected=f"spread {weight.get('spread', float('nan')):.3g}x, "
                          f"{implied['zero_weight_share']:.0%} of samples with zero weight"))
    if not compared:
        out.add(info("implied target vs path velocity", f"not compared: {implied['not_compared']}"))
        return False
    if matched:
        relabel = ""
        if path.get("prediction", "velocity") == "velocity" and path.get("cos_median", 1.0) < th.cos_warn:
            relabel = (f"; the step's v_target is a relabelled target (median cos {path.get('cos_median', 0):.3f} "
                       "with the path velocity): the loss preconditions the output")
        key, toward = DECLARED.get(path.get("prediction", "velocity"), ("", "the path velocity"))
        entry = next((c for c in implied["candidates"] if c["name"] == key),
                     {"cos": implied["cos_median"], "ratio": implied["ratio_median"]})
        out.good.append(f"the loss trains the raw output of {implied['module']} toward {toward} (median "
                        f"cos {entry['cos']:.4f}, norm ratio {entry['ratio']:.3f}; "
                        f"{path['fit']['direction']}); loss weight {weight['describe']}{relabel}")
    return True


def _norm_text(value: float) -> str:
    return f"{value:.3g}"


def _judge_autograd(grad: dict[str, Any], out: _Findings) -> None:
    moving = grad["moving_target"]
    out.add(flag("trainable parameters v_target reaches", not moving, value=len(moving), expected="0"),
            f"moving target: v_target carries autograd history into {len(moving)} trainable parameter(s) "
            f"({', '.join(moving[:4])}{', ...' if len(moving) > 4 else ''})",
            DETACH_FIX)
    for note in grad.get("notes_info", []):
        out.add(info("gradient map", note))
    for note in grad["notes"]:
        out.add(flag("gradient map", False, value=note, bad=Verdict.WARN), note,
                "Make the step compute its loss with autograd enabled for the trainable modules.")
    for key in grad["terms_without_graph"]:
        if key == "kl":
            continue  # judged with the KL path below
        out.add(flag(f"{key} has an autograd graph", False, value=False, bad=Verdict.FAIL),
                f"'{key}' carries no gradient at all (computed under no_grad, detached, or a Python number)",
                f"Compute '{key}' from tensors with autograd history; training calls loss.backward() on it.")
    grads = grad["grads"]
    fm_key = grad["fm_key"]
    roles = grad["roles"]
    fm = grads.get(fm_key) if fm_key is not None else None
    good: list[str] = []
    if fm is not None:
        _judge_fm_paths(grad, fm_key, fm, out)
        good.append(f"{fm_key} -> " + ", ".join(f"{m} {_norm_text(n)}" for m, n in sorted(fm["modules"].items())
                                                if grad["modules"].get(m) == "trainable" and n > 0))
    if "kl" in grads:
        kl = grads["kl"]
        kl_tiny = ZERO_REL * max([*kl["modules"].values(), 0.0])
        others = {m: n for m, n in kl["modules"].items()
                  if grad["modules"].get(m) == "trainable" and m not in roles["head"] and n > kl_tiny and n > 0}
        if grad["has_head"]:
            to_head = kl["roles"]["head"]
            out.add(flag("kl reaches the head", to_head > 0, value=to_head, expected="> 0", bad=Verdict.WARN),
                    "kl carries no gradient to the head",
                    "Compute kl from the head's mu and logvar with autograd (not detached).")
        out.add(flag("kl reaches modules other than the head", not others, value=", ".join(sorted(others)) or "none",
                     expected="none", bad=Verdict.WARN),
                f"kl sends gradient into {', '.join(sorted(others))}, not only the head",
                "The KL of q(z0|text) against N(0, I) depends on the head's mu and logvar only.")
        good.append("kl -> " + (", ".join(roles["head"]) or "nothing"))
    elif "kl" in grad["terms_without_graph"]:
        out.add(flag("kl has an autograd graph", not grad["has_head"], value=False,
                     expected="a graph to the head" if grad["has_head"] else "", bad=Verdict.WARN),
                "kl carries no gradient (computed under no_grad, detached, or a Python number): the KL term does "
                "not train the head",
                "Compute kl from the head's mu and logvar with autograd (not detached).")
    elif "kl" in grad["terms_absent"]:
        out.add(info("kl gradient path", "no kl output: KL path not audited"))
        good.append("no kl output: KL path not audited")
    frozen_hits: dict[str, float] = {}
    for label in ("loss", "fm_loss", "kl"):
        entry = grads.get(label)
        if entry:
            for module, norm in entry["modules"].items():
                if grad["modules"].get(module) == "frozen" and norm > 0:
                    frozen_hits[module] = max(frozen_hits.get(module, 0.0), norm)
    out.add(flag("gradient into frozen modules", not frozen_hits,
                 value=", ".join(f"{m} {_norm_text(n)}" for m, n in sorted(frozen_hits.items())) or "none",
                 expected="none"),
            f"frozen module(s) {', '.join(sorted(frozen_hits))} receive gradient "
            f"(|grad| {', '.join(_norm_text(n) for n in frozen_hits.values())})",
            "Freeze them (module.requires_grad_(False)) and run them under torch.no_grad() (e.g. the VAE encode "
            "that makes z1): they are not trained, and their graph costs memory and time.")
    if grads:
        silent = [m for m, group in grad["modules"].items() if group == "trainable"
                  and sum(grads[k]["modules"].get(m, 0.0) for k in ("loss", "fm_loss", "kl") if k in grads) <= 0]
        already = set(roles["velocity"]) | (set(roles["head"]) if grad["has_head"] else set())
        silent = [m for m in silent if m not in already]
        out.add(flag("trainable modules with no gradient", not silent, value=", ".join(silent) or "none",
                     expected="none", bad=Verdict.WARN),
                f"trainable module(s) {', '.join(silent)} get no gradient from loss, fm_loss or kl at step 0",
                "Every module the optimizer trains must be reached by the loss; check for detach/no_grad, or drop "
                "the module from `trainable`.")
    if good:
        out.good.append("; ".join(good))


def _judge_fm_paths(grad: dict[str, Any], fm_key: str, fm: dict[str, Any], out: _Findings) -> None:
    """fm_loss must reach the velocity net, the head through x_t, and nothing through v_target."""
    grads = grad["grads"]
    roles = grad["roles"]
    tiny = ZERO_REL * max([*fm["modules"].values(), 0.0])
    for module, norm in sorted(fm["modules"].items()):
        if grad["modules"].get(module) == "trainable":
            out.add(info(f"|grad {fm_key}| {module}", norm, note="the gradient norm it sends this module"))
    if roles["velocity"]:
        v_norm = fm["roles"]["velocity"]
        out.add(flag(f"{fm_key} reaches the velocity net", v_norm > tiny and v_norm > 0, value=v_norm,
                     expected="> 0"),
                f"the velocity net ({', '.join(roles['velocity'])}) gets no gradient from {fm_key}",
                "Compute v_pred with autograd (no torch.no_grad(), .detach() or .data on the way from the velocity "
                "net to the loss).")
    via_target = grads.get(f"{fm_key} via v_target")
    if via_target is not None:
        hit = {m: n for m, n in via_target["modules"].items() if n > tiny and n > 0}
        out.add(flag(f"{fm_key} gradient through v_target", not hit, value=max(hit.values()) if hit else 0.0,
                     expected="0"),
                f"gradient flows through the target into {', '.join(sorted(hit))} "
                f"(|grad| {', '.join(_norm_text(n) for n in hit.values())})",
                DETACH_FIX)
    if grad["has_head"] and not grad.get("xt_returned", True):
        out.add(info(f"{fm_key} reaches the head through x_t", "not measured: the step returns no 'xt'"))
    elif grad["has_head"]:
        h_norm = fm["roles"]["head"]
        via_xt = grads.get(f"{fm_key} via xt")
        xt_norm = via_xt["roles"]["head"] if via_xt else 0.0
        out.add(flag(f"{fm_key} reaches the head through x_t", xt_norm > tiny and xt_norm > 0, value=xt_norm,
                     expected="> 0", bad=Verdict.WARN),
                f"the head ({', '.join(roles['head'])}) gets no gradient from {fm_key} through x_t "
                f"(total {_norm_text(h_norm)}): the reparameterisation path is closed (z0 detached before x_t)",
                "Build x_t from the reparameterised sample z0 = mu + sigma * eps without .detach(): the FM loss "
                "must train the head through x_t (only the target is detached).")
    elif not grad["has_mu"]:
        out.add(info("head", "none: the source is not produced by a trainable module"))


def _judge_precision(prec: dict[str, Any], out: _Findings) -> None:
    dtypes = prec["dtypes"]
    full = ("torch.float32", "torch.float64")
    if dtypes["xt"] in HALF and dtypes["x0"] in full and dtypes["x1"] in full:
        out.add(flag("x_t dtype", False, value=dtypes["xt"], expected="float32 like x0, x1", bad=Verdict.WARN),
                f"x_t is {dtypes['xt']} while x0 and x1 are float32: the path is built in half precision",
                "Build x_t in float32 ((1 - t) * x0 + t * x1 on float32 tensors), then cast where the network "
                "needs it (autocast does this for its inputs).")
    shares = prec["half_exact_share"]
    if "xt" in shares and dtypes["xt"] in full:
        for half in ("float16", "bfloat16"):
            xt_share = shares["xt"][half]
            base = max(shares.get("x0", {}).get(half, 0.0), shares.get("x1", {}).get(half, 0.0))
            quantised = xt_share >= 0.99 and xt_share - base >= 0.5
            if quantised:
                out.add(flag("x_t values exact in half precision", False, value=xt_share,
                             expected=f"about the share of x0, x1 ({base:.2g})", bad=Verdict.WARN),
                        f"x_t is {dtypes['xt']} but {xt_share:.1%} of its values are exact {half} numbers (x0, x1: "
                        f"{base:.1%}): it was computed in {half} and cast back",
                        "Build x_t in float32 from float32 x0, x1 (outside autocast or with explicit .float()), "
                        "then cast.")
                break
    # (shapes: fmcheck's core already rejects step outputs whose latent-space shapes disagree)
    if dtypes["v_pred"] is not None and dtypes["v_target"] is not None and dtypes["v_pred"] != dtypes["v_target"]:
        lossy = dtypes["v_target"] in HALF and dtypes["x0"] in full
        out.add(flag("v_pred / v_target dtypes", not lossy, value=f"{dtypes['v_pred']} / {dtypes['v_target']}",
                     expected="v_target in float32", bad=Verdict.WARN),
                f"v_target is {dtypes['v_target']}: the target itself is rounded to half precision",
                "Compute v_target in float32 and the loss in float32 (F.mse_loss(v_pred.float(), v_target)).")
