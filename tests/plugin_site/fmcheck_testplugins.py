"""Test-only checks, installed as a third-party distribution through real entry-point metadata (see the dist-info)."""

from __future__ import annotations

import time

from fmcheck import judges
from fmcheck.api import Check, CheckDoc, Judgement, Skip, Thresholds

DOC = CheckDoc(what="test", why="test", bug_example="test", fix="test")


class RatioThresholds(Thresholds):
    warn_factor: float = 2.0
    fail_factor: float = 3.0


class Ratio(Check):
    """Measures ||x1|| / ||x0|| on the cached outputs, so thresholds decide PASS / WARN / FAIL."""

    id, title, purpose, doc = "t_ratio", "norm ratio (test)", "test-only ratio check", DOC
    requires_outputs = ("x0", "x1")
    Thresholds = RatioThresholds
    order = 1

    def measure(self, ctx):
        out = ctx.outputs(0)
        return float(out["x1"].norm(dim=-1).mean() / out["x0"].norm(dim=-1).mean())

    def judge(self, ratio, th):
        m = judges.ratio_within("x1/x0", ratio, warn_factor=th.warn_factor, fail_factor=th.fail_factor)
        return Judgement([m], summary=f"ratio {ratio:.3g}", hint="fix the scale" if m.verdict != "pass" else None)


class Raises(Check):
    id, title, purpose, doc = "t_raise", "raises (test)", "test-only check that crashes", DOC
    order = 2

    def measure(self, ctx):
        raise RuntimeError("boom <&> \x01")

    def judge(self, obs, th):  # pragma: no cover - never reached
        return Judgement([], "unreachable")


class Hangs(Check):
    id, title, purpose, doc = "t_hang", "hangs (test)", "test-only check that never returns", DOC
    order = 3

    def measure(self, ctx):
        while True:
            time.sleep(0.01)

    def judge(self, obs, th):  # pragma: no cover
        return Judgement([], "unreachable")


class Mutates(Check):
    """Trains a few steps with the user's optimizer and draws from every RNG: the runner must undo all of it."""

    id, title, purpose, doc = "t_mutate", "mutates state (test)", "test-only check that changes everything", DOC
    requires = ("optimizer",)
    order = 4

    def measure(self, ctx):
        import random

        import numpy as np
        import torch

        pipeline = ctx.pipeline
        for index, batch in enumerate(ctx.batches(2)):
            out = ctx.run_step(batch, index)
            pipeline.optimizer.zero_grad()
            out["loss"].backward()
            pipeline.optimizer.step()
        for module in pipeline.trainable_modules().values():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)
        random.random(), np.random.rand(), torch.rand(3)
        return 1.0

    def judge(self, obs, th):
        return Judgement([judges.info("steps", 2)], "mutated")


class Interrupts(Check):
    id, title, purpose, doc = "t_interrupt", "interrupted (test)", "test-only check that mutates then gets Ctrl-C", DOC
    requires = ("optimizer",)
    order = 5

    def measure(self, ctx):
        Mutates().measure(ctx)
        raise KeyboardInterrupt

    def judge(self, obs, th):  # pragma: no cover
        return Judgement([], "unreachable")


class NeedsVae(Check):
    id, title, purpose, doc = "t_needs_vae", "needs a VAE (test)", "test-only check that needs the vae field", DOC
    requires = ("vae",)
    order = 6

    def measure(self, ctx):  # pragma: no cover
        return None

    def judge(self, obs, th):  # pragma: no cover
        return Judgement([], "unreachable")


class SkipsItself(Check):
    id, title, purpose, doc = "t_skip", "skips (test)", "test-only check that raises Skip", DOC
    order = 7

    def measure(self, ctx):
        raise Skip("the pipeline has no head")

    def judge(self, obs, th):  # pragma: no cover
        return Judgement([], "unreachable")


class WarnAlways(Check):
    id, title, purpose, doc = "t_warn", "warns (test)", "test-only check that always warns", DOC
    order = 8

    def measure(self, ctx):
        return 5.0

    def judge(self, value, th):
        return Judgement([judges.at_most("value", value, warn=1.0, fail=10.0)], "warned", hint="lower it")


class OutOfMemory(Check):
    """Simulates a CUDA out-of-memory error in the middle of a check."""

    id, title, purpose, doc = "t_oom", "out of memory (test)", "test-only check that runs out of memory", DOC
    order = 9

    def measure(self, ctx):
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def judge(self, obs, th):  # pragma: no cover
        return Judgement([], "unreachable")


# --- a check with declared rules: findings under codes (--ignore, explain, JSON findings[], JUnit cases) ---------
from fmcheck.findings import Hit, Rule  # noqa: E402
from fmcheck.verdict import Verdict  # noqa: E402


class RulesThresholds(Thresholds):
    warn_factor: float = 2.0
    fail_factor: float = 3.0
    break_rule: bool = False


def _spread(ratio: float) -> float:
    return max(ratio, 1 / ratio)


def _far(ratio, th):
    if _spread(ratio) > th.fail_factor:
        return Hit.of(ratio, f"<= {th.fail_factor:g}x either way", "x")
    return None


def _off(ratio, th):
    if th.warn_factor < _spread(ratio) <= th.fail_factor:
        return Hit.of(ratio, f"<= {th.warn_factor:g}x either way", "x")
    return None


def _broken(ratio, th):
    if th.break_rule:
        raise ZeroDivisionError("division by zero")
    return None


def _x0_small(ratio, th):
    return Hit.of(ratio, "", "x", side="x1") if ratio > 1 else Hit.of(ratio, "", "x", side="x0")


RULES_DOC = "A test rule: the ratio of ||x1|| to ||x0|| on batch 0, held to the configured factors either way."


class WithRules(Check):
    """The ratio again, judged by declared rules."""

    id, title, purpose, doc = "t_rules", "ratio by rules (test)", "test-only check with declared rules", DOC
    requires_outputs = ("x0", "x1")
    Thresholds = RulesThresholds
    order = 8
    rules = (
        Rule("t_rules.far", Verdict.FAIL, "the ratio is far from 1", "||x1||/||x0|| = {observed} (bound {bound})",
             "fix the scale", _far, RULES_DOC),
        Rule("t_rules.off", Verdict.WARN, "the ratio is off", "||x1||/||x0|| = {observed}", "check the scale", _off,
             RULES_DOC),
        Rule("t_rules.broken", Verdict.WARN, "a rule that raises on request", "never shown", "none", _broken,
             RULES_DOC),
        Rule("t_rules.larger", Verdict.WARN, "one side is larger", "the larger side is {side}", "none needed",
             _x0_small, RULES_DOC),
    )

    def measure(self, ctx):
        out = ctx.outputs(0)
        return float(out["x1"].norm(dim=-1).mean() / out["x0"].norm(dim=-1).mean())

    def judge(self, ratio, th):
        return self.conclude(ratio, th, [judges.info("x1/x0", ratio, "x")], passed=f"ratio {ratio:.3g}")
