"""Snapshot and exact restore of everything a check could disturb in the user's training state.

Captured: parameters and buffers of the trainable and frozen modules (restored in place, so the optimizer's
references stay valid), their ``.grad``, every submodule's train/eval mode, requires_grad flags, the optimizer's and
grad scaler's state, and the python/numpy/torch/CUDA RNG states.
"""

from __future__ import annotations

import copy
import hashlib
import random
from typing import Any, Optional

from .contract import Pipeline


def _modules(pipeline: Pipeline) -> dict[str, Any]:
    modules = {f"trainable.{k}": m for k, m in pipeline.trainable_modules().items()}
    modules.update({f"frozen.{k}": m for k, m in pipeline.frozen_modules().items()})
    return modules


def _unique_tensors(pipeline: Pipeline):
    """(name, tensor) for every parameter and buffer, each shared tensor once."""
    seen: set[int] = set()
    for prefix, module in _modules(pipeline).items():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            yield f"{prefix}.{name}", tensor


def _offload(value: Any) -> Any:
    """Deep copy with tensors cloned to CPU, so a snapshot costs host memory, not accelerator memory."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _offload(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_offload(v) for v in value)
    return copy.deepcopy(value)


class StateSnapshot:
    def __init__(self, pipeline: Pipeline):
        import numpy as np
        import torch

        self.pipeline = pipeline
        tensors = [t for _, t in _unique_tensors(pipeline)]  # one walk over the modules serves all three lists
        self.tensors = [(t, t.detach().to("cpu", copy=True)) for t in tensors]
        self.grads = [(p, None if p.grad is None else p.grad.detach().to("cpu", copy=True))
                      for p in tensors if isinstance(p, torch.nn.Parameter)]
        self.flags = [(p, p.requires_grad) for p, _ in self.grads]
        self.modes = [(m, m.training) for module in _modules(pipeline).values() for m in module.modules()]
        self.optimizer = _offload(pipeline.optimizer.state_dict()) if pipeline.optimizer is not None else None
        scaler = pipeline.grad_scaler
        self.scaler = _offload(scaler.state_dict()) if scaler is not None and hasattr(scaler, "state_dict") else None
        # The LR scheduler the overfit steps (pipeline field 'lr_scheduler'): its counters and the lrs it set.
        scheduler = getattr(pipeline, "lr_scheduler", None)
        self.scheduler = _offload(scheduler.state_dict()) if scheduler is not None else None
        self.python_rng = random.getstate()
        self.numpy_rng = np.random.get_state()
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() \
            else None

    def restore(self) -> None:
        import numpy as np
        import torch

        with torch.no_grad():
            for tensor, saved in self.tensors:
                if tensor.shape != saved.shape:  # a check replaced the storage: put the original shape back
                    tensor.data = saved.to(tensor.device, tensor.dtype)
                else:
                    tensor.copy_(saved)
        for param, saved_grad in self.grads:
            param.grad = None if saved_grad is None else saved_grad.to(param.device)
        for param, flag in self.flags:
            param.requires_grad_(flag)
        for module, training in self.modes:
            module.training = training
        if self.optimizer is not None:
            self.pipeline.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        if self.scaler is not None:
            self.pipeline.grad_scaler.load_state_dict(copy.deepcopy(self.scaler))
        if self.scheduler is not None:
            self.pipeline.lr_scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        random.setstate(self.python_rng)
        np.random.set_state(self.numpy_rng)
        torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)


def state_digest(pipeline: Pipeline, include_rng: bool = True) -> str:
    """A hash of every bit :class:`StateSnapshot` restores: two equal digests mean nothing was lost."""
    import numpy as np
    import torch

    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous()
            digest.update(str((tuple(data.shape), data.dtype)).encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                digest.update(str(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                feed(item)
        elif isinstance(value, np.ndarray):
            digest.update(value.tobytes())
        else:
            digest.update(repr(value).encode())

    for name, tensor in _unique_tensors(pipeline):
        digest.update(name.encode())
        feed(tensor)
        if isinstance(tensor, torch.nn.Parameter):
            feed(tensor.requires_grad)
            feed(tensor.grad if tensor.grad is not None else "no-grad")
    for prefix, module in _modules(pipeline).items():
        feed([(prefix, name, m.training) for name, m in module.named_modules()])
    if pipeline.optimizer is not None:
        feed(pipeline.optimizer.state_dict())
    if pipeline.grad_scaler is not None and hasattr(pipeline.grad_scaler, "state_dict"):
        feed(pipeline.grad_scaler.state_dict())
    if getattr(pipeline, "lr_scheduler", None) is not None:
        feed(pipeline.lr_scheduler.state_dict())
    if include_rng:
        feed(random.getstate())
        feed(np.random.get_state())
        feed(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            feed(torch.cuda.get_rng_state_all())
    return digest.hexdigest()
