"""The `overfit` check's measurement: train the user's step and optimizer on the fixed set until the checkpoint that
decides (the stop rule in ``maths.py``), and return the recorded outcome, curves and numbers as plain data."""

from __future__ import annotations

import math
import time
from typing import Any

from fmcheck.api import Skip

from . import maths as om
from .budget import budget_note, hang_grace, hang_limit
from .device import GradNorms, as_tensor, changed_outputs, max_abs, ranks_agree_to_stop

# Step outputs in the order data flows through a training step: when several turn non-finite at the same step,
# the first of them is the most likely origin.
DATAFLOW = ("x1", "mu", "logvar", "eps", "x0", "t", "xt", "v_target", "v_pred", "fm_loss", "kl", "kl_weight", "loss")
PROGRESS_INTERVAL_S = 0.5  # progress between checkpoints, from the clock (the device is read at checkpoints only)
REPLAY_SALT = 50_000  # batch k of the set draws from seed_everything(salt=REPLAY_SALT + k) on every pass
MIN_WINDOW = 8  # steps per checkpoint window, at least (rounded up to whole passes over the set)
MAX_POINTS = 200  # checkpoints per run, at most (the window grows for long budgets)
UNKNOWN_TOTAL_START = 100_000  # first step index when the pipeline does not say how long its run is


def measure(ctx, thresholds) -> dict[str, Any]:
    """Train on the fixed set until the stop rule decides (or the budget ends); the observation ``judge`` reads.

    ``thresholds`` are the check's, validated by the runner (``ctx.thresholds``): the stop rule reads them, since
    when to stop training is part of measuring."""
    import torch

    from fmcheck.context import StepOutputs, batch_size

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
    room = budget_note(settings, ctx.time_left())
    time_budget = room["seconds"]

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
    changed = changed_outputs(torch, first, again)
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
    grad_norms = GradNorms(torch, module_params, device)

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
            loss = as_tensor(torch, out["loss"], device)
            values = {"loss": loss, "grad": total, "fm": loss, "power": zero + 1.0}
            if fm_source == "fm_loss":
                values["fm"] = as_tensor(torch, out["fm_loss"], device)
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
                values["kl"] = as_tensor(torch, out["kl"], device)
            present = [out[k].detach() for k in watched if k in out and out[k].numel()]
            maxima = iter(max_abs(torch, present))
            biggest = [next(maxima) if k in out and out[k].numel() else zero for k in watched]
            row.copy_(torch.cat([torch.stack([values[name] for name in scalars]), per_module,
                                 torch.stack(biggest)]))

    initial_stats = torch.zeros(epoch, len(names), dtype=torch.float32, device=device)
    for index, out in enumerate(before):
        record(initial_stats[index], out)
    del before, first
    initial_rows = initial_stats.tolist()
    rules = _stop_rule(thresholds, replayed)
    tracker = om.Tracker(columns, epoch=epoch, window=window, rules=rules, nonfinite_keys=nonfinite_keys,
                         initial_rows=initial_rows,
                         not_in_optimizer=[name for name, count in missing.items() if count],
                         module_grad_keys=[f"grad:{m}" for m in module_params])
    # Under torchrun every rank must take the same number of steps (a DDP backward is a collective): the ranks
    # agree on stopping (all decided, or any out of budget) at each checkpoint.
    rank = getattr(ctx, "rank", None)
    distributed = rank is not None and getattr(rank, "world_size", 1) > 1
    if distributed and ranks_agree_to_stop(torch, device, False, tracker.decision is not None) \
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
    with hang_limit(time_budget + hang_grace(time_budget)) as hang:
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
                    stop = ranks_agree_to_stop(torch, device, decision is not None, out_of_budget)
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
        "budget_note": room["note"],
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


def _stop_rule(thresholds, replayed: bool) -> om.Rules:
    """The stop rule's bounds for the regime the replay verification found."""
    if replayed:
        drop, gain = thresholds.loss_drop, None
    else:
        drop, gain = thresholds.fresh_loss_drop, thresholds.fresh_cos_gain
    return om.Rules(loss_drop=drop, cos_pass=thresholds.cos_pass, cos_gain=gain, min_steps=thresholds.min_steps,
                    scale_fail=thresholds.scale_fail,
                    diverge=thresholds.diverge, trend_after=thresholds.trend_after,
                    trend_optimism=thresholds.trend_optimism, trend_reach=thresholds.trend_reach)


def _point_dict(point, initial) -> dict[str, Any]:
    return {"step": point.step, "fm": point.fm, "rel": point.rel, "cos": point.cos, "ratio": point.ratio,
            "drift": om.drift_of(initial, point), "loss": point.loss, "kl": point.kl, "grad": point.grad,
            "vnorm": point.vnorm}
