"""Running under torchrun: detect the process group, shard batches per rank, merge the ranks' reports.

fmcheck uses torch.distributed itself (gloo on CPU, NCCL on CUDA): an existing process group is reused, otherwise one
is created from torchrun's environment. Every rank runs every check on its own shard of batches; the reports are
gathered with ``all_gather_object`` and merged identically on every rank (worst verdict, mean of each number, the
per-rank values kept in ``details["ranks"]``), so every rank exits with the same code. Only rank 0 renders and writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UsageError
from .report import CheckResult, Measurement, Report, exit_code_for, overall_verdict
from .verdict import Verdict


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    local_rank: int
    created_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UsageError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def setup(device: Optional[str], timeout_s: float = 600.0) -> Optional[Rank]:
    """The rank this process is, creating the process group from torchrun's environment when needed."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return None
    created = False
    if not dist.is_initialized():
        if _env_world_size() <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start fmcheck with torchrun")
        use_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
        created = True
    world = dist.get_world_size()
    if world <= 1:
        return None
    return Rank(rank=dist.get_rank(), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                created_group=created)


def default_device(rank: Rank) -> str:
    import torch

    return f"cuda:{rank.local_rank}" if torch.cuda.is_available() else "cpu"


def teardown(rank: Optional[Rank]) -> None:
    import torch.distributed as dist

    if rank is not None and rank.created_group and dist.is_initialized():
        dist.destroy_process_group()


def all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def agree_on_failure(rank: Optional[Rank], error: Optional[UsageError]) -> None:
    """Raise the same UsageError on every rank when any rank failed to load or probe the pipeline, so that all ranks
    exit 2 together instead of one exiting and the others waiting in a collective until torchrun kills them."""
    if rank is None:
        if error is not None:
            raise error
        return
    messages = all_gather(None if error is None else str(error))
    failed = [(index, message) for index, message in enumerate(messages) if message is not None]
    if failed:
        index, message = failed[0]
        raise UsageError(message if index == rank.rank and len(failed) == 1 else f"rank {index}: {message}")


def already_sharded(batches: Any) -> bool:
    """A DataLoader with a DistributedSampler already gives each rank its own shard."""
    sampler = getattr(batches, "sampler", None)
    return (getattr(sampler, "num_replicas", 1) or 1) > 1


def _merge_measurement(per_rank: list[Measurement]) -> Measurement:
    values = [m.value for m in per_rank]
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) == len(values):
        value: Any = float(sum(numeric) / len(numeric))
    else:
        value = values[0] if all(v == values[0] for v in values) else "differs across ranks"
    return per_rank[0].model_copy(update={"value": value, "verdict": Verdict.worst(m.verdict for m in per_rank)})


def _merge_check(per_rank: list[CheckResult]) -> CheckResult:
    worst = max(range(len(per_rank)), key=lambda r: per_rank[r].verdict.severity)
    base = per_rank[worst]
    summary = base.summary
    if len({r.verdict for r in per_rank}) > 1:
        summary = f"rank {worst}: {summary}"
    measurements = base.measurements
    names = [[m.name for m in r.measurements] for r in per_rank]
    details = dict(base.details)
    if all(n == names[0] for n in names):
        measurements = [_merge_measurement([r.measurements[i] for r in per_rank]) for i in range(len(names[0]))]
        details["ranks"] = {m.name: [r.measurements[i].value for r in per_rank]
                            for i, m in enumerate(per_rank[0].measurements)}
    return base.model_copy(update={"summary": summary, "measurements": measurements, "details": details,
                                   "duration_s": max(r.duration_s for r in per_rank)})


def merge(reports: list[Report]) -> Report:
    """One report for all ranks: the same on every rank, so every rank exits with the same code."""
    first = reports[0]
    ids = [[c.id for c in r.checks] for r in reports]
    if any(i != ids[0] for i in ids):
        raise RuntimeError(f"ranks ran different checks: {ids}")
    checks = [_merge_check([r.checks[i] for r in reports]) for i in range(len(ids[0]))]
    environment = first.environment.model_copy(update={"world_size": len(reports)})
    return first.model_copy(update={"checks": checks, "verdict": overall_verdict(checks),
                                    "exit_code": int(exit_code_for(checks)), "environment": environment,
                                    "interrupted": any(r.interrupted for r in reports)})
