"""`ranks`: what only breaks across ranks under torchrun — each rank must train the same model on the same latents.

Every rank measures its own fingerprint (VAE scaling configuration, a hash of the trainable parameters at start, the
statistics of its z1, the kl_weight schedule, the range of t) and the fingerprints are exchanged with
``all_gather_object``; any rank that disagrees with rank 0 is named.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Hit, Judgement, Rule, Skip, Thresholds
from fmcheck.judges import flag, info
from fmcheck.verdict import Verdict

SCHEDULE_FRACTIONS = (0.0, 0.01, 0.05, 0.1, 0.5)
CONFIG_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")


class RanksThresholds(Thresholds):
    z1_std_rtol: float = Field(0.2, gt=0, description="relative difference of the std of z1 between a rank and rank "
                                                      "0 above which the ranks' latents are not in the same units")
    t_range_atol: float = Field(0.25, gt=0, description="difference of min(t) or max(t) between ranks above which "
                                                        "t is not sampled over the same range")


def _params_hash(pipeline: Any) -> str:
    import torch

    digest = hashlib.sha256()
    for name, module in sorted(pipeline.trainable_modules().items()):
        for pname, param in module.state_dict().items():
            data = param.detach().cpu().contiguous()
            digest.update(f"{name}.{pname}".encode())
            if data.numel():
                digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _vae_config(vae: Any) -> dict[str, Any]:
    config = getattr(vae, "config", None)
    if config is None:
        return {}
    values = {}
    for key in CONFIG_KEYS:
        value = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
        values[key] = list(value) if isinstance(value, (list, tuple)) else value
    return values


# -- evidence --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RankRecord:
    """One rank's fingerprint (what ``measure`` gathered from it); None where the rank could not measure it."""

    vae: dict[str, Any] = field(default_factory=dict)
    params: Optional[str] = None
    z1_std: Optional[float] = None
    t_min: Optional[float] = None
    t_max: Optional[float] = None
    kl_schedule: Optional[tuple[float, ...]] = None


@dataclass(frozen=True)
class RanksEvidence:
    ranks: tuple[RankRecord, ...]  # rank 0 first

    @classmethod
    def from_observation(cls, records: list[dict[str, Any]]) -> "RanksEvidence":
        return cls(tuple(RankRecord(vae=r.get("vae", {}), params=r.get("params"), z1_std=r.get("z1_std"),
                                    t_min=r.get("t_min"), t_max=r.get("t_max"),
                                    kl_schedule=tuple(r["kl_schedule"]) if r.get("kl_schedule") is not None
                                    else None) for r in records))

    def differing(self, key: str, same: Callable[[Any, Any], bool]) -> list[int]:
        """The ranks whose ``key`` disagrees with rank 0's (nothing to compare when rank 0 has none)."""
        reference = getattr(self.ranks[0], key)
        if reference is None:
            return []
        return [i for i, r in enumerate(self.ranks) if i and not same(getattr(r, key), reference)]


def _equal(a, b) -> bool:
    return a == b


def differences(ev: RanksEvidence, th: RanksThresholds) -> dict[str, list[int]]:
    """What differs from rank 0, and on which ranks: the rows of the measurements table."""
    def close_rel(a, b):
        return a is not None and abs(a - b) <= th.z1_std_rtol * max(abs(b), 1e-12)

    def close_abs(a, b):
        return a is not None and abs(a - b) <= th.t_range_atol

    return {"VAE scaling config": ev.differing("vae", _equal),
            "trainable weights at start": ev.differing("params", _equal),
            "z1 std": ev.differing("z1_std", close_rel),
            "kl_weight schedule": ev.differing("kl_schedule", _equal),
            "t min": ev.differing("t_min", close_abs),
            "t max": ev.differing("t_max", close_abs)}


def _on(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


# -- rules -----------------------------------------------------------------------------------------------------
def _vae(ev: RanksEvidence, th: RanksThresholds):
    ranks = differences(ev, th)["VAE scaling config"]
    if not ranks:
        return None
    theirs, ours = ev.ranks[ranks[0]].vae.get("scaling_factor"), ev.ranks[0].vae.get("scaling_factor")
    return Hit.of(_short(theirs), f"{_short(ours)} as on rank 0", ranks=_on(ranks), ours=_short(ours))


def _params(ev: RanksEvidence, th: RanksThresholds):
    ranks = differences(ev, th)["trainable weights at start"]
    if ranks:
        return Hit.of(ev.ranks[ranks[0]].params, f"{ev.ranks[0].params} as on rank 0", ranks=_on(ranks))
    return None


def _z1(ev: RanksEvidence, th: RanksThresholds):
    ranks = differences(ev, th)["z1 std"]
    if not ranks:
        return None
    theirs, ours = ev.ranks[ranks[0]].z1_std, ev.ranks[0].z1_std
    shown = f"{theirs:.4g}" if theirs is not None else "not measured"
    return Hit.of(theirs, f"within {th.z1_std_rtol:.0%} of {ours:.4g}", ranks=_on(ranks), shown=shown,
                  ours=f"{ours:.4g}")


def _schedule(ev: RanksEvidence, th: RanksThresholds):
    ranks = differences(ev, th)["kl_weight schedule"]
    if not ranks:
        return None
    def listing(schedule):
        return ", ".join(f"{w:.4g}" for w in schedule) if schedule is not None else "not measured"
    return Hit.of(listing(ev.ranks[ranks[0]].kl_schedule), f"{listing(ev.ranks[0].kl_schedule)} as on rank 0",
                  ranks=_on(ranks))


def _t_range(ev: RanksEvidence, th: RanksThresholds):
    found = differences(ev, th)
    ranks = sorted(set(found["t min"]) | set(found["t max"]))
    if not ranks:
        return None
    def span(r: RankRecord) -> str:
        return f"[{r.t_min:.4g}, {r.t_max:.4g}]" if r.t_min is not None and r.t_max is not None else "not measured"
    return Hit.of(span(ev.ranks[ranks[0]]), f"{span(ev.ranks[0])} +-{th.t_range_atol:g} as on rank 0",
                  ranks=_on(ranks))


CONFIG_FIX = "load the configuration once (one file) and broadcast it, not from per-node files or the environment"
RULES = (
    Rule(code="ranks.vae_differs", verdict=Verdict.FAIL, title="a rank uses another VAE scaling configuration",
         message="VAE scaling config on rank {ranks} differs from rank 0 (scaling_factor {observed} vs {ours} on "
                 "rank 0)",
         fix=CONFIG_FIX, test=_vae,
         doc="The VAE config's scaling_factor, shift_factor, latents_mean and latents_std on each rank against rank "
             "0's. A rank that loaded another config (a per-node file, an environment variable) encodes its "
             "latents in other units, and the averaged gradients mix incompatible targets."),
    Rule(code="ranks.z1_units_differ", verdict=Verdict.FAIL, title="a rank's z1 is in other units",
         message="z1 std on rank {ranks} differs from rank 0 ({shown} vs {ours}; expected {bound})",
         fix="encode z1 the same way on every rank: the same VAE, config and normalisation, loaded once and "
             "broadcast", test=_z1,
         doc="The std of z1 (the step's x1) over each rank's own shard of batches, against rank 0's within "
             "`z1_std_rtol` (20% relative). Shards differ in data, so only a difference in units is caught; raise "
             "`z1_std_rtol` if the ranks' data legitimately differ more."),
    Rule(code="ranks.params_differ", verdict=Verdict.FAIL, title="the ranks start from different weights",
         message="trainable weights at start on rank {ranks} differ from rank 0 (hash {observed} vs {bound})",
         fix="wrap modules in DDP (which broadcasts rank 0's weights) or broadcast rank 0's state dict before "
             "training", test=_params,
         doc="A hash of every trainable parameter and buffer at start, on each rank against rank 0's. Weights "
             "initialised per rank without a broadcast train different models; DDP hides it only when the module "
             "is wrapped before any rank-dependent initialisation."),
    Rule(code="ranks.kl_schedule_differs", verdict=Verdict.FAIL, title="a rank uses another kl_weight schedule",
         message="kl_weight schedule on rank {ranks} differs from rank 0 ({observed} vs {bound})",
         fix="compute kl_weight from the step index and one shared config: " + CONFIG_FIX, test=_schedule,
         doc="The step's kl_weight at 0, 1%, 5%, 10% and 50% of total_steps on each rank, against rank 0's exactly: "
             "a schedule read from a per-rank config or the environment weights the KL differently per rank."),
    Rule(code="ranks.t_range_differs", verdict=Verdict.FAIL, title="a rank samples t over another range",
         message="t range on rank {ranks} differs from rank 0 ({observed} vs {bound})",
         fix="configure the t sampler from one shared config; seed per rank only the data order", test=_t_range,
         doc="min and max of t on each rank against rank 0's within `t_range_atol` (0.25): a t sampler configured "
             "or seeded differently per rank (another distribution, timesteps in another unit) trains each rank "
             "on another part of the path."),
)


class RanksCheck(Check):
    id = "ranks"
    title = "Cross-rank consistency"
    purpose = "Under torchrun: the same VAE scaling, start weights, z1 units, KL schedule and t range on every rank."
    order = 90
    Thresholds = RanksThresholds
    rules = RULES
    doc = CheckDoc(
        what=(
            "Under torch.distributed only (skipped otherwise). Each rank records: the VAE config's scaling_factor, "
            "shift_factor, latents_mean and latents_std; a hash of every trainable parameter and buffer at start; "
            "the mean and std of z1 (the step's x1) over its own shard of batches; the step's kl_weight at steps "
            "0, 1%, 5%, 10% and 50% of total_steps; and min/max of t. The records are gathered on every rank and "
            "each rank is compared with rank 0."
        ),
        why=(
            "Some bugs exist only across ranks and are invisible on one GPU: a node that loaded another VAE config "
            "(so its latents are in other units), weights initialised per rank without a broadcast (DDP hides it "
            "only if the module is wrapped before any rank-dependent init), a KL schedule read from a per-rank "
            "config, a t sampler seeded or configured differently. The averaged gradients then mix incompatible "
            "targets and the run drifts with no error."
        ),
        bug_example="A launch script that sets VAE_SCALE from a per-node environment file; rank 1 gets 0.13025 "
                    "while rank 0 uses 0.18215.",
        fix=(
            "Load configuration once and broadcast it (or read it from one file); wrap modules in "
            "DistributedDataParallel (which broadcasts rank 0's weights) before training or broadcast the state "
            "dict yourself; seed samplers per rank only for data order, never for schedules."
        ),
        causes=("per-node config files", "rank-dependent initialisation", "a schedule read from the environment"),
        blind_spots=("z1 statistics are compared within a tolerance: shards differ in data, so only a difference "
                     "in units (a factor of 1.2 or more by default) is caught.",),
    )

    def measure(self, ctx):
        import torch

        from fmcheck.distributed import all_gather

        if ctx.rank is None:
            raise Skip("not running under torch.distributed (start with torchrun to audit ranks)")
        outputs = ctx.all_outputs()
        record: dict[str, Any] = {"vae": _vae_config(ctx.pipeline.vae), "params": _params_hash(ctx.pipeline)}
        if all("x1" in o for o in outputs):
            x1 = torch.cat([o["x1"].detach().float().flatten().cpu() for o in outputs])
            record["z1_mean"], record["z1_std"] = float(x1.mean()), float(x1.std())
        if all("t" in o for o in outputs):
            t = torch.cat([o["t"].detach().float().flatten().cpu() for o in outputs])
            record["t_min"], record["t_max"] = float(t.min()), float(t.max())
        total = ctx.pipeline.total_steps
        if total and "kl_weight" in outputs[0]:
            batch = ctx.batches(1)[0]
            record["kl_schedule"] = [round(ctx.run_step(batch, int(f * total), grad=False).number("kl_weight"), 12)
                                     for f in SCHEDULE_FRACTIONS]
        return all_gather(record)

    def judge(self, records: list[dict[str, Any]], th: RanksThresholds) -> Judgement:
        ev = RanksEvidence.from_observation(records)
        measurements = [info("ranks", len(ev.ranks))]
        for label, ranks in differences(ev, th).items():
            measurements.append(flag(f"{label} differs on", not ranks, value=", ".join(map(str, ranks)) or "none",
                                     expected="none"))
        if ev.ranks[0].z1_std is not None:
            stds = [r.z1_std if r.z1_std is not None else math.nan for r in ev.ranks]
            measurements.append(info("z1 std per rank", ", ".join(f"{s:.4g}" for s in stds)))
        return self.conclude(ev, th, measurements, f"{len(ev.ranks)} ranks agree on scaling, weights, z1 units, KL "
                                                   "schedule and t range")


def _short(value: Any) -> str:
    """A configured number as people read it (5 significant digits), not Python's repr (0.29191359976754394)."""
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    return str(value)

