"""Statistics of the `overfit` training loop computed on the device, without a host sync; and the two comparisons
that need torch (the replay verification, the ranks' agreement to stop). torch is passed in: nothing here imports it
at module level."""

from __future__ import annotations

from typing import Any

# Outputs that carry a sample's randomness (or follow from it at fixed weights); loss-like scalars and the KL weight
# may move with step_index and are not compared.
SAMPLE_KEYS = ("x0", "x1", "t", "eps", "xt", "v_target", "mu", "logvar", "v_pred")


def changed_outputs(torch, first, again) -> list[str]:
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


def ranks_agree_to_stop(torch, device, decided: bool, out_of_budget: bool) -> bool:
    """All ranks stop together: when every rank has its verdict, or any rank ran out of budget."""
    import torch.distributed as dist

    flags = torch.tensor([0.0 if decided else 1.0, 1.0 if out_of_budget else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    undecided, out = flags.tolist()
    return undecided == 0.0 or out == 1.0


def as_tensor(torch, value, device):
    if isinstance(value, torch.Tensor):
        return value.detach().float().mean()
    return torch.tensor(float(value), device=device)


class GradNorms:
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


def max_abs(torch, tensors):
    """max |x| of each tensor (NaN when it holds a NaN, inf when an inf): one fused call where torch has it."""
    if hasattr(torch, "_foreach_norm"):
        return torch._foreach_norm(tensors, float("inf"))
    return [t.abs().amax() if t.numel() else t.new_zeros(()) for t in tensors]

