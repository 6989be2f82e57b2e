"""What the `overfit` check concludes, as rules over the recorded run.

The stop rule (``maths.evaluate``, applied by the training loop) decides *when* training stops and records the outcome
at that checkpoint; it belongs to measuring. The verdict comes from these rules: one per conclusion, each reading the
recorded outcome and the numbers behind it (curves, drift, optimizer coverage, replay verification, budget). A FAIL
rests on evidence counted in steps; a budget or a clock that ends the run first is a WARN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from fmcheck.findings import Hit, Rule
from fmcheck.verdict import Verdict

from . import maths as om
from . import words as w

OUTCOMES = (om.NONFINITE, om.SCALE_DRIFT, om.DIVERGED, om.PASSED, om.STALLED, om.BUDGET, om.OUT_OF_TIME,
            om.SCALE_MOVING, om.STOPPED, om.NOT_IN_OPTIMIZER, om.NO_GRADIENT, om.HUNG)


@dataclass(frozen=True)
class Reading:
    """Window means at one checkpoint (the initial one: over the first pass, before any update)."""

    step: int
    fm: float
    rel: float  # fm_loss / mean(v_target^2): the share of the target not yet explained
    cos: Optional[float] = None  # None when the step returns only its loss
    ratio: Optional[float] = None  # ||x0||/||x1||, None when the step does not expose x0 and x1
    drift: Optional[float] = None  # how far the ratio left the band between its start and 1 (a factor)

    @classmethod
    def of(cls, point: Optional[dict[str, Any]]) -> Optional["Reading"]:
        if point is None:
            return None
        return cls(step=point["step"], fm=point["fm"], rel=point["rel"], cos=point.get("cos"),
                   ratio=point.get("ratio"), drift=point.get("drift"))


@dataclass(frozen=True)
class Evidence:
    """The recorded run: where and why the stop rule stopped it, and the numbers the conclusions rest on."""

    outcome: str  # one of OUTCOMES: what the stop rule recorded at the checkpoint that decided
    step: int  # that checkpoint (steps run when a budget ended the run)
    initial: Optional[Reading]  # None when a step output was non-finite before any update
    final: Optional[Reading]  # the last checkpoint; None when no checkpoint was reached
    samples: int = 128
    replayed: bool = True  # the set's randomness was verified to replay on every pass
    changed_outputs: tuple[str, ...] = ()  # what differed between two calls of batch 0 (fresh randomness)
    loss_name: str = "fm_loss"
    nonfinite: tuple[str, ...] = ()  # outputs non-finite at `step`, in data-flow order ('grad': the gradient)
    before_training: bool = False  # ... already in the first pass, before any update
    no_gradient: tuple[str, ...] = ()  # modules whose gradient norm was 0 in every step up to `step`
    missing: tuple[tuple[str, int, int], ...] = ()  # (module, its parameters not in the optimizer, of how many)
    quiet: tuple[str, ...] = ()  # modules whose gradient norm was 0 over the last window
    drift: Optional[float] = None  # the scale drift at the deciding checkpoint
    projected_drift: Optional[float] = None  # the drift its recent trend reaches in as many steps again
    projected_fall: Optional[float] = None  # the relative fall optimistic trends reach by the budget's end
    projected_cos: Optional[float] = None
    best_cos: Optional[float] = None
    kl_weight: Optional[float] = None
    start_step: int = 0
    budget_steps: int = 300
    steps_run: int = 0
    time_budget: float = 60.0

    @classmethod
    def from_observation(cls, obs: dict[str, Any]) -> "Evidence":
        decision = obs["decision"]
        if decision["outcome"] not in OUTCOMES:
            raise ValueError(f"unknown overfit outcome {decision['outcome']!r}")
        trainable = obs["params_trainable"]
        return cls(
            outcome=decision["outcome"], step=decision["step"], initial=Reading.of(obs["initial"]),
            final=Reading.of(obs["points"][-1] if obs["points"] else None), samples=obs["samples"],
            replayed=obs["randomness"] == "replayed", changed_outputs=tuple(obs["changed_outputs"]),
            loss_name={"fm_loss": "fm_loss", "loss": "loss"}.get(obs["fm_source"], "MSE(v_pred, v_target)"),
            nonfinite=tuple(k.removeprefix("max:") for k in decision.get("keys") or ()),
            before_training=bool(decision.get("before_training")),
            no_gradient=tuple(decision.get("modules", ())) if decision["outcome"] == om.NO_GRADIENT else (),
            missing=tuple((m, n, trainable[m]) for m, n in obs["params_missing_from_optimizer"].items() if n),
            quiet=tuple(m for m, g in obs["module_grad_final"].items() if g is not None and g == 0.0),
            drift=decision.get("drift"), projected_drift=decision.get("projected_drift"),
            projected_fall=decision.get("projected_fm"), projected_cos=decision.get("projected_cos"),
            best_cos=obs["best_cos"], kl_weight=obs["kl_weight"], start_step=obs["start_step"],
            budget_steps=obs["budget_steps"], steps_run=obs["steps_run"], time_budget=obs["time_budget"])

    @property
    def has_v(self) -> bool:
        return self.initial is not None and self.initial.cos is not None

    @property
    def fall(self) -> float:
        """By which fraction the relative fm_loss fell from the start to the last checkpoint."""
        return 1.0 - self.final.rel / self.initial.rel if self.initial.rel > 0 else float("nan")

    def drop_needed(self, th) -> float:
        return th.loss_drop if self.replayed else th.fresh_loss_drop

    def cos_needed(self, th) -> Optional[float]:
        """The cos a pass needs: absolute with the set replayed, a share of the gap to 1 with fresh randomness."""
        if not self.has_v:
            return None
        return th.cos_pass if self.replayed else self.initial.cos + th.fresh_cos_gain * (1 - self.initial.cos)


# ------------------------------------------------------------------------------------------- the verdict tests
def _nonfinite(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.NONFINITE:
        return None
    keys = ev.nonfinite or ("?",)
    others = ["the gradient" if k == "grad" else k for k in keys[1:]]
    when = ("at the first forward, before any update" if ev.before_training
            else f"at overfit step {ev.step}, after {ev.step} update{'s' if ev.step != 1 else ''}")
    return Hit.of(observed=f"{keys[0]} at step {ev.step}", bound="all finite", when=when,
                  shown="the gradient (backward)" if keys[0] == "grad" else f"'{keys[0]}'",
                  step_index=ev.start_step + ev.step,
                  also=f", and so {'are' if len(others) > 1 else 'is'} {', '.join(others)}" if others else "")


def _weight(ev: Evidence) -> str:
    return f"{ev.kl_weight:.3g}" if ev.kl_weight is not None else "not exposed"


def _scale_drift(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.SCALE_DRIFT:
        return None
    rising = (f", while cos rose from {ev.initial.cos:.2f} to {ev.best_cos:.2f} (now {ev.final.cos:.2f})"
              if ev.has_v else "")
    return Hit.of(observed=ev.drift, bound=f"within {th.scale_fail:g}x", unit="x", drift=f"{ev.drift:.3g}",
                  limit=f"{th.scale_fail:g}", start=f"{ev.initial.ratio:.3g}", end=f"{ev.final.ratio:.3g}",
                  step=ev.step, rising=rising, weight=_weight(ev), start_step=ev.start_step)


def _diverged(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.DIVERGED:
        return None
    return Hit.of(observed=ev.final.fm / ev.initial.fm, bound=f"<= {th.diverge:g}", unit="x its start",
                  loss=ev.loss_name, rise=f"{ev.final.fm / ev.initial.fm:.3g}", limit=f"{th.diverge:g}",
                  step=ev.step, progress=w.progress(ev), because=w.because(ev))


def _not_in_optimizer(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.NOT_IN_OPTIMIZER:
        return None
    held = ", ".join(f"'{m}' ({n} of {total} parameters)" for m, n, total in ev.missing)
    return Hit.of(observed=sum(n for _, n, _ in ev.missing), bound="0", unit="params", held=held, step=ev.step,
                  progress=w.progress(ev))


def _no_gradient(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.NO_GRADIENT:
        return None
    return Hit.of(observed=0.0, bound="> 0", unit="grad norm", step=ev.step, progress=w.progress(ev),
                  modules=", ".join(f"'{m}'" for m in ev.no_gradient), names=", ".join(ev.no_gradient))


def _stalled(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.STALLED:
        return None
    cos = f" and cos {ev.projected_cos:.2f}" if ev.projected_cos is not None else ""
    return Hit.of(observed=ev.projected_fall, bound=f">= {th.trend_reach * ev.drop_needed(th):.3g}",
                  unit="relative fall, projected", budget=ev.budget_steps, step=ev.step, progress=w.progress(ev),
                  needs=w.needs(ev, th), reach=w.percent(ev.projected_fall), cos=cos, regime=w.regime(ev),
                  because=w.because(ev), also=w.also_fixes(ev))


def _scale_moving(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.SCALE_MOVING:
        return None
    projected = ev.projected_drift if ev.projected_drift is not None else ev.drift
    return Hit.of(observed=projected, bound=f"within {th.scale_fail:g}x", unit="x, projected",
                  progress=w.progress(ev), scale=w.scale_text(ev), step=ev.step, regime=w.regime(ev))


def _scale_loose(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.PASSED or ev.final is None or ev.final.drift is None:
        return None
    if om.spread(ev.final.drift) <= th.scale_warn:
        return None
    return Hit.of(observed=ev.final.drift, bound=f"within {th.scale_warn:g}x", unit="x", drift=f"{ev.final.drift:.3g}",
                  limit=f"{th.scale_warn:g}", samples=ev.samples, step=ev.step, progress=w.progress(ev),
                  scale=w.scale_text(ev), regime=w.regime(ev))


def _inconclusive(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome == om.OUT_OF_TIME:
        budget, bound = f"time budget ({ev.time_budget:g} s)", f"a verdict within {ev.time_budget:g} s"
        room = f"{w.more_time(ev)} (or run on a faster device)"
    elif ev.outcome == om.BUDGET:
        budget, bound = f"step budget ({ev.budget_steps} steps)", f"a verdict within {ev.budget_steps} steps"
        room = f"--max-steps {2 * ev.budget_steps}; if it still does not pass, {w.GENERIC}"
    else:
        return None
    return Hit.of(observed=ev.steps_run, bound=bound, unit="steps", budget=budget, so_far=w.so_far(ev, th),
                  regime=w.regime(ev), because=w.because(ev), room=room)


def _step_hung(ev: Evidence, th) -> Optional[Hit]:
    if ev.outcome != om.HUNG:
        return None
    return Hit.of(observed=ev.steps_run, bound=f"each step within {ev.time_budget:g} s and its grace", unit="steps",
                  budget=f"{ev.time_budget:g}", so_far=w.so_far(ev, th), more=w.more_time(ev))


def _rank_stopped(ev: Evidence, th) -> Optional[Hit]:
    return Hit.of(observed=0, bound="steps on every rank", unit="steps") if ev.outcome == om.STOPPED else None


# ------------------------------------------------------------------------------------------------ the table
_SCALE_FIX = ("hold the head's scale: raise the KL weight or check that its warmup ends (kl_weight {weight} at "
              "step_index {start_step}), bound the head's output scale (smaller init of its last layer, a lower "
              "head learning rate, a logvar clamp); fix the scale itself, do not add a ratio correction "
              "r = ||z1||/||z0||")
_WATCH = "watch ||x0||/||x1|| in training; if it keeps growing, raise the KL weight or bound the head's output scale"

RULES = (
    Rule("overfit.nonfinite", Verdict.FAIL, "A step output or the gradient turns NaN/Inf while training",
         "NaN/Inf: {shown} is non-finite {when} (step_index {step_index}){also}",
         "find where {shown} first goes non-finite: a log or sqrt of a non-positive value, a division by zero, exp "
         "of an unclamped logvar, an overflow in half precision; torch.autograd.set_detect_anomaly(True) names the "
         "operation",
         _nonfinite,
         covered_by=("kl.nonfinite", "structure.non_finite"),  # already non-finite before training: their finding
         doc="Every step records the largest |value| of each step output (and, without a grad scaler, the gradient "
             "norm); the first step where one is NaN or Inf fails the run at once, naming the first output in "
             "data-flow order (x1, mu, logvar, eps, x0, t, xt, v_target, v_pred, fm_loss, kl, loss): the most "
             "likely origin. In the first pass, before any update, it is a bug of the step itself. A correct "
             "pipeline does not produce it; under fp16 without a grad scaler, hand the scaler over. When the step's "
             "outputs are non-finite before any training (kl.nonfinite, structure.non_finite in the same run), "
             "this finding is listed as covered by theirs."),
    Rule("overfit.scale_drift", Verdict.FAIL, "The head's output scale runs away while the set is overfit",
         "scale drift: ||x0||/||x1|| went {start} -> {end} ({drift}x, limit {limit}x) by step {step}{rising}: the "
         "head's output scale runs away under a KL weight of {weight}",
         _SCALE_FIX, _scale_drift,
         covered_by=("kl.sign_flipped", "kl.weight_negative"),  # a KL that rewards leaving the prior: kl's cause
         doc="||x0||/||x1|| (mean per-sample norms, window means) is watched at every checkpoint; its drift is how "
             "far it leaves the band between its start and 1. Beyond `scale_fail` (3x) the run fails: with the "
             "target v* = x1 - x0 detached, the head can inflate z0 under a weak KL, and cos(v_pred, v*) then rises "
             "for the wrong reason. A correct pipeline whose KL holds the scale loosely may drift: raise "
             "`scale_fail` if the drift is intended. A KL with a flipped sign or a negative weight drives it: with "
             "kl.sign_flipped or kl.weight_negative in the same run, this finding is listed as covered by it."),
    Rule("overfit.diverged", Verdict.FAIL, "The loss diverges while the set is overfit",
         "diverged: {loss} rose to {rise}x its start (limit {limit}x) by step {step}: {progress}{because}",
         "lower the learning rate or clip gradients (the pipeline field 'before_optimizer_step' runs your clipping "
         "here); check that fm_loss and the weighted KL have the same normalisation (mean vs sum)",
         _diverged,
         doc="fm_loss (window mean) above `diverge` (10) times its initial value fails at once: on a fixed small "
             "set a working pipeline's loss falls. A learning rate too high for the optimizer, or a loss whose terms "
             "are normalised differently, sends it up. A correct pipeline with a deliberately aggressive learning "
             "rate can trip it: raise `diverge`."),
    Rule("overfit.not_in_optimizer", Verdict.FAIL, "Trainable parameters are missing from the optimizer",
         "cannot overfit: the optimizer does not hold {held}; after {step} steps {progress}",
         "add the missing parameters to the optimizer; then " + w.GENERIC,
         _not_in_optimizer,
         doc="At the first checkpoint, every trainable module's parameters (requires_grad) are looked up in the "
             "optimizer's param groups; a module with parameters it does not hold never learns. Counted per "
             "module. Intentionally frozen parameters belong with requires_grad=False or outside the trainable "
             "modules; then this does not fire."),
    Rule("overfit.no_gradient", Verdict.FAIL, "A trainable module receives no gradient",
         "cannot overfit: {modules} received no gradient in any of the first {step} steps; {progress}",
         "compute v_pred with autograd from {names} (no torch.no_grad, .detach(), .data); then " + w.GENERIC,
         _no_gradient,
         covered_by=("target.loss_without_graph",),  # a loss with no graph at all: no module can get gradient
         doc="The gradient norm of every trainable module is recorded at every step; a module whose norm was 0 in "
             "every step up to the first checkpoint is cut from the loss (v_pred under torch.no_grad, a .detach() "
             "or .data on its path). A module that is trainable but unused by the loss on purpose triggers it: "
             "leave it out of the trainable modules. When the `target` check finds the loss carries no graph at all "
             "(target.loss_without_graph) in the same run, this finding is listed as covered by it."),
    Rule("overfit.stalled", Verdict.FAIL, "The run will not overfit the set within the step budget",
         "will not overfit within {budget} steps: after {step} steps {progress} ({needs}); even optimistic trends "
         "reach only a {reach} fall{cos}{regime}{because}",
         w.GENERIC + "{also}",
         _stalled,
         doc="From `trend_after` (30%) of --max-steps on, the recent slopes of the relative fm_loss and of cos "
             "(least squares over the later half of the checkpoints) are extrapolated `trend_optimism` (2) times "
             "faster to the end of the budget; when they bring less than `trend_reach` (50%) of the improvement a "
             "pass needs on both measures, the run fails. A forecast: a correct run stuck on a long plateau with a "
             "very small learning rate can be failed; raise `trend_after` or lower `trend_reach`."),
    Rule("overfit.scale_moving", Verdict.WARN, "The scale had not settled when the step budget ended",
         "overfits ({progress}) but the scale had not settled by the end of the budget: {scale} in {step} "
         "steps{regime}",
         _WATCH, _scale_moving,
         doc="A pass needs the scale settled: the drift's recent trend, continued for as many steps again, within "
             "`scale_fail`. When the fit thresholds are met at the end of the step budget but that projection "
             "leaves the band, the run is a warning: the scale may still run away in training. Watch it there, or "
             "give the check more steps (--max-steps)."),
    Rule("overfit.scale_loose", Verdict.WARN, "The KL holds the head's scale only loosely",
         "overfits {samples} samples in {step} steps ({progress}), but the scale moved {drift}x on the way (warn "
         "beyond {limit}x): {scale}{regime}",
         "the KL held the head's scale only loosely: " + _WATCH, _scale_loose,
         doc="A run that passes with ||x0||/||x1|| having drifted beyond `scale_warn` (2x) out of the band between "
             "its start and 1 (but within `scale_fail`, and settled) is a warning: the KL holds the head's scale "
             "only loosely, and longer training may carry it further. A pipeline whose scale moves on purpose "
             "(a head still finding its scale from a far-off start) can raise `scale_warn`."),
    Rule("overfit.inconclusive", Verdict.WARN, "The step or time budget ended the run before a verdict",
         "inconclusive: the {budget} ended the run after {observed} steps, before a verdict{so_far}{regime}{because}",
         "give it more room, with the option whose budget ended the run: {room}",
         _inconclusive,
         doc="The run stops at the checkpoint that decides; when --max-steps is spent first (the last, partial "
             "window judged too) or the --time-budget ends (never judged on a partial window: where the clock "
             "stopped is not a checkpoint), there is no verdict: a warning, never a failure, naming the option that "
             "gives more room. A slow learning rate or a slow device is the usual reason on a correct pipeline."),
    Rule("overfit.step_hung", Verdict.WARN, "A training step blocked past the time budget",
         "inconclusive: a step exceeded the time budget ({budget} s) after {observed} steps{so_far}",
         "find what blocks the step (data loading, a lock, a collective); then {more}",
         _step_hung,
         doc="A step still running when the time budget plus a grace (a quarter of the budget, 1 to 30 s) has "
             "passed is interrupted, and the run is judged on nothing: a warning. A step that waits on data, a lock "
             "or a collective that never comes blocks training; a very slow step on a slow device needs a larger "
             "--time-budget."),
    Rule("overfit.rank_stopped", Verdict.WARN, "Stopped before training with the other ranks",
         "stopped before training, with the other ranks: one of them had a non-finite step output",
         "see the rank that reports the non-finite output (overfit.nonfinite) and fix that first",
         _rank_stopped,
         doc="Under torchrun every rank steps together (a DDP backward is a collective). When another rank has a "
             "non-finite step output before any update, no rank trains, and this rank's run has no verdict of its "
             "own: a warning. The merged report shows the failing rank's overfit.nonfinite finding."),
)
