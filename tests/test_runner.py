"""The runner: isolation of each check, skips, timeouts, interrupts, and exact restoration of the user's state."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fmcheck.config import Settings
from fmcheck.errors import PipelineError, UsageError
from fmcheck.runner import run
from fmcheck.state import state_digest
from fmcheck.verdict import ExitCode, Verdict


def verdicts(report):
    return {c.id: c.verdict for c in report.checks}


def test_a_crashing_check_is_an_error_row_and_the_others_still_report(tiny_pipeline, test_registry):
    report = run(tiny_pipeline, registry=test_registry, only=["t_ratio", "t_raise", "t_warn"])
    assert verdicts(report) == {"t_ratio": Verdict.PASS, "t_raise": Verdict.ERROR, "t_warn": Verdict.WARN}
    crashed = report.check("t_raise")
    assert "check crashed: RuntimeError: boom" in crashed.summary
    assert "Traceback" in crashed.error
    assert report.exit_code == ExitCode.ERROR


def test_a_hanging_check_times_out(tiny_pipeline, test_registry):
    report = run(tiny_pipeline, Settings(timeout=0.5), registry=test_registry, only=["t_hang", "t_ratio"])
    hung = report.check("t_hang")
    assert hung.verdict is Verdict.ERROR
    assert "timed out after 0.5 s" in hung.summary
    assert 0.4 < hung.duration_s < 5
    assert report.check("t_ratio").verdict is Verdict.PASS


def test_state_is_bit_identical_after_a_check_that_trains_and_draws_randomness(tiny_pipeline, test_registry):
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    before = state_digest(tiny_pipeline)
    report = run(tiny_pipeline, registry=test_registry, only=["t_mutate"])
    assert report.check("t_mutate").verdict is Verdict.PASS
    assert state_digest(tiny_pipeline) == before


def test_the_digest_sees_every_kind_of_change(tiny_pipeline):
    """The guarantee above is only as good as the digest: it must notice each thing a check could disturb."""
    head = tiny_pipeline.trainable["head"]
    param = next(head.parameters())
    mutations = [
        lambda: param.data.add_(1e-6),
        lambda: head.eval(),
        lambda: param.requires_grad_(False),
        lambda: setattr(param, "grad", torch.zeros_like(param)),
        lambda: torch.rand(1),
        lambda: np.random.rand(),
        lambda: random.random(),
    ]
    for mutate in mutations:
        before = state_digest(tiny_pipeline)
        mutate()
        assert state_digest(tiny_pipeline) != before
    # optimizer state
    before = state_digest(tiny_pipeline)
    loss = tiny_pipeline.step(tiny_pipeline.batches[0], 0)["loss"]
    loss.backward()
    tiny_pipeline.optimizer.step()
    assert state_digest(tiny_pipeline) != before


def test_keyboard_interrupt_restores_state_and_returns_the_partial_report(tiny_pipeline, test_registry):
    before = state_digest(tiny_pipeline)
    report = run(tiny_pipeline, registry=test_registry, only=["t_ratio", "t_interrupt", "t_warn"])
    assert report.interrupted
    assert verdicts(report) == {"t_ratio": Verdict.PASS, "t_interrupt": Verdict.ERROR, "t_warn": Verdict.SKIP}
    assert "interrupted" in report.check("t_interrupt").summary
    assert state_digest(tiny_pipeline) == before


def test_missing_needs_skip_with_the_reason(tiny_pipeline, test_registry):
    report = run(tiny_pipeline, registry=test_registry, only=["t_needs_vae", "t_skip"])
    assert report.check("t_needs_vae").verdict is Verdict.SKIP
    assert "needs pipeline field 'vae'" in report.check("t_needs_vae").summary
    assert report.check("t_skip").summary == "skipped: the pipeline has no head"
    assert report.exit_code == ExitCode.OK


def test_missing_step_outputs_skip_naming_the_keys(test_registry):
    import tiny
    from fmcheck.contract import coerce

    data = tiny.build()
    step = data["step"]
    data["step"] = lambda batch, i: {"loss": step(batch, i)["loss"]}
    report = run(coerce(data), registry=test_registry, only=["t_ratio"])
    assert report.check("t_ratio").verdict is Verdict.SKIP
    assert "step output lacks 'x0', 'x1'" in report.check("t_ratio").summary


@pytest.mark.parametrize(
    "step, message",
    [
        (lambda b, i: [1, 2], "returned a list; expected a mapping"),
        (lambda b, i: {"x0": torch.zeros(2)}, "returned no 'loss'"),
        (lambda b, i: {"loss": torch.zeros(3)}, "output 'loss' has shape (3,); expected a scalar"),
        (lambda b, i: {"loss": torch.zeros(()), "x0": "text"}, "output 'x0' is a str"),
        (lambda b, i: 1 / 0, "raised ZeroDivisionError: division by zero (tests/test_runner.py:"),
    ],
)
def test_a_broken_step_stops_the_run_with_one_line(step, message, test_registry):
    import tiny
    from fmcheck.contract import coerce

    data = tiny.build()
    data["step"] = step
    with pytest.raises(PipelineError) as info:
        run(coerce(data), registry=test_registry, only=["t_ratio"])
    assert message in str(info.value)


def test_empty_batches_are_named(test_registry):
    import tiny
    from fmcheck.contract import coerce

    data = tiny.build()
    data["batches"] = []
    with pytest.raises(PipelineError, match="'batches' yielded no batch"):
        run(coerce(data), registry=test_registry, only=["t_ratio"])


def test_thresholds_change_the_verdict_and_are_validated(tiny_pipeline, test_registry):
    strict = Settings(thresholds={"t_ratio": {"warn_factor": 1.001, "fail_factor": 1.002}})
    assert run(tiny_pipeline, strict, registry=test_registry, only=["t_ratio"]).check("t_ratio").verdict is Verdict.FAIL
    with pytest.raises(UsageError, match="warn_factor: Input should be a valid number"):
        run(tiny_pipeline, Settings(thresholds={"t_ratio": {"warn_factor": "x"}}), registry=test_registry,
            only=["t_ratio"])
    with pytest.raises(UsageError, match=r"unknown threshold 'nope' for check 't_ratio' \(known: fail_factor, "):
        run(tiny_pipeline, Settings(thresholds={"t_ratio": {"nope": 1}}), registry=test_registry, only=["t_ratio"])
    with pytest.raises(UsageError, match="unknown check id 'nope'"):
        run(tiny_pipeline, Settings(thresholds={"nope": {"a": 1}}), registry=test_registry, only=["t_ratio"])


def test_unknown_check_id_is_a_usage_error(tiny_pipeline, test_registry):
    with pytest.raises(UsageError, match="unknown check id 'nope'"):
        run(tiny_pipeline, registry=test_registry, only=["nope"])


def test_strict_promotes_warnings(tiny_pipeline, test_registry):
    report = run(tiny_pipeline, Settings(strict=True), registry=test_registry, only=["t_warn"])
    assert report.check("t_warn").verdict is Verdict.FAIL
    assert report.exit_code == ExitCode.FAILED


def test_same_seed_same_report(tiny_pipeline, test_registry):
    first = run(tiny_pipeline, registry=test_registry, only=["t_ratio", "t_warn"])
    second = run(tiny_pipeline, registry=test_registry, only=["t_ratio", "t_warn"])
    strip = lambda r: [c.model_dump(exclude={"duration_s"}) for c in r.checks]  # noqa: E731
    assert strip(first) == strip(second)


def test_out_of_memory_is_an_error_row_with_a_hint_and_the_others_still_report(tiny_pipeline, test_registry):
    before = state_digest(tiny_pipeline)
    report = run(tiny_pipeline, registry=test_registry, only=["t_oom", "t_ratio"])
    oom = report.check("t_oom")
    assert oom.verdict is Verdict.ERROR and "out of accelerator memory" in oom.summary
    assert "batch size" in oom.hint
    assert report.check("t_ratio").verdict is Verdict.PASS
    assert state_digest(tiny_pipeline) == before


def test_fmcheck_never_unpickles_without_weights_only():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    offenders = [str(p) for folder in ("fmcheck", "checks") for p in (root / folder).rglob("*.py")
                 if "torch.load(" in p.read_text() and "weights_only=True" not in p.read_text()]
    assert not offenders


def test_a_run_where_every_check_skipped_is_not_a_pass(tiny_pipeline, test_registry):
    report = run(tiny_pipeline, Settings(), registry=test_registry, only=["t_skip"])
    assert report.verdict is Verdict.SKIP and report.exit_code == 0
