"""state_digest: a hash of every bit :class:`~fmcheck.state.StateSnapshot` restores, so that a test (or a user)
can compare the state before and after a run with one string."""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ..contract import Pipeline
from .generators import _rng_state, find_generators
from .records import _module_containers, _tensors, _TensorHooks, named_modules
from .snapshot import _global_hooks, _stateful


def state_digest(pipeline: Pipeline, include_rng: bool = True) -> str:
    """A hash of every bit :class:`~fmcheck.state.StateSnapshot` restores: two equal digests mean nothing was lost."""
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

    modules = named_modules(pipeline)
    for name, tensor in _tensors(modules):
        digest.update(name.encode())
        feed(tensor)
        feed(id(tensor))
        if isinstance(tensor, torch.nn.Parameter):
            feed(tensor.requires_grad)
            feed(tensor.grad if tensor.grad is not None else "no-grad")
            feed([len(getattr(tensor, key, None) or ()) for key, _ in _TensorHooks.KINDS])
    for name, module in modules:
        feed([name, module.training, type(module).__name__, sorted(module.__dict__)])
        feed([(k, sorted(map(str, module.__dict__[k]))) for k in sorted(_module_containers())
              if k in module.__dict__])
    optimizer = pipeline.optimizer
    if optimizer is not None:
        feed(optimizer.state_dict())
        feed([id(optimizer.param_groups)] + [(id(g), id(g.get("params"))) for g in optimizer.param_groups])
    for obj in _stateful(pipeline):
        feed(obj.state_dict())
    feed([(home.__name__, key, len(value) if isinstance(value, (dict, set)) else value)
          for home, key, value, _ in _global_hooks()])
    if include_rng:
        feed(random.getstate())
        feed(np.random.get_state())
        feed(torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            feed(torch.cuda.get_rng_state_all())
        for found in find_generators(pipeline):
            feed(found.name)
            feed(_rng_state(found.generator))
    return digest.hexdigest()
