"""The context every check receives: device, seed, the pipeline, fixed batches and shared, cached step outputs.

Checks share forwards through it: ``outputs(i)`` runs the user's step once per batch index for the whole run (seeded,
under no_grad) and hands the same detached tensors to every check that asks.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any, Iterator, Optional

from .config import Settings
from .contract import Pipeline
from .errors import PipelineError
from .isolate import capture, describe

_END = object()  # the end of the batch stream

OUTPUT_KEYS = ("loss", "x0", "x1", "t", "xt", "v_target", "v_pred", "mu", "logvar", "kl", "kl_weight", "fm_loss", "eps")


class StepOutputs(Mapping):
    """A validated view of what ``step`` returned. ``loss`` is always present and scalar."""

    def __init__(self, raw: Any, where: str):
        import torch

        if not isinstance(raw, Mapping):
            raise PipelineError(f"{where} returned a {type(raw).__name__}; expected a mapping of name -> tensor")
        if "loss" not in raw:
            raise PipelineError(f"{where} returned no 'loss' (keys: {', '.join(map(str, raw)) or 'none'})")
        for key, value in raw.items():
            if not isinstance(value, (torch.Tensor, int, float)) or isinstance(value, bool):
                raise PipelineError(
                    f"{where} output '{key}' is a {type(value).__name__}; expected a tensor or a number"
                )
        loss = raw["loss"]
        if not isinstance(loss, torch.Tensor):
            raise PipelineError(f"{where} output 'loss' is a {type(loss).__name__}; expected the scalar tensor "
                                "training calls .backward() on")
        if loss.numel() != 1:
            raise PipelineError(f"{where} output 'loss' has shape {tuple(loss.shape)}; expected a scalar")
        _check_devices(raw, where)
        _check_shapes(raw, where)
        self._raw = dict(raw)
        self.where = where

    def __getitem__(self, key: str) -> Any:
        return self._raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def tensor(self, key: str):
        """The output as a float tensor (numbers become 0-d tensors)."""
        import torch

        value = self._raw[key]
        return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))

    def number(self, key: str) -> float:
        value = self._raw[key]
        return float(value.detach().float().mean()) if hasattr(value, "detach") else float(value)

    def missing(self, keys) -> list[str]:
        return [k for k in keys if k not in self._raw]

    def detached(self) -> "StepOutputs":
        import torch

        return StepOutputs({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in self._raw.items()},
                           self.where)


# Outputs that live in latent space and must agree in shape with each other.
LATENT_KEYS = ("x0", "x1", "xt", "v_target", "v_pred")


def _check_devices(raw: Mapping, where: str) -> None:
    import torch

    placed = [(k, v.device) for k, v in raw.items() if isinstance(v, torch.Tensor) and v.dim() > 0]
    for key, device in placed[1:]:
        if device != placed[0][1]:
            raise PipelineError(f"{where} output '{key}' is on {device} but '{placed[0][0]}' is on {placed[0][1]}; "
                                "return every output on one device")


def _check_shapes(raw: Mapping, where: str) -> None:
    import torch

    shaped = [(k, tuple(raw[k].shape)) for k in LATENT_KEYS if isinstance(raw.get(k), torch.Tensor)]
    for key, shape in shaped[1:]:
        if shape != shaped[0][1]:
            raise PipelineError(f"{where} output '{key}' has shape {shape} but '{shaped[0][0]}' has "
                                f"{shaped[0][1]}; latent-space outputs must agree")
    t = raw.get("t")
    if isinstance(t, torch.Tensor) and shaped and shaped[0][1]:
        samples = shaped[0][1][0]
        if t.numel() != 1 and (t.dim() == 0 or t.shape[0] != samples):  # (B, frames) is a schedule; (3,) a bug
            raise PipelineError(f"{where} output 't' has shape {tuple(t.shape)} for {samples} samples "
                                f"('{shaped[0][0]}' {shaped[0][1]}); expected one time per sample (leading "
                                "dimension), or one for all")


def to_device(value: Any, device: Any) -> Any:
    """Move the tensors inside a batch (dicts, lists, tuples, namedtuples, objects with ``.to``) to ``device``."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return type(value)(**{k: to_device(v, device) for k, v in value.items()}) \
            if hasattr(value, "_fields") else {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def batch_size(batch: Any) -> Optional[int]:
    """The leading dimension of the first tensor found in a batch."""
    import torch

    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items: Any
    if isinstance(batch, Mapping):
        items = batch.values()
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        items = vars(batch).values() if hasattr(batch, "__dict__") else ()
    for item in items:
        size = batch_size(item)
        if size is not None:
            return size
    return None


class Context:
    def __init__(self, pipeline: Pipeline, settings: Settings, device: Any, listener: Any = None, rank: Any = None,
                 generators: Optional[list] = None):
        self.pipeline = pipeline
        # The private random generators reachable from the pipeline (fmcheck.state.find_generators); found on first
        # use unless the runner hands over the ones its snapshot restores.
        self._generators = generators
        self.rank = rank  # fmcheck.distributed.Rank under torchrun, else None
        self.settings = settings
        self.device = device
        self.seed = settings.seed
        self.listener = listener
        self.check_id: Optional[str] = None
        self.deadline: Optional[float] = None
        # The running check's thresholds, validated once by the runner: what ``measure`` reads when a bound decides
        # how long to measure (the overfit's stop, scale's probe); ``judge`` receives the same object.
        self.thresholds: Any = None
        self._batches: list[Any] = []
        self._batches_exhausted = False
        self._source: Optional[Iterator[Any]] = None
        self._outputs: dict[int, StepOutputs] = {}

    # -- randomness ---------------------------------------------------------------------------------------------
    def generator(self, salt: int = 0, device: Any = None):
        """A fresh generator seeded from the run's seed and a salt: the same numbers in every run."""
        import torch

        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed(self.seed * 1_000_003 + salt)
        return gen

    @property
    def private_generators(self) -> list:
        """The pipeline's own generators (``FoundGenerator``: name, generator), in a fixed order."""
        if self._generators is None:
            from .state import find_generators

            self._generators = find_generators(self.pipeline)
        return self._generators

    def seed_everything(self, salt: int = 0) -> None:
        """Seed every RNG the user's step may draw from: the global ones, and each private generator fmcheck found
        (a DataLoader's, one in the step's closure, the pipeline's ``generators``), each with a seed of its own derived
        from the run's seed, the salt and its position. The runner restores them all after the check."""
        import numpy as np
        import torch

        from .state import derived_seed, reseed

        value = (self.seed * 1_000_003 + salt) % (2**31)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)
        for index, found in enumerate(self.private_generators):
            reseed(found.generator, derived_seed(self.seed, salt, index))

    # -- batches ------------------------------------------------------------------------------------------------
    def batches(self, count: Optional[int] = None) -> list[Any]:
        """The first ``count`` training batches (default: ``measure_batches``), on the device, the same every call.

        One iterator is read on demand for the whole run, so asking for more batches never re-reads the data from
        the start (an endless batch factory would otherwise be read quadratically)."""
        count = count or self.settings.measure_batches
        while len(self._batches) < count and not self._batches_exhausted:
            if self._source is None:
                self._source = self._sharded()
            read = capture(next, self._source, _END)
            if not read.ok:
                raise PipelineError(f"iterating pipeline field 'batches' raised {describe(read.exc)} "
                                    f"(reading batch {len(self._batches)})") from read.exc
            if read.value is _END:
                self._batches_exhausted = True
            else:
                self._batches.append(to_device(read.value, self.device))
        if not self._batches:
            raise PipelineError("pipeline field 'batches' yielded no batch")
        return self._batches[:count]

    def _sharded(self) -> Iterator[Any]:
        """The batch stream, this rank's share; a generator, so that even ``iter()`` runs inside ``next``."""
        offset, stride = self._shard()
        for index, batch in enumerate(self.pipeline.iter_batches()):
            if index % stride == offset:
                yield batch

    def cached_outputs(self) -> dict[int, "StepOutputs"]:
        """The step outputs computed so far (for messages about where the step failed)."""
        return dict(self._outputs)

    def _shard(self) -> tuple[int, int]:
        """(offset, stride) over the batch stream: each rank takes its own batches unless the loader already does."""
        from .distributed import already_sharded

        if self.rank is None or already_sharded(self.pipeline.batches):
            return 0, 1
        return self.rank.rank, self.rank.world_size

    def batches_for_samples(self, samples: int) -> list[Any]:
        """Enough leading batches to hold ``samples`` samples (fewer when the data runs out)."""
        needed, total = 0, 0
        while total < samples:
            needed += 1
            batches = self.batches(needed)
            if len(batches) < needed:
                break
            total += batch_size(batches[-1]) or 1
        return self.batches(needed)

    # -- the user's step ----------------------------------------------------------------------------------------
    def run_step(self, batch: Any, step_index: int = 0, *, grad: bool = True, salt: int = 0) -> StepOutputs:
        """One call of the user's step, seeded, with or without autograd."""
        import torch

        self.seed_everything(salt=salt * 7919 + step_index)
        where = f"step(batch, step_index={step_index})"
        with torch.set_grad_enabled(grad):
            raw = self.pipeline.step(batch, step_index)
        return StepOutputs(raw, where)

    def outputs(self, index: int = 0) -> StepOutputs:
        """Cached, detached outputs of the step on batch ``index`` (step_index = index, no autograd)."""
        if index not in self._outputs:
            batches = self.batches(index + 1)
            if index >= len(batches):
                raise PipelineError(f"pipeline field 'batches' has only {len(batches)} batches; needed {index + 1}")
            self._outputs[index] = self.run_step(batches[index], step_index=index, grad=False).detached()
        return self._outputs[index]

    def all_outputs(self) -> list[StepOutputs]:
        return [self.outputs(i) for i in range(len(self.batches()))]

    # -- time and progress --------------------------------------------------------------------------------------
    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def progress(self, completed: float, total: Optional[float] = None, **fields: Any) -> None:
        if self.listener is not None and self.check_id is not None:
            self.listener.check_progress(self.check_id, completed, total, fields)
