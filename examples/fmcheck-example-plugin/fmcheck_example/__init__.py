"""An example fmcheck plugin: the `time_coverage` check."""

from __future__ import annotations

from pydantic import Field

from fmcheck import Check, CheckDoc, Hit, Rule, Skip, Thresholds, Verdict, judges


class TimeCoverageThresholds(Thresholds):
    min_span: float = Field(0.8, description="t must span at least this share of [0, 1] over the sampled batches")
    min_bin_share: float = Field(0.02, description="every tenth of [0, 1] must hold at least this share of t samples")


def _narrow(obs, th):
    if obs["span"] < th.min_span:
        return Hit.of(obs["span"], f">= {th.min_span:g}", "of [0, 1]")
    return None


def _gap(obs, th):
    if obs["min_bin_share"] < th.min_bin_share:
        return Hit.of(obs["min_bin_share"], f">= {th.min_bin_share:g}", "share")
    return None


RULES = (
    Rule("time_coverage.narrow", Verdict.WARN, "t spans only part of [0, 1]",
         message="t spans {observed} of [0, 1] (expected {bound}): part of the path is never trained",
         fix="sample t over all of [0, 1] (uniform, logit-normal: any density positive on the whole interval)",
         test=_narrow,
         doc="The span max(t) - min(t) of the t values the step draws over the measured batches, after dividing "
             "timestep units (max > 1.5) by 1000. The velocity field is learned only where t is sampled."),
    Rule("time_coverage.gap", Verdict.WARN, "a tenth of [0, 1] is (almost) never sampled",
         message="the emptiest tenth of [0, 1] holds {observed} of the t samples (expected {bound})",
         fix="check the t sampler's density: it must not vanish on part of [0, 1]",
         test=_gap,
         doc="The share of t samples in the emptiest tenth of [0, 1]. A logit-normal density with a large scale, "
             "or a mode-seeking sampler, can starve one end; a gap there leaves that part of the path untrained."),
)


class TimeCoverageCheck(Check):
    id = "time_coverage"
    title = "time sampling covers [0, 1]"
    purpose = "Does the step's t visit the whole time interval?"
    doc = CheckDoc(
        what="The span of the t values the step draws over a few batches, and the share of samples in each tenth of "
             "[0, 1] (t in timestep units, max > 1.5, is divided by its scale first).",
        why="The velocity field is only learned where t is sampled: a constant t, a narrow range, or a sampler that "
            "never reaches one end leaves part of the path untrained, and sampling then walks through it blind.",
        bug_example="t = torch.rand(B) * 0.1  (a leftover debugging range), or t = torch.full((B,), 0.5).",
        fix="Draw t over the whole interval: uniform, logit-normal or any density that is positive on all of [0, 1].",
        causes=("a debugging range left in", "t drawn once per epoch instead of per sample", "wrong units"),
    )
    requires_outputs = ("t",)
    Thresholds = TimeCoverageThresholds
    order = 90
    rules = RULES

    def measure(self, ctx):
        import torch

        t = torch.cat([out["t"].detach().float().flatten().cpu() for out in ctx.all_outputs()])
        if t.numel() < 20:
            raise Skip(f"only {t.numel()} t values in the sampled batches; need 20")
        scale = 1000.0 if float(t.max()) > 1.5 else 1.0
        t = t / scale
        counts = torch.histc(t.clamp(0, 1), bins=10, min=0.0, max=1.0)
        return {"span": float(t.max() - t.min()), "min_bin_share": float(counts.min() / t.numel()),
                "samples": int(t.numel()), "scale": scale}

    def judge(self, obs, th):
        measurements = [
            judges.at_least("t span", obs["span"], warn=th.min_span, fail=None),
            judges.at_least("emptiest tenth of [0,1]", obs["min_bin_share"], warn=th.min_bin_share, fail=None,
                            unit="share"),
            judges.info("t samples", obs["samples"]),
        ]
        passed = f"t spans {obs['span']:.2f} of [0,1]; emptiest tenth holds {obs['min_bin_share']:.1%}"
        return self.conclude(obs, th, measurements, passed)
