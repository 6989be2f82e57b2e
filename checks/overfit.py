"""`overfit`: train the user's own step and optimizer on a fixed small set until the outcome is certain.

The seed's last step ("fix 128 samples; the FM MSE must fall, cos(u_theta, v*) rise and KL stay stable"), answered in
seconds: each sample's randomness is replayed on every pass, statistics accumulate on the device, the host reads them
at fixed checkpoints, and fixed rules (in ``checks/_overfit_math.py``) stop the run at the checkpoint that decides.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
from fmcheck.judges import at_least, at_most, flag, info, ratio_within
from fmcheck.verdict import Verdict

# Step outputs in the order data flows through a training step: when several turn non-finite at the same step,
# the first of them is the most likely origin.
DATAFLOW = ("x1", "mu", "logvar", "eps", "x0", "t", "xt", "v_target", "v_pred", "fm_loss", "kl", "kl_weight", "loss")
PROGRESS_INTERVAL_S = 0.5  # progress between checkpoints, from the clock (the device is read at checkpoints only)
REPLAY_SALT = 50_000  # batch k of the set draws from seed_everything(salt=REPLAY_SALT + k) on every pass
SETUP_MARGIN_S = 60.0  # per-check time limit = time budget + a step's grace + this (loading, first pass, judging)
MIN_WINDOW = 8  # steps per checkpoint window, at least (rounded up to whole passes over the set)
MAX_POINTS = 200  # checkpoints per run, at most (the window grows for long budgets)
UNKNOWN_TOTAL_START = 100_000  # first step index when the pipeline does not say how long its run is


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

    doc = CheckDoc(
        what=(
            "Takes the first training batches holding `--samples` samples (default 128; whole batches, so the "
            "actual count is reported) and trains on them, cycling through them, with the user's own `step`, "
            "`loss.backward()` (`grad_scaler.scale(loss).backward()`, `scaler.step`, `scaler.update` when the "
            "pipeline has a grad scaler) and the user's own optimizer as it is: its learning rate, its state "
            "(the trainable modules in train mode, as training runs). The pipeline's optional training extras run "
            "where a training loop runs them: `before_optimizer_step()` after backward (after "
            "`grad_scaler.unscale_(optimizer)` when there is a scaler) and before `optimizer.step()`, which is where "
            "gradient clipping goes; `lr_scheduler.step()` after each optimizer step.\n\n"
            "**The replayed set.** Before every call of the step on batch k of the set, python's, numpy's and "
            "torch's RNGs (CPU and every CUDA device, through the seeding all checks share) are seeded from "
            "(seed, k), so batch k draws the same t, source noise and reparameterisation eps on every pass, in the "
            "first pass and in training alike: the set is a fixed regression problem that a working pipeline can "
            "memorise, not a new one each pass. This is verified, not assumed: after the first pass, batch 0 runs "
            "once more at the same weights and the same seed, with the second pass's step_index; if any of x0, x1, "
            "t, eps, xt, v_target, mu, logvar or v_pred differs, the step draws from something the seeding does not "
            "reach (a generator fmcheck does not find, a sampler that keeps state, a re-pairing), the report names the "
            "outputs that changed, and the run is judged as a fresh-randomness run.\n\n"
            "**Two regimes.** With the randomness replayed, all of the loss is reducible: a pass needs the relative "
            "fm_loss (below) down by `loss_drop` (50%) and cos(v_pred, v_target) at `cos_pass` (0.8). With fresh "
            "randomness each pass the best prediction is a conditional mean: the loss has a floor of unknown "
            "height and cos a ceiling below 1, so a pass needs a fall of `fresh_loss_drop` (25%) and cos closing "
            "`fresh_cos_gain` (40%) of its initial gap to 1, i.e. cos >= cos0 + 0.4 (1 - cos0); the trend rule "
            "below forecasts against those. In both, no pass comes before `min_steps` (32) steps: a head's scale "
            "drift under a weak KL takes tens of steps to show.\n\n"
            "A step that returns only its `loss` (no `v_pred`, `v_target`) is judged on the loss alone: its fall "
            "relative to the start, by the same regime's share, with no cos; the report says so.\n\n"
            "**What is recorded.** First one pass over the set without autograd gives the initial values, at the "
            "weights as given. Then every step records on the device, without a host sync: fm_loss (the `fm_loss` "
            "output, else MSE(v_pred, v_target)) and the target's power mean(v_target^2), the batch mean of the "
            "per-sample cos(v_pred, v_target), the unweighted `kl`, the mean per-sample norms ||x0||, ||x1|| and "
            "||v_target||, the gradient norm of every trainable module, and the largest |value| of every step "
            "output (NaN/Inf show there). The host reads them at fixed checkpoints, every `window` steps (at least "
            "8, whole passes over the set), and evaluates the rules on window means there. The loss is judged "
            "relative to the target's power, fm_loss / mean(v_target^2) (the share of the target not yet "
            "explained), because v_target = x1 - x0 grows when the head inflates x0: the absolute fm_loss can then "
            "rise while the fit improves, or fall while it does not. The scale is watched as ||x0||/||x1||; its "
            "drift is how far it leaves the band between its start and 1 (moving towards the balanced ratio 1 is "
            "not drift).\n\n"
            "**Rules, in order, at each checkpoint.** FAIL, each on evidence counted in steps: a non-finite step "
            "output (or, without a grad scaler, gradient), naming the first in data-flow order (x1, mu, logvar, "
            "eps, x0, t, xt, v_target, v_pred, fm_loss, kl, loss) and its step; a scale drift beyond `scale_fail` "
            "(3x); fm_loss above `diverge` (10) x its start; at the first checkpoint, a trainable module with "
            "parameters the optimizer does not hold, or one whose gradient norm was 0 in every step; and "
            "*hopeless*: from `trend_after` (30%) of `--max-steps` on, the recent slopes of the relative fm_loss "
            "and of cos (least squares over the later half of the checkpoints), extrapolated `trend_optimism` (2) "
            "times faster to the end of `--max-steps`, bring less than `trend_reach` (50%) of the improvement a "
            "pass needs on both measures. PASS: the regime's thresholds met with the scale settled (the drift's "
            "recent trend, continued for as many steps again, stays within `scale_fail`); a drift beyond "
            "`scale_warn` (2x) on the way makes it a WARN. WARN \"inconclusive\", never FAIL, when the budget ends "
            "first: `--max-steps` spent undecided (the hint says `--max-steps 2N`), the `--time-budget` spent "
            "(the hint gives a larger `--time-budget`), or a step still running when the time budget plus a grace "
            "(a quarter of the budget, 1 to 30 s) has passed, which is interrupted (\"a step exceeded the time "
            "budget\").\n\n"
            "**Counted in steps, not seconds.** The run stops exactly at the checkpoint that decides, so the "
            "steps run, the curves and the verdict are the same on every run with the same seed on any machine; "
            "only the durations (the measurements in seconds and `details.timing`) differ. The clock only ends a "
            "run, as a warning. The per-check time limit is the time budget plus that grace plus 60 s, unless "
            "`--timeout` is given; a `--timeout` too short for the budget caps it, and the `time budget` "
            "measurement says so.\n\n"
            "Step indices: the overfit runs at step_index = total_steps // 2 onwards (100000 when total_steps is "
            "unknown; `start_step` overrides), i.e. past any KL warmup, so the KL term acts at the weight it has "
            "for most of training: at step 0 a warmed-up KL weight is 0, and a head that runs away under a weak KL "
            "would go unnoticed. Under torchrun all ranks step together and stop together at a checkpoint. "
            "Afterwards the runner restores the modules, the optimizer, grad scaler and LR scheduler state, the RNG "
            "states, modes and requires_grad flags, bit for bit, however the check ended."
        ),
        why=(
            "If a model cannot memorise 128 samples it will not learn a data set: something in scale, target or "
            "gradients is broken. The seed waits hours for this signal; most broken pipelines show it within a "
            "hundred steps, provided the set is really fixed. When each pass draws fresh t and noise, the 128 "
            "samples are a new regression problem every pass, the loss has a floor far above zero and small nets "
            "creep towards it: correct pipelines then fail an absolute bar. Measured with the replay switched off "
            "(every pass reseeded anew) and on, the same nets and optimizers, 400 steps, the thresholds set out of "
            "reach (`python scripts/overfit_regimes.py [--fresh] --never --max-steps 400 --at 40,72,144,400 "
            "SPEC`; fixtures.libs.* are the library fixtures):\n\n"
            "| pipeline | fresh randomness each pass | randomness replayed per batch |\n"
            "|---|---|---|\n"
            "| flow_matching CondOT, MLP velocity (`fixtures.libs.flow_matching_condot_mlp`) | fm_loss/mean(v*^2) "
            "1.00 -> 0.47, cos 0.73 | 1.00 -> 0.038, cos 0.98 |\n"
            "| torchcfm exact OT, MLP velocity (`fixtures.libs.torchcfm_exact_ot`) | 1.00 -> 0.47, cos 0.725 | "
            "1.00 -> 0.015, cos 0.99 |\n"
            "| diffusers SD3 loss, small SD3Transformer2DModel (`fixtures.libs.diffusers_sd3_plain`) | 1.10 -> "
            "0.083, cos 0.96 | 1.09 -> 0.056, cos 0.97 |\n"
            "| fmcheck's digits pipeline, cos at steps 40 / 72 / 144 | 0.68 / 0.69 / 0.77 | 0.88 / 0.975 / 1.00 |\n\n"
            "With the replay, every correct fixture (digits, its six correct variants, 18 library pipelines) "
            "passes with the default thresholds, in 32 to 144 steps on a 2-core CPU; with fresh randomness forced "
            "(`--fresh`), digits and 16 of the library pipelines pass the fresh-regime thresholds, in 32 to 136 "
            "steps.\n\n"
            "In this design the text head gets gradient through x_t while the target v* = x1 - x0 is detached, so "
            "with a weak KL the head can inflate z0: on a small DiT with a KL weight of 1e-2, ||z0||/||z1|| went "
            "from 0.99 to 100x by step 120 while cos(u, v*) still rose to 0.9 and the MSE grew ten-thousandfold: "
            "once x0 dominates v*, v* is easy to predict from x_t and cos rises for the wrong reason. A rising cos "
            "alone must not pass such a run, hence the scale watch. On the digits pipeline a KL weight of 1e-6 "
            "instead of 1.0 sends the ratio from 0.99 to 3.06x by step 56 with the randomness replayed, and to "
            "4.1x by step 24 with fresh randomness."
        ),
        bug_example=(
            "```python\n"
            "optimizer = AdamW(head.parameters(), lr=1e-3)          # the velocity net is never stepped\n"
            "\n"
            "@torch.no_grad()                                        # pasted from the sampler\n"
            "def predict_velocity(self, xt, t, q): return self.velocity(xt, t, q)\n"
            "\n"
            "loss = fm_loss + 1e-6 * kl                              # KL too weak to hold the head's scale\n"
            "kl = 0.5 * (mu**2 + var - 1 - torch.log(var)).mean()    # var = logvar: log of a negative\n"
            "```\n"
            "fmcheck reports, on the digits pipeline with each of these bugs (fixtures/bugs/overfit_*.py): the "
            "optimizer does not hold 'velocity' (1365760 of 1365760 parameters), at the first checkpoint (8 "
            "steps); 'velocity' received no gradient in any of the first 8 steps; scale drift, ||x0||/||x1|| "
            "0.99 -> 3.06 by step 56 while cos had reached 0.89; NaN/Inf, 'kl' non-finite at the first forward. "
            "The correct pipeline passes in 32 steps: relative loss 1.14 -> 0.30, cos 0.01 -> 0.84, "
            "||x0||/||x1|| 0.99 -> 1.01."
        ),
        fix=(
            "Follow the failure: a non-finite output names where to look (log/sqrt of a non-positive value, a "
            "division by zero, exp of an unclamped logvar); scale drift needs a stronger KL (its weight, or a warmup "
            "that ends) or a bounded head output scale (a smaller init of its last layer, a lower head learning "
            "rate, a logvar clamp), never a ratio correction; divergence needs a lower learning rate or gradient "
            "clipping (hand your clipping over as `before_optimizer_step`); a run that does not learn: put every "
            "trainable module in the optimizer, make sure v_pred is computed with autograd from the velocity net "
            "(no torch.no_grad, .detach() or .data), then go back to scale, target and gradients (`fmcheck all`). "
            "An inconclusive run says which option gives it more room (`--max-steps`, `--time-budget`). The "
            "pipeline's own generators that fmcheck finds (a DataLoader's, the step's closure or object; the report "
            "lists them) are reseeded per batch with the global RNGs. Randomness fmcheck cannot reach (a generator "
            "seeded from step_index, one held in an opaque object, a stateful sampler) makes the run a "
            "fresh-randomness one; hand such generators over in the pipeline field `generators`, or seed them from "
            "the global RNG, and the set is replayed."
        ),
        causes=(
            "trainable parameters missing from the optimizer (reported per module)",
            "v_pred cut from the velocity net's parameters (no_grad, detach, .data): the module gets no gradient",
            "KL weight too weak (or still warming up) for the head's output scale: ||x0||/||x1|| runs away",
            "NaN/Inf from a log or sqrt of a non-positive value, a division by zero, exp overflow of logvar",
            "learning rate too high (divergence) or too low for the budget (inconclusive; raise --max-steps)",
            "the optimizer's learning rate is 0 in every group and no lr_scheduler is handed over: skipped",
        ),
        blind_spots=(
            "A flipped target sign or a moving (non-detached) target still overfits: the model learns whatever "
            "target it is given. Those are the `target` check's to catch, not this one's.",
            "A pass shows the pipeline can memorise a small set at this learning rate, not that it generalises.",
            "An LR scheduler is stepped only when the pipeline hands it over (`lr_scheduler`); otherwise the "
            "optimizer's current learning rate is used. A very small learning rate can need more steps than the "
            "default budget (inconclusive, not a failure).",
            "Whole batches: a batch size above --samples overfits one whole batch (the count is reported).",
            "The replay verification compares one extra call of batch 0; randomness that only changes on later "
            "calls (a sampler that cycles after several calls) goes unnoticed and is judged as replayed.",
            "Fresh-randomness thresholds are looser (a fall, not memorisation): a pipeline that learns slowly "
            "for a wrong reason can pass them.",
            "Drift is measured against the scale at the start of the overfit: a pipeline whose ||x0||/||x1|| is "
            "already far from 1 is the `norms` check's finding.",
            "An `lr_scheduler` whose step() needs a metric (ReduceLROnPlateau) cannot be stepped here: leave it "
            "out of the pipeline.",
            "The hopeless rule is a forecast: a run stuck far from both thresholds that would later rise "
            "steeply can be failed; raise `trend_after` or lower `trend_reach` if you see that.",
        ),
    )

    # -------------------------------------------------------------------------------------------------- measure
    def measure(self, ctx) -> dict[str, Any]:
        import torch

        from fmcheck.context import StepOutputs, batch_size

        from . import _overfit_math as om

        thresholds = self.Thresholds(**ctx.settings.thresholds.get(self.id, {}))
        pipeline = ctx.pipeline
        optimizer, scaler = pipeline.optimizer, pipeline.grad_scaler
        extras = getattr(pipeline, "before_optimizer_step", None)
        scheduler = getattr(pipeline, "lr_scheduler", None)
        settings = ctx.settings

        lrs = [float(group.get("lr", 0.0)) for group in optimizer.param_groups]
        if lrs and max(abs(lr) for lr in lrs) == 0.0 and scheduler is None:
            raise Skip("the optimizer's learning rate is 0 in every param group (a warmup scheduler at its first "
                       "step?): nothing can train; set a non-zero lr on the optimizer the pipeline returns, or hand "
                       "the scheduler over as the pipeline field 'lr_scheduler'")

        batches = ctx.batches_for_samples(settings.samples)
        sizes = [batch_size(b) or 1 for b in batches]
        modules = pipeline.trainable_modules()
        module_params: dict[str, list] = {}
        seen: set[int] = set()
        for name, module in modules.items():
            params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in params)
            module_params[name] = params
        all_params = [p for params in module_params.values() for p in params]
        if not all_params:
            raise Skip("no trainable module has a parameter with requires_grad=True")
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = {name: sum(p.numel() for p in params if id(p) not in in_optimizer)
                   for name, params in module_params.items()}
        totals = {name: sum(p.numel() for p in params) for name, params in module_params.items()}

        start = thresholds.start_step
        if start is None:
            start = pipeline.total_steps // 2 if pipeline.total_steps else UNKNOWN_TOTAL_START
        epoch = len(batches)
        window = epoch * math.ceil(max(MIN_WINDOW, settings.max_steps / MAX_POINTS) / epoch)
        budget_note = _budget_note(settings, ctx.time_left())
        time_budget = budget_note["seconds"]

        for module in modules.values():
            module.train()

        def replay(index: int) -> None:
            """Batch k of the set draws the same t, source noise and eps on every pass: seeded from (seed, k)."""
            ctx.seed_everything(salt=REPLAY_SALT + index % epoch)

        def one_step(index: int):
            for param in all_params:
                param.grad = None
            optimizer.zero_grad(set_to_none=True)
            replay(index)
            with torch.enable_grad():
                out = pipeline.step(batches[index % epoch], start + index)
            loss = out["loss"]
            if scaler is not None:
                scaler.scale(loss).backward()
                if extras is not None:
                    scaler.unscale_(optimizer)  # the user's clipping sees true gradients, as in their loop
                    extras()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if extras is not None:
                    extras()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            return out

        # The initial values: one pass over the set at the weights as given, before any update (no autograd). Its
        # first output also tells which keys the step returns and where the statistics live. Then batch 0 once
        # more, at the same weights and seed but with the step_index of the second pass: equal outputs show the
        # set's randomness is replayed; different ones name what the step draws outside the seeded RNGs.
        for param in all_params:
            param.grad = None
        before = []
        with torch.no_grad():
            for i in range(epoch):
                replay(i)
                before.append(pipeline.step(batches[i], start + i))
            replay(0)
            again = pipeline.step(batches[0], start + epoch)
        first = StepOutputs(before[0], f"step(batch, step_index={start})")
        changed = _changed_outputs(torch, first, again)
        replayed = not changed
        del again
        tensor_keys = [k for k in first if isinstance(first[k], torch.Tensor) and first[k].is_floating_point()]
        watched = [k for k in DATAFLOW if k in tensor_keys] + [k for k in tensor_keys if k not in DATAFLOW]
        has_scale = all(k in tensor_keys for k in ("x0", "x1"))
        has_kl = "kl" in first and isinstance(first["kl"], (torch.Tensor, int, float))
        has_v = all(k in tensor_keys for k in ("v_pred", "v_target"))
        fm_source = ("fm_loss" if "fm_loss" in tensor_keys else "MSE(v_pred, v_target)" if has_v else "loss")
        scalars = ["loss", "fm", "grad", "power"] + (["cos", "v"] if has_v else [])
        scalars += (["x0", "x1"] if has_scale else []) + (["kl"] if has_kl else [])
        names = scalars + [f"grad:{m}" for m in module_params] + [f"max:{k}" for k in watched]
        columns = {name: i for i, name in enumerate(names)}
        device = first["loss"].device if isinstance(first["loss"], torch.Tensor) else first["v_pred"].device
        stats = torch.zeros(settings.max_steps, len(names), dtype=torch.float32, device=device)
        zero = torch.zeros((), dtype=torch.float32, device=device)
        kl_weight_seen = first.number("kl_weight") if "kl_weight" in first else None
        nonfinite_keys = [f"max:{k}" for k in watched] + ([] if scaler is not None else ["grad"])
        grad_norms = _GradNorms(torch, module_params, device)

        def flat(x):
            x = x.detach()
            return x.reshape(x.shape[0] if x.dim() else 1, -1)

        def record(row, out) -> None:
            """One row of statistics, computed and stored on the device: no host sync (a few fused kernels)."""
            with torch.no_grad():
                # per-sample norms of v_pred, v_target, x0, x1 (those there) in one call when their shapes agree
                parts = ([flat(out["v_pred"]), flat(out["v_target"])] if has_v else []) + (
                    [flat(out["x0"]), flat(out["x1"])] if has_scale else [])
                if parts and all(p.shape == parts[0].shape for p in parts):
                    norms = torch.linalg.vector_norm(torch.stack(parts, dim=1).float(), dim=2)  # (B, parts)
                elif parts:
                    norms = torch.stack([torch.linalg.vector_norm(p.float(), dim=1) for p in parts], dim=1)
                means = norms.mean(dim=0) if parts else None
                per_module, total = grad_norms()
                loss = _as_tensor(torch, out["loss"], device)
                values = {"loss": loss, "grad": total, "fm": loss, "power": zero + 1.0}
                if fm_source == "fm_loss":
                    values["fm"] = _as_tensor(torch, out["fm_loss"], device)
                if has_v:
                    vp, vt = parts[0].float(), parts[1].float()
                    vp_norm, vt_norm = norms[:, 0], norms[:, 1]
                    values["cos"] = ((vp * vt).sum(dim=1) / (vp_norm * vt_norm).clamp_min(1e-12)).mean()
                    if fm_source != "fm_loss":
                        values["fm"] = (vp - vt).pow(2).mean()
                    values["v"] = means[1]
                    values["power"] = vt_norm.pow(2).mean() / max(1, vt.shape[1])
                if has_scale:
                    values["x0"], values["x1"] = means[-2], means[-1]
                if has_kl:
                    values["kl"] = _as_tensor(torch, out["kl"], device)
                present = [out[k].detach() for k in watched if k in out and out[k].numel()]
                maxima = iter(_max_abs(torch, present))
                biggest = [next(maxima) if k in out and out[k].numel() else zero for k in watched]
                row.copy_(torch.cat([torch.stack([values[name] for name in scalars]), per_module,
                                     torch.stack(biggest)]))

        initial_stats = torch.zeros(epoch, len(names), dtype=torch.float32, device=device)
        for index, out in enumerate(before):
            record(initial_stats[index], out)
        del before, first
        initial_rows = initial_stats.tolist()
        rules = _rules(thresholds, replayed)
        tracker = om.Tracker(columns, epoch=epoch, window=window, rules=rules, nonfinite_keys=nonfinite_keys,
                             initial_rows=initial_rows,
                             not_in_optimizer=[name for name, count in missing.items() if count],
                             module_grad_keys=[f"grad:{m}" for m in module_params])
        # Under torchrun every rank must take the same number of steps (a DDP backward is a collective): the ranks
        # agree on stopping (all decided, or any out of budget) at each checkpoint.
        rank = getattr(ctx, "rank", None)
        distributed = rank is not None and getattr(rank, "world_size", 1) > 1
        if distributed and _ranks_agree_to_stop(torch, device, False, tracker.decision is not None) \
                and tracker.decision is None:  # another rank is non-finite before any update: nobody trains
            tracker.decision = om.Decision(om.STOPPED, 0, reason="stopped with the other ranks before training")
        # The host reads the device statistics exactly at the checkpoints (every `window` steps) and stops at the
        # one that decides: the steps run, like the verdict, are counted in steps, never in seconds. Between
        # checkpoints progress is reported from the clock, without reading the device.
        started, cpu_started = time.perf_counter(), time.process_time()
        done, read_upto, last_progress, hung = 0, 0, started, False
        seconds_to_verdict = 0.0
        decision = tracker.decision
        latest_fm = latest_cos = None
        training = decision is None
        with hang_limit(time_budget + _hang_grace(time_budget)) as hang:
            while training:  # until ``break``: under torchrun a rank keeps stepping after its verdict until all agree
                now = time.perf_counter()
                out_of_time = now - started >= time_budget and done < settings.max_steps
                out_of_budget = done >= settings.max_steps or out_of_time
                at_checkpoint = done % window == 0 or done >= settings.max_steps
                # under torchrun the ranks meet only at checkpoints (their clocks differ)
                if at_checkpoint or (out_of_time and not distributed):
                    if done > read_upto:
                        rows = stats[read_upto:done].tolist()  # the one host sync per checkpoint
                        read_upto = done
                        undecided = decision is None
                        decision = tracker.feed(rows, settings.max_steps)
                        if tracker.history:
                            latest_fm, latest_cos = tracker.history[-1].fm, tracker.history[-1].cos
                        if undecided:
                            seconds_to_verdict = time.perf_counter() - started
                    stop = decision is not None or out_of_budget
                    if distributed:
                        stop = _ranks_agree_to_stop(torch, device, decision is not None, out_of_budget)
                    if stop:
                        if decision is None:  # (under torchrun, possibly another rank's budget that ended)
                            decision = tracker.finish(settings.max_steps,
                                                      out_of_time=done < settings.max_steps)
                        break
                if now - last_progress >= PROGRESS_INTERVAL_S or done % window == 0:
                    last_progress = now
                    live = {"loss": latest_fm, "cos": latest_cos}  # as of the last checkpoint
                    ctx.progress(done, total=settings.max_steps, **{k: v for k, v in live.items() if v is not None})
                out = one_step(done)
                record(stats[done], out)
                del out
                done += 1
        if hang.fired:  # a step ran past the time budget and its grace: no verdict, and what ran so far
            hung = True
            if done > read_upto:
                tracker.feed(stats[read_upto:done].tolist(), settings.max_steps)
            decision = tracker.decision
            if decision is None or decision.outcome not in om.FAILURES:
                decision = tracker.hung(done)
            seconds_to_verdict = time.perf_counter() - started
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started

        initial = tracker.initial
        history = tracker.history
        points = [_point_dict(p, initial) for p in history] if initial is not None else []
        decided_at = max(1, min(decision.step, len(tracker.rows)))
        trained = tracker.rows[:decided_at]
        module_grads = {name: [row[columns[f"grad:{name}"]] for row in trained] for name in module_params}
        observation = {
            "samples": sum(sizes),
            "requested_samples": settings.samples,
            "batches": epoch,
            "window": window,
            "start_step": start,
            "kl_weight": kl_weight_seen,
            "lr": max(lrs) if lrs else None,
            "grad_scaler": scaler is not None,
            "extras": {"before_optimizer_step": extras is not None, "lr_scheduler": scheduler is not None},
            "fm_source": fm_source,
            "has_v": has_v,
            "has_scale": has_scale,
            "has_kl": has_kl,
            "randomness": "replayed" if replayed else "fresh",
            "changed_outputs": changed,
            "max_steps": settings.max_steps,
            "time_budget": time_budget,
            "budget_note": budget_note["note"],
            "budget_steps": settings.max_steps,
            "steps_run": done,
            "hung": hung,
            "timing": {"seconds_run": seconds, "cpu_seconds_run": cpu_seconds,
                       "seconds_to_verdict": seconds_to_verdict},
            "decision": {"outcome": decision.outcome, "step": decision.step, "reason": decision.reason,
                         "drift": decision.drift, "projected_fm": decision.projected_fm,
                         "projected_cos": decision.projected_cos, **decision.extra},
            "initial": _point_dict(initial, initial) if initial is not None else None,
            "points": points,
            "best_cos": max((p.cos for p in history if p.cos is not None), default=None),
            "grad_initial": om.mean([row[columns["grad"]] for row in trained[:epoch]]) if trained else None,
            "module_grad_initial": {n: om.mean(g[:epoch]) if g else None for n, g in module_grads.items()},
            "module_grad_final": {n: om.mean(g[-window:]) if g else None for n, g in module_grads.items()},
            "params_missing_from_optimizer": missing,
            "params_trainable": totals,
        }
        return observation

    # ---------------------------------------------------------------------------------------------------- judge
    def judge(self, obs: dict[str, Any], thresholds: OverfitThresholds) -> Judgement:
        from . import _overfit_math as om

        decision = obs["decision"]
        outcome, at = decision["outcome"], decision["step"]
        details = _details(obs, thresholds)  # the same curves whatever the verdict
        initial = obs["initial"]
        final = obs["points"][-1] if obs["points"] else None
        samples = obs["samples"]
        replayed = obs["randomness"] == "replayed"
        steps_text = f"{at} steps"
        randomness = ("replayed (every pass draws the same t, noise and eps)" if replayed else
                      f"fresh each pass: {', '.join(obs['changed_outputs'])} changed between two calls of batch 0 "
                      "with the same weights and seeds (a generator fmcheck cannot reach, a stateful sampler or a re-pairing "
                      "such as minibatch OT)")
        measurements = [info("samples", samples, "samples",
                             f"{obs['requested_samples']} requested, whole batches ({obs['batches']})"
                             if samples >= obs["requested_samples"] else
                             f"all the data holds ({obs['batches']} batches); {obs['requested_samples']} requested"),
                        info("steps to verdict", at, "steps", f"of a budget of {obs['budget_steps']}"),
                        info("seconds to verdict", round(obs["timing"]["seconds_to_verdict"], 2), "s"),
                        info("randomness of the set", "replayed" if replayed else "fresh", "", randomness),
                        info("time budget", round(obs["time_budget"], 2), "s", obs["budget_note"])]

        missing = {m: n for m, n in obs["params_missing_from_optimizer"].items() if n}
        silent = [m for m, g in obs["module_grad_final"].items() if g is not None and g == 0.0]
        causes = []
        if missing:
            causes.append("the optimizer does not hold " + ", ".join(
                f"'{m}' ({n} of {obs['params_trainable'][m]} parameters)" for m, n in missing.items()))
        if silent:
            causes.append(", ".join(f"'{m}'" for m in silent) + " receive" + ("s" if len(silent) == 1 else "")
                          + " no gradient")

        if outcome == om.STOPPED:
            return Judgement(measurements, "stopped before training, with the other ranks: one of them had a "
                             "non-finite step output", verdict=Verdict.WARN, details=details)
        if outcome == om.NONFINITE:
            keys = decision.get("keys") or []
            key = keys[0].removeprefix("max:") if keys else "?"
            shown = "the gradient (backward)" if key == "grad" else f"'{key}'"
            measurements.append(flag("first non-finite output", False, value=f"{key} at step {at}",
                                     expected="all finite"))
            others = ["the gradient" if k == "grad" else k.removeprefix("max:") for k in keys[1:]]
            when = ("at the first forward, before any update" if decision.get("before_training")
                    else f"at overfit step {at}, after {at} update{'s' if at != 1 else ''}")
            summary = (f"NaN/Inf: {shown} is non-finite {when} (step_index {obs['start_step'] + at})"
                       + (f", and so {'are' if len(others) > 1 else 'is'} {', '.join(others)}" if others else ""))
            hint = (f"find where {shown} first goes non-finite: a log or sqrt of a non-positive value, a division "
                    "by zero, exp of an unclamped logvar, an overflow in half precision; "
                    "torch.autograd.set_detect_anomaly(True) names the operation")
            if initial is not None and not math.isnan(initial["fm"]):
                measurements.append(info("fm_loss initial", initial["fm"]))
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.FAIL,
                             details=details)
        more_time = (f"--time-budget {max(2 * obs['time_budget'], 60):.0f}")
        if initial is None or final is None:  # a step hung before the first checkpoint
            summary = (f"inconclusive: a step exceeded the time budget ({obs['time_budget']:g} s) after "
                       f"{obs['steps_run']} steps, before the first checkpoint")
            return Judgement(measurements, summary, verdict=Verdict.WARN, details=details,
                             hint=f"find what blocks the step (data loading, a lock, a collective); then "
                                  f"{more_time}")

        has_v = initial["cos"] is not None  # else a step that returns only its loss: judged on the loss alone
        cos_needed = (None if not has_v else thresholds.cos_pass if replayed
                      else initial["cos"] + thresholds.fresh_cos_gain * (1 - initial["cos"]))
        drop_needed = thresholds.loss_drop if replayed else thresholds.fresh_loss_drop
        fm_fall = 1.0 - final["rel"] / initial["rel"] if initial["rel"] > 0 else float("nan")
        loss_name = {"fm_loss": "fm_loss", "loss": "loss"}.get(obs["fm_source"], "MSE(v_pred, v_target)")
        head = [measurements[1]]  # steps to verdict, then the numbers the verdict rests on
        if has_v:
            head.append(at_least("cos final", final["cos"], warn=None, fail=cos_needed))
        head.append(at_least(f"relative {loss_name} fall", fm_fall, warn=None, fail=drop_needed, unit="fraction"))
        if obs["has_scale"]:
            head.append(ratio_within("scale drift", final["drift"], warn_factor=thresholds.scale_warn,
                                     fail_factor=thresholds.scale_fail))
        if outcome in (om.SCALE_DRIFT, om.SCALE_MOVING):
            head.insert(1, head.pop())  # the scale first when it decides
        measurements = head + [measurements[0], measurements[3], measurements[2], measurements[4]]
        if has_v:
            measurements += [info("cos initial", initial["cos"]), info("cos best", obs["best_cos"])]
        else:
            measurements.append(info("cos(v_pred, v_target)", "not measured", "",
                                     "step output lacks 'v_pred', 'v_target': judged on the loss alone"))
        diverge_at = thresholds.diverge * initial["fm"]
        measurements += [info(f"{loss_name} initial", initial["fm"]),
                         at_most(f"{loss_name} final", final["fm"], warn=None, fail=diverge_at)  # divergence
                         if math.isfinite(diverge_at) and diverge_at > 0 else info(f"{loss_name} final", final["fm"])]
        if has_v:
            measurements += [info("fm_loss / mean(v_target^2) initial", initial["rel"]),
                             info("fm_loss / mean(v_target^2) final", final["rel"],
                                  "", "the share of the target not yet explained (its fall is judged above)")]
        if obs["has_scale"]:
            measurements += [info("||x0||/||x1|| initial", initial["ratio"]),
                             info("||x0||/||x1|| final", final["ratio"])]
        else:
            measurements.append(info("scale ratio", "not watched", "", "step output lacks 'x0' and 'x1'"))
        if has_v:
            measurements += [info("||v_target|| initial", initial["vnorm"]),
                             info("||v_target|| final", final["vnorm"])]
        if obs["has_kl"]:
            measurements += [info("kl initial", initial["kl"]), info("kl final", final["kl"])]
        measurements += [info("grad norm initial (first pass)", obs["grad_initial"]),
                         info("grad norm final", final["grad"])]
        for name, value in obs["module_grad_final"].items():
            measurements.append(flag(f"grad norm '{name}' final", bool(value), value=value,
                                     expected="> 0", bad=Verdict.WARN))
        for name, count in obs["params_missing_from_optimizer"].items():
            measurements.append(at_most(f"'{name}' parameters not in the optimizer", count, warn=0, fail=None,
                                        unit="params"))
        extras = [name for name, used in obs["extras"].items() if used]
        measurements += [info("kl_weight at the overfit's steps", obs["kl_weight"]) if obs["kl_weight"] is not None
                         else info("kl_weight", "not exposed"),
                         info("step_index range run",
                              f"{obs['start_step']}..{obs['start_step'] + max(obs['steps_run'], 1) - 1}"),
                         info("learning rate (max over groups)", obs["lr"]),
                         info("training extras run", ", ".join(extras) if extras else "none")]

        if has_v:
            fm_text = (f"fm_loss {initial['fm']:.3g} -> {final['fm']:.3g} (relative to mean v_target^2 "
                       f"{initial['rel']:.2f} -> {final['rel']:.2f}, {_percent(-fm_fall, sign=True)}), "
                       f"cos {initial['cos']:.2f} -> {final['cos']:.2f}")
        else:
            fm_text = (f"{loss_name} {initial['fm']:.3g} -> {final['fm']:.3g} ({_percent(-fm_fall, sign=True)}; "
                       "no v_pred, v_target: judged on the loss alone)")
        ratio_text = ""
        if obs["has_scale"]:
            ratio_text = f"||x0||/||x1|| {initial['ratio']:.3g} -> {final['ratio']:.3g}"
        regime = "" if replayed else (f"; fresh randomness each pass ({', '.join(obs['changed_outputs'])} changed), "
                                      "judged on the fall, not on an absolute cos")
        because = f" ({'; '.join(causes)})" if causes else ""
        fixes = (["add the missing parameters to the optimizer"] if missing else []) + (
            [f"compute v_pred with autograd from {', '.join(silent)} (no torch.no_grad, .detach(), .data)"]
            if silent else [])
        generic = "go back to scale, target and gradients (`fmcheck all`)"
        learn_hint = "; ".join(fixes) + "; then " + generic if fixes else generic

        drifted = final.get("drift") is not None and om.spread(final["drift"]) > thresholds.scale_warn
        if outcome == om.PASSED and not drifted:
            summary = (f"overfits {samples} samples in {steps_text}: {fm_text}"
                       + (f", {ratio_text}" if ratio_text else "") + regime)
            return Judgement(measurements, summary, verdict=Verdict.PASS, details=details)
        if outcome == om.PASSED:
            summary = (f"overfits {samples} samples in {steps_text} ({fm_text}), but the scale moved "
                       f"{final['drift']:.3g}x on the way: {ratio_text}{regime}")
            hint = ("the KL held the head's scale only loosely: watch ||x0||/||x1|| in training; if it keeps growing, "
                    "raise the KL weight or bound the head's output scale")
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.WARN, details=details)
        if outcome == om.SCALE_DRIFT:
            weight = f"{obs['kl_weight']:.3g}" if obs["kl_weight"] is not None else "not exposed"
            summary = (f"scale drift: ||x0||/||x1|| went {initial['ratio']:.3g} -> {final['ratio']:.3g} "
                       f"({decision['drift']:.3g}x, limit {thresholds.scale_fail:g}x) by step {at}"
                       + (f", while cos rose from {initial['cos']:.2f} to {obs['best_cos']:.2f} (now "
                          f"{final['cos']:.2f})" if has_v else "")
                       + f": the head's output scale runs away under a KL weight of {weight}")
            hint = ("hold the head's scale: raise the KL weight or check that its warmup ends (kl_weight "
                    f"{weight} at step_index {obs['start_step']}), bound the head's output scale (smaller init of "
                    "its last layer, a lower head learning rate, a logvar clamp); fix the scale itself, do not add "
                    "a ratio correction r = ||z1||/||z0||")
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.FAIL, details=details)
        if outcome == om.DIVERGED:
            summary = f"diverged: {fm_text} by step {at}{because}"
            hint = ("lower the learning rate or clip gradients (the pipeline field 'before_optimizer_step' runs your "
                    "clipping here); check that fm_loss and the weighted KL have the same normalisation (mean vs sum)")
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.FAIL, details=details)
        if outcome == om.NOT_IN_OPTIMIZER:
            summary = f"cannot overfit: {causes[0]}; after {steps_text} {fm_text}"
            return Judgement(measurements, summary, hint=learn_hint, verdict=Verdict.FAIL, details=details)
        if outcome == om.NO_GRADIENT:
            names = ", ".join(f"'{m}'" for m in decision.get("modules", []))
            summary = (f"cannot overfit: {names} received no gradient in any of the first {steps_text}; "
                       f"{fm_text}")
            return Judgement(measurements, summary, hint=learn_hint, verdict=Verdict.FAIL, details=details)
        if outcome == om.SCALE_MOVING:
            summary = (f"overfits ({fm_text}) but the scale had not settled by the end of the budget: "
                       f"{ratio_text} in {steps_text}{regime}")
            hint = ("watch ||x0||/||x1|| in training; if it keeps growing, raise the KL weight or bound the head's "
                    "output scale")
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.WARN, details=details)
        needs = f"a pass needs a relative fall of {drop_needed:.0%}" + (
            f" and cos >= {cos_needed:.2f}" if has_v else "")
        if outcome == om.HUNG:
            summary = (f"inconclusive: a step exceeded the time budget ({obs['time_budget']:g} s) after "
                       f"{obs['steps_run']} steps: {fm_text} ({needs})")
            hint = f"find what blocks the step (data loading, a lock, a collective); then {more_time}"
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.WARN, details=details)
        if outcome == om.OUT_OF_TIME:
            summary = (f"inconclusive: the time budget ({obs['time_budget']:g} s) ended the run after "
                       f"{obs['steps_run']} steps, before a verdict: {fm_text} ({needs}){regime}")
            hint = f"give it more room: {more_time} (or run on a faster device)"
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.WARN, details=details)
        if outcome == om.BUDGET:
            summary = (f"inconclusive: the step budget ({obs['budget_steps']} steps) ran out before a verdict: "
                       f"{fm_text} ({needs}){regime}{because}")
            hint = f"give it more room: --max-steps {2 * obs['budget_steps']}; if it still does not pass, {generic}"
            return Judgement(measurements, summary, hint=hint, verdict=Verdict.WARN, details=details)
        summary = (f"will not overfit within {obs['budget_steps']} steps: after {steps_text} {fm_text} "
                   f"({needs}); even optimistic trends reach only a {_percent(decision['projected_fm'])} fall"
                   + (f" and cos {decision['projected_cos']:.2f}" if decision["projected_cos"] is not None else "")
                   + f"{regime}{because}")
        return Judgement(measurements, summary, hint=learn_hint, verdict=Verdict.FAIL, details=details)


# ------------------------------------------------------------------------------------------------------ helpers
def _hang_grace(time_budget: float) -> float:
    """How long a step still running when the time budget ends may take before it counts as hung."""
    return min(30.0, max(1.0, 0.25 * time_budget))


def timeout_for(settings) -> float:
    """The overfit's own per-check time limit when --timeout is not given: its budget, a step's grace, a margin."""
    return settings.time_budget + _hang_grace(settings.time_budget) + SETUP_MARGIN_S


def _budget_note(settings, time_left: float) -> dict[str, Any]:
    """The training loop's time budget, and a note when the per-check time limit caps it."""
    requested = settings.time_budget
    available = time_left - _hang_grace(requested) - 5.0  # room for the judge once the loop ends
    if requested <= available:
        return {"seconds": requested, "note": f"--time-budget {requested:g}"}
    seconds = max(1.0, available)
    return {"seconds": seconds, "note": f"--time-budget {requested:g} capped at {seconds:.0f} s by the per-check "
                                        f"time limit (--timeout {settings.timeout:g}); raise --timeout with it"}


@contextlib.contextmanager
def hang_limit(seconds: float):
    """Interrupt the user's step when the loop outlives ``seconds`` (SIGALRM, main thread only): ``.fired`` says so.

    Nested inside the runner's own limit: that one stays in charge when it ends first, and its remaining time is
    re-armed afterwards."""
    state = SimpleNamespace(fired=False)
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    outer_left = signal.getitimer(signal.ITIMER_REAL)[0] if usable else 0.0
    if not usable or (outer_left and outer_left <= seconds):
        yield state
        return

    class Hung(BaseException):
        pass

    def on_alarm(signum, frame):
        state.fired = True
        raise Hung()

    entered = time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    except Hung:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - entered)))


# Outputs that carry a sample's randomness (or follow from it at fixed weights); loss-like scalars and the KL weight
# may move with step_index and are not compared.
SAMPLE_KEYS = ("x0", "x1", "t", "eps", "xt", "v_target", "mu", "logvar", "v_pred")


def _changed_outputs(torch, first, again) -> list[str]:
    """The sample outputs that differ between two calls at the same weights and the same replay seed."""
    changed = []
    keys = [k for k in SAMPLE_KEYS if isinstance(first.get(k), torch.Tensor)] or ["loss"]  # a loss-only step
    for key in keys:
        a, b = first.get(key), again.get(key) if hasattr(again, "get") else None
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            continue
        if a.shape != b.shape:
            changed.append(key)
            continue
        a, b = torch.nan_to_num(a.detach().double()), torch.nan_to_num(b.detach().double())
        if float((a - b).norm()) > 1e-4 * float(a.norm()) + 1e-12:
            changed.append(key)
    return changed


def _ranks_agree_to_stop(torch, device, decided: bool, out_of_budget: bool) -> bool:
    """All ranks stop together: when every rank has its verdict, or any rank ran out of budget."""
    import torch.distributed as dist

    flags = torch.tensor([0.0 if decided else 1.0, 1.0 if out_of_budget else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    undecided, out = flags.tolist()
    return undecided == 0.0 or out == 1.0


def _percent(fraction: float, sign: bool = False) -> str:
    """0.123 -> '12%' ('+12%' with sign); rounding never shows '-0%'."""
    value = round(100 * fraction)
    if value == 0:
        return "0%"
    return f"{value:+d}%" if sign else f"{value:d}%"


def _rules(thresholds: OverfitThresholds, replayed: bool):
    from . import _overfit_math as om

    if replayed:
        drop, gain = thresholds.loss_drop, None
    else:
        drop, gain = thresholds.fresh_loss_drop, thresholds.fresh_cos_gain
    return om.Rules(loss_drop=drop, cos_pass=thresholds.cos_pass, cos_gain=gain, min_steps=thresholds.min_steps,
                    scale_fail=thresholds.scale_fail,
                    diverge=thresholds.diverge, trend_after=thresholds.trend_after,
                    trend_optimism=thresholds.trend_optimism, trend_reach=thresholds.trend_reach)


def _as_tensor(torch, value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.tensor(float(value), device=device)


class _GradNorms:
    """Gradient L2 norm of each trainable module and in total, on the device, from one fused norm call."""

    def __init__(self, torch, module_params: dict, device) -> None:
        self.torch = torch
        self.device = device
        self.params = [p for params in module_params.values() for p in params]
        self.owner = [m for m, params in enumerate(module_params.values()) for _ in params]
        self.modules = len(module_params)
        self.index: dict[tuple[int, ...], Any] = {}  # which params have a grad -> their module indices, on device

    def __call__(self):
        torch = self.torch
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        squares = torch.zeros(self.modules, dtype=torch.float32, device=self.device)
        if present:
            index = self.index.get(present)
            if index is None:
                index = self.index[present] = torch.tensor([self.owner[i] for i in present], device=self.device)
            grads = [self.params[i].grad for i in present]
            norms = torch._foreach_norm(grads) if hasattr(torch, "_foreach_norm") else [g.norm() for g in grads]
            stacked = torch.stack([n.to(self.device) for n in norms]).float()
            squares.index_add_(0, index, stacked * stacked)
        return squares.sqrt(), squares.sum().sqrt()


def _max_abs(torch, tensors):
    """max |x| of each tensor (NaN when it holds a NaN, inf when an inf): one fused call where torch has it."""
    if hasattr(torch, "_foreach_norm"):
        return torch._foreach_norm(tensors, float("inf"))
    return [t.abs().amax() if t.numel() else t.new_zeros(()) for t in tensors]


def _point_dict(point, initial) -> dict[str, Any]:
    from . import _overfit_math as om

    return {"step": point.step, "fm": point.fm, "rel": point.rel, "cos": point.cos, "ratio": point.ratio,
            "drift": om.drift_of(initial, point), "loss": point.loss, "kl": point.kl, "grad": point.grad,
            "vnorm": point.vnorm}


def _details(obs: dict[str, Any], thresholds: OverfitThresholds) -> dict[str, Any]:
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
