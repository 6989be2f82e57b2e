"""The phrases the `overfit` rules' messages share (the fit in numbers, what a pass needs, the regime), computed from
the evidence and passed to the templates as fields."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import maths as om

if TYPE_CHECKING:
    from .rules import Evidence

GENERIC = "go back to scale, target and gradients (`fmcheck all`)"


def percent(fraction: float, sign: bool = False) -> str:
    """0.123 -> '12%' ('+12%' with sign); rounding never shows '-0%'."""
    value = round(100 * fraction)
    if value == 0:
        return "0%"
    return f"{value:+d}%" if sign else f"{value:d}%"


def progress(ev: Evidence) -> str:
    """The fit from the start to the last checkpoint, in numbers."""
    i, f = ev.initial, ev.final
    if ev.has_v:
        return (f"fm_loss {i.fm:.3g} -> {f.fm:.3g} (relative to mean v_target^2 {i.rel:.2f} -> {f.rel:.2f}, "
                f"{percent(-ev.fall, sign=True)}), cos {i.cos:.2f} -> {f.cos:.2f}")
    return (f"{ev.loss_name} {i.fm:.3g} -> {f.fm:.3g} ({percent(-ev.fall, sign=True)}; no v_pred, v_target: "
            "judged on the loss alone)")


def needs(ev: Evidence, th) -> str:
    cos = ev.cos_needed(th)
    fall = f"a pass needs a relative fall of {ev.drop_needed(th):.0%}"
    return fall + (f" and cos >= {cos:.2f}" if cos is not None else "")


def so_far(ev: Evidence, th) -> str:
    if ev.initial is None or ev.final is None:
        return ", before the first checkpoint"
    return f": {progress(ev)} ({needs(ev, th)})"


def regime(ev: Evidence) -> str:
    return "" if ev.replayed else (f"; fresh randomness each pass ({', '.join(ev.changed_outputs)} changed), "
                                   "judged on the fall, not on an absolute cos")


def scale_text(ev: Evidence) -> str:
    return f"||x0||/||x1|| {ev.initial.ratio:.3g} -> {ev.final.ratio:.3g}" if ev.final.ratio is not None else ""


def because(ev: Evidence) -> str:
    """What keeps the run from learning, when the numbers show it: modules outside the optimizer, silent ones."""
    causes = []
    if ev.missing:
        causes.append("the optimizer does not hold " + ", ".join(f"'{m}' ({n} of {total} parameters)"
                                                                  for m, n, total in ev.missing))
    if ev.quiet:
        causes.append(", ".join(f"'{m}'" for m in ev.quiet) + (" receives" if len(ev.quiet) == 1 else " receive")
                      + " no gradient")
    return f" ({'; '.join(causes)})" if causes else ""


def also_fixes(ev: Evidence) -> str:
    """The fixes the numbers name besides going back to the other checks (modules outside the optimizer, silent)."""
    fixes = (["add the missing parameters to the optimizer"] if ev.missing else []) + (
        [f"compute v_pred with autograd from {', '.join(ev.quiet)} (no torch.no_grad, .detach(), .data)"]
        if ev.quiet else [])
    return "; and " + "; ".join(fixes) if fixes else ""


def more_time(ev: Evidence) -> str:
    return f"--time-budget {max(2 * ev.time_budget, 60):.0f}"


def passed(ev: Evidence, th) -> str:
    """The row's summary when no finding counts: what was measured."""
    if ev.final is None or ev.initial is None:
        return f"stopped at step {ev.step} ({ev.outcome.replace('_', ' ')})"
    fit = progress(ev) + (f", {scale_text(ev)}" if scale_text(ev) else "")
    if ev.outcome == om.PASSED:
        return f"overfits {ev.samples} samples in {ev.step} steps: {fit}{regime(ev)}"
    return f"stopped at step {ev.step} ({ev.outcome.replace('_', ' ')}): {fit}{regime(ev)}"
