"""`ranks`: what only breaks across ranks under torchrun — each rank must train the same model on the same latents.

Every rank measures its own fingerprint (VAE scaling configuration, a hash of the trainable parameters at start, the
statistics of its z1, the kl_weight schedule, the range of t) and the fingerprints are exchanged with
``all_gather_object``; any rank that disagrees with rank 0 is named.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pydantic import Field

from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds
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


class RanksCheck(Check):
    id = "ranks"
    title = "Cross-rank consistency"
    purpose = "Under torchrun: the same VAE scaling, start weights, z1 units, KL schedule and t range on every rank."
    order = 90
    Thresholds = RanksThresholds
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
        reference = records[0]
        others = range(1, len(records))

        def differing(key: str, same) -> list[int]:
            return [r for r in others if key in reference and not same(records[r].get(key), reference[key])]

        def close_rel(a, b):
            return a is not None and abs(a - b) <= th.z1_std_rtol * max(abs(b), 1e-12)

        def close_abs(a, b):
            return a is not None and abs(a - b) <= th.t_range_atol

        findings = {
            "VAE scaling config": differing("vae", lambda a, b: a == b),
            "trainable weights at start": differing("params", lambda a, b: a == b),
            "z1 std": differing("z1_std", close_rel),
            "kl_weight schedule": differing("kl_schedule", lambda a, b: a == b),
            "t min": differing("t_min", close_abs),
            "t max": differing("t_max", close_abs),
        }
        measurements = [info("ranks", len(records))]
        for name, ranks in findings.items():
            measurements.append(flag(f"{name} differs on", not ranks, value=", ".join(map(str, ranks)) or "none",
                                     expected="none"))
        if "z1_std" in reference:
            stds = [r.get("z1_std", math.nan) for r in records]
            measurements.append(info("z1 std per rank", ", ".join(f"{s:.4g}" for s in stds)))
        bad = {name: ranks for name, ranks in findings.items() if ranks}
        if not bad:
            return Judgement(measurements, f"{len(records)} ranks agree on scaling, weights, z1 units, KL schedule "
                                           "and t range")
        parts = [f"{name} on rank {', '.join(map(str, ranks))}" for name, ranks in bad.items()]
        detail = ""
        if "VAE scaling config" in bad:
            r = bad["VAE scaling config"][0]
            detail = (f" (scaling_factor {_short(records[r]['vae'].get('scaling_factor'))} vs "
                      f"{_short(reference['vae'].get('scaling_factor'))} on rank 0)")
        return Judgement(measurements, "differs from rank 0: " + "; ".join(parts) + detail,
                         hint="load the configuration once and broadcast it; wrap modules in DDP (or broadcast "
                              "rank 0's state dict) before training",
                         verdict=Verdict.FAIL)


def _short(value: Any) -> str:
    """A configured number as people read it (5 significant digits), not Python's repr (0.29191359976754394)."""
    if isinstance(value, float):
        return f"{value:.5g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value[:4]) + (", ..." if len(value) > 4 else "") + "]"
    return str(value)
