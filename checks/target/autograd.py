"""`target`'s gradient-path audit: one fresh forward with autograd; which trainable and frozen modules each loss term
reaches, and whether the target carries a graph. Reentrant gradient checkpointing (torch.utils.checkpoint with
use_reentrant=True) makes autograd.grad raise, or silently skip the parameters inside the checkpoint: there the
gradients are taken with backward() and tensor hooks, and the parameters' .grad restored.
"""

from __future__ import annotations

import math
from typing import Any


def _leaves(tensor) -> set[int]:
    """ids of the leaf tensors (AccumulateGrad variables) an autograd graph reaches."""
    import torch

    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return set()
    if tensor.grad_fn is None:
        return {id(tensor)}
    found: set[int] = set()
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None:
            found.add(id(variable))
            continue
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def _parameter_table(pipeline) -> list[tuple[str, str, str, Any]]:
    """(qualified name, module key, 'trainable' or 'frozen', parameter), each parameter once, trainable first."""
    rows, seen = [], set()
    for group, modules in (("trainable", pipeline.trainable_modules()), ("frozen", pipeline.frozen_modules())):
        for key, module in modules.items():
            for name, param in module.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    rows.append((f"{key}.{name}", key, group, param))
    return rows


REENTRANT = "use_reentrant=True"  # torch.utils.checkpoint's error for autograd.grad through a reentrant checkpoint
REENTRANT_NOTE = ("reentrant torch.utils.checkpoint in the model: gradients measured with backward() and hooks "
                  "(autograd.grad cannot run through it)")


def _is_reentrant_error(error: RuntimeError) -> bool:
    return REENTRANT in str(error)


def _has_reentrant_checkpoint(tensor) -> bool:
    """Whether the autograd graph of ``tensor`` holds a reentrant checkpoint: autograd.grad would either raise or,
    for the parameters inside it (not inputs of its graph node), silently report no gradient."""
    import torch

    if not isinstance(tensor, torch.Tensor) or tensor.grad_fn is None:
        return False
    seen: set[int] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if "CheckpointFunction" in type(node).__name__:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


class _KeepGrads:
    """Saves the .grad of ``params`` and clears them; restores them on exit (backward() accumulates into them)."""

    def __init__(self, params: list) -> None:
        self.params = params

    def __enter__(self) -> "_KeepGrads":
        self.saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return self

    def __exit__(self, *exc: Any) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g


def _param_grads(output, params: list, upstream, obs: dict) -> list:
    """d output / d params (output weighted by ``upstream``); through backward() where a reentrant checkpoint makes
    autograd.grad fail."""
    import torch

    if not obs.get("reentrant"):
        try:
            return list(torch.autograd.grad(output, params, grad_outputs=upstream, allow_unused=True,
                                            retain_graph=True))
        except RuntimeError as error:
            if not _is_reentrant_error(error):
                raise
            obs["reentrant"] = True
            obs["notes_info"].append(REENTRANT_NOTE)
    with _KeepGrads(params):
        output.backward(gradient=upstream, retain_graph=True)
        return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _node_grad(output, node, params: list, obs: dict):
    """d output / d node, the upstream gradient at an intermediate tensor; through a tensor hook during backward()
    where a reentrant checkpoint makes autograd.grad fail."""
    import torch

    if not obs.get("reentrant"):
        try:
            return torch.autograd.grad(output, node, allow_unused=True, retain_graph=True)[0]
        except RuntimeError as error:
            if not _is_reentrant_error(error):
                raise
            obs["reentrant"] = True
            obs["notes_info"].append(REENTRANT_NOTE)
    seen: list = []
    handle = node.register_hook(lambda grad: seen.append(grad.detach().clone()))
    try:
        with _KeepGrads(params):
            output.backward(retain_graph=True)
    finally:
        handle.remove()
    return seen[0] if seen else None


def _measure_autograd(ctx) -> dict[str, Any]:
    import torch

    pipeline = ctx.pipeline
    table = _parameter_table(pipeline)
    batch = ctx.batches(1)[0]
    out = ctx.run_step(batch, 0, grad=True)
    obs: dict[str, Any] = {"modules": {}, "notes": [], "notes_info": []}
    for _, key, group, _ in table:
        obs["modules"].setdefault(key, group)

    index = {id(p): i for i, (_, _, _, p) in enumerate(table)}
    trainable = {i for i, row in enumerate(table) if row[2] == "trainable"}

    def reach(key: str) -> set[int]:
        return {index[v] for v in _leaves(out.get(key)) if v in index}

    reached = {k: reach(k) for k in ("v_target", "xt", "x0", "x1", "mu", "logvar", "v_pred")}
    if isinstance(pipeline.velocity, torch.nn.Module):
        ids = {id(p) for p in pipeline.velocity.parameters()}
        velocity = {i for i in trainable if id(table[i][3]) in ids}
        obs["velocity_from"] = "pipeline field 'velocity'"
    else:
        velocity = (reached["v_pred"] - reached["xt"] - reached["x0"] - reached["mu"] - reached["logvar"]) & trainable
        obs["velocity_from"] = "parameters v_pred reaches that x_t does not"
    head = ((reached["x0"] | reached["mu"] | reached["logvar"]) & trainable) - velocity

    def names(indices: set[int]) -> list[str]:
        return [table[i][0] for i in sorted(indices)]

    def modules_of(indices: set[int]) -> list[str]:
        return sorted({table[i][1] for i in indices})

    obs["roles"] = {"velocity": modules_of(velocity), "head": modules_of(head)}
    obs["moving_target"] = names(reached["v_target"] & trainable)
    obs["target_reaches_frozen"] = names(reached["v_target"] - trainable)
    obs["x1_reaches"] = names(reached["x1"])
    obs["has_head"] = bool(head)
    obs["has_mu"] = "mu" in out or "logvar" in out
    obs["xt_returned"] = "xt" in out

    live = [i for i, row in enumerate(table) if row[3].requires_grad]
    params = [table[i][3] for i in live]
    terms: dict[str, Any] = {}
    obs["terms_absent"], obs["terms_without_graph"] = [], []
    for key in ("fm_loss", "kl", "loss"):
        value = out.get(key)
        if value is None:
            obs["terms_absent"].append(key)
        elif isinstance(value, torch.Tensor) and value.requires_grad:
            terms[key] = value.sum() if value.numel() > 1 else value.reshape(())
        else:
            obs["terms_without_graph"].append(key)
    fm_key = "fm_loss" if "fm_loss" in terms else ("loss" if "fm_loss" in obs["terms_absent"] else None)
    obs["fm_key"] = fm_key
    if any(_has_reentrant_checkpoint(value) for value in terms.values()):
        obs["reentrant"] = True
        obs["notes_info"].append(REENTRANT_NOTE)
    rows: list[Any] = []  # one (len(live),) tensor of squared norms per entry of `labels`
    labels: list[str] = []

    def squared(grads) -> Any:
        """Squared norm per parameter, on the host; one transfer per device, not one per parameter."""
        sums = [None if g is None else g.detach().float().pow(2).sum() for g in grads]
        host = torch.zeros(len(sums), dtype=torch.float64)
        by_device: dict[Any, list[int]] = {}
        for j, value in enumerate(sums):
            if value is not None:
                by_device.setdefault(value.device, []).append(j)
        for positions in by_device.values():
            host[positions] = torch.stack([sums[j] for j in positions]).cpu().double()
        return host

    if params:
        for key, value in terms.items():
            rows.append(squared(_param_grads(value, params, None, obs)))
            labels.append(key)
        if fm_key is not None:
            fm = terms[fm_key]
            for via in ("v_target", "xt"):
                node = out.get(via)
                if isinstance(node, torch.Tensor) and node.requires_grad:
                    upstream = _node_grad(fm, node, params, obs)
                    if upstream is not None:
                        grads = _param_grads(node, params, upstream, obs)
                        rows.append(squared(grads))
                        labels.append(f"{fm_key} via {via}")
    else:
        obs["notes"].append("no parameter of the trainable or frozen modules requires grad")
    grads: dict[str, dict[str, float]] = {}
    if rows:
        matrix = torch.stack(rows).tolist()  # already on the host: one small (terms x params) table
        for label, values in zip(labels, matrix):
            per_module: dict[str, float] = {}
            per_role = {"velocity": 0.0, "head": 0.0}
            for j, i in enumerate(live):
                key = table[i][1]
                per_module[key] = per_module.get(key, 0.0) + values[j]
                if i in velocity:
                    per_role["velocity"] += values[j]
                if i in head:
                    per_role["head"] += values[j]
            frozen_hit = [table[i][0] for j, i in enumerate(live) if table[i][2] == "frozen" and values[j] > 0]
            grads[label] = {"modules": {k: math.sqrt(s) for k, s in per_module.items()},
                            "roles": {k: math.sqrt(s) for k, s in per_role.items()},
                            "frozen_params": frozen_hit[:20], "frozen_count": len(frozen_hit)}
    obs["grads"] = grads
    obs["frozen_requires_grad"] = sorted({table[i][1] for i in live if table[i][2] == "frozen"})
    del out, terms
    return obs
