"""Running under torchrun: detect the process group, shard batches per rank, merge the ranks' reports.

fmcheck uses torch.distributed itself (gloo on CPU, NCCL on CUDA): an existing process group is reused, otherwise one
is created from torchrun's environment. Every rank runs every check on its own shard of batches; the reports are
gathered with ``all_gather_object`` and merged identically on every rank (the worst verdict, shown through the rank
that had it: its own summary, hint and numbers; every rank's values listed beside them and kept in
``details["ranks"]``), so every rank exits with the same code. Only rank 0 renders and writes.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

from .errors import UsageError
from .report import CheckResult, Measurement, Report, exit_code_for, overall_verdict


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
        from .isolate import capture

        # All ranks leave together: a rank that exits while another still tears the group down can make the
        # other's transport abort (SIGABRT) instead of exiting with fmcheck's code. A dead peer makes the barrier
        # fail at once, which changes nothing here.
        capture(dist.barrier)
        dist.destroy_process_group()


def all_gather(value: Any) -> list[Any]:
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(rank: Optional[Rank]) -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if rank is not None:
        import torch.distributed as dist

        dist.barrier()


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


def _shown(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _with_ranks(m: Measurement, values: list[Any]) -> Measurement:
    """The shown rank's measurement, unchanged (its value, bound and verdict belong together), with every rank's
    value in its note when they differ."""
    if all(v == values[0] for v in values):
        return m
    listing = "per rank: " + ", ".join(_shown(v) for v in values)
    return m.model_copy(update={"note": f"{m.note}; {listing}" if m.note else listing})


def _merge_check(per_rank: list[CheckResult]) -> CheckResult:
    """One row for a check run on every rank: the worst verdict, shown through the rank that had it.

    The row is that rank's own result (summary, hint, numbers and their verdicts): a mean over ranks would be a value
    no rank measured (the mean of two configured scaling factors) and would not match the summary's numbers. Every
    rank's value of each measurement is listed in its note and kept in ``details["ranks"]``.
    """
    worst = max(range(len(per_rank)), key=lambda r: (per_rank[r].verdict.severity, -r))
    base = per_rank[worst]
    world = len(per_rank)
    verdicts = [r.verdict for r in per_rank]
    if all(r.summary == base.summary for r in per_rank):
        summary = base.summary  # computed from gathered data (the ranks check), or the same on every rank
    elif len(set(verdicts)) > 1:
        others = ", ".join(f"rank {r} {v.value}" for r, v in enumerate(verdicts) if r != worst)
        summary = f"rank {worst} of {world} ({others}): {base.summary}"
    else:
        summary = f"all {world} ranks {base.verdict.value}; rank {worst}: {base.summary}"
    by_name = [{m.name: m.value for m in r.measurements} for r in per_rank]
    shared = [m.name for m in base.measurements if all(m.name in names for names in by_name)]
    measurements = [_with_ranks(m, [names[m.name] for names in by_name]) if m.name in shared else m
                    for m in base.measurements]
    details = dict(base.details)
    details["ranks"] = {name: [names[name] for names in by_name] for name in shared}
    details["rank_verdicts"] = [v.value for v in verdicts]
    details["shown_rank"] = worst
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
