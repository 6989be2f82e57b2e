"""`--plot DIR`: the figures' data (measured by the checks) and the figures (drawn by the renderer), listed in every
report format."""

from __future__ import annotations

import importlib.util
import json
import math

import fm_variants
import numpy as np
import pytest

from conftest import run_cli
from fmcheck import api_run
from fmcheck.api import Check, CheckDoc, Judgement
from fmcheck.config import Settings
from fmcheck.contract import coerce
from fmcheck.registry import Registry
from fmcheck.renderers import plots
from fmcheck.renderers.junit import to_junit
from fmcheck.report import CheckResult, Report
from fmcheck.runner import run
from fmcheck.verdict import Verdict

PNG = b"\x89PNG"
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib missing")


def _run(directory=None, only=("norms", "target"), **options) -> Report:
    """Through the Python API, which draws the figures after the run (the runner itself only returns data)."""
    return api_run.run(coerce(fm_variants.build(**options)), list(only),
                       plot_dir=str(directory) if directory else None)


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory):
    """The seed's case in miniature: x1 4x larger than x0, figures written."""
    directory = tmp_path_factory.mktemp("figures")
    return directory, _run(directory if importlib.util.find_spec("matplotlib") else None, x1_scale=4.0)


def test_latent_histograms_hold_every_element_and_show_the_scale_gap(scaled_run):
    report = scaled_run[1]
    latents = report.check("norms").details["latents"]
    elements = 4 * 32 * fm_variants.DIM  # measure_batches (4) batches of 32 samples
    for key in ("x0", "x1"):
        counted = sum(latents["values"]["counts"][key]) + latents["values"]["outside"][key] * elements
        assert counted == pytest.approx(elements, rel=1e-6)
        assert sum(latents["norms"]["counts"][key]) == 4 * 32  # the per-sample norms: one per sample
    edges = latents["norms"]["edges"]
    centres = [math.sqrt(lo * hi) for lo, hi in zip(edges[:-1], edges[1:])]

    def mode(key):
        counts = latents["norms"]["counts"][key]
        return centres[counts.index(max(counts))]

    assert mode("x1") / mode("x0") == pytest.approx(4.0, rel=0.35)
    assert latents["ratio"] == pytest.approx(latents["mean_norm"]["x1"] / latents["mean_norm"]["x0"])
    # per-channel statistics of both sides, x1's std about 4x x0's (both unit-variance before the planted 4x)
    channels = latents["channels"]
    assert len(channels["x0"]["std"]) == len(channels["x1"]["std"]) == fm_variants.SHAPE[0]
    ratio = sum(channels["x1"]["std"]) / sum(channels["x0"]["std"])
    assert 2.5 < ratio < 6


@pytest.mark.parametrize("path, da, db", [("linear", -1.0, 1.0), ("reversed", 1.0, -1.0)])
def test_the_path_figure_data_is_the_fitted_schedule_and_its_derivatives(path, da, db):
    schedule = _run(only=("target",), path=path).check("target").details["path"]["schedule"]
    grid = schedule["grid"]
    assert len(grid["t"]) == len(grid["a"]) == len(grid["da"]) == 101
    assert all(v == pytest.approx(da, abs=1e-3) for v in grid["da"])
    assert all(v == pytest.approx(db, abs=1e-3) for v in grid["db"])
    # the per-sample coefficients lie on the fitted curve, and v_target agrees with its velocity everywhere
    assert len(schedule["t"]) == len(schedule["a"]) == len(schedule["b"]) > 100
    assert min(grid["t"]) <= min(schedule["t"]) and max(schedule["t"]) <= max(grid["t"])
    on_curve = np.interp(schedule["t"], grid["t"], grid["a"])
    assert np.abs(on_curve - np.array(schedule["a"])).max() < 1e-3
    assert min(schedule["cos"]["cos"]) > 0.99
    assert [kind for _, kind in schedule["guides"]["cos"]] == ["warn", "fail"]


def test_a_wrong_target_shows_in_the_per_sample_cosines():
    schedule = _run(only=("target",), target="flipped").check("target").details["path"]["schedule"]
    cos = schedule["cos"]["cos"]
    assert len(cos) == len(schedule["cos"]["t"]) and max(cos) < -0.99


@needs_matplotlib
def test_figures_are_written_and_every_report_lists_them(scaled_run):
    directory, report = scaled_run
    expected = {"norms": [str(directory / "norms-latents.png")],
                "target": [str(directory / "target-path.png"), str(directory / "target-weight.png")]}
    assert {r.id: r.plots for r in report.checks} == expected
    for paths in expected.values():
        with open(paths[0], "rb") as png:
            assert png.read(4) == PNG
    assert json.loads(report.model_dump_json())["checks"][0]["plots"] == expected[report.checks[0].id]
    assert f"[[ATTACHMENT|{expected['norms'][0]}]]" in to_junit(report)


def test_without_matplotlib_the_report_says_so_and_nothing_is_written(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    report = _run(tmp_path / "figures", only=("norms",))
    assert report.check("norms").plots == [plots.MISSING_MATPLOTLIB]
    assert not (tmp_path / "figures").exists()
    assert "ATTACHMENT" not in to_junit(report)


@needs_matplotlib
def test_a_figure_that_fails_to_draw_is_a_note_and_the_others_are_written(tmp_path, monkeypatch):
    def broken(result):
        raise ValueError("no finite values")

    monkeypatch.setattr(plots, "_path_figure", broken)
    report = _run(tmp_path)
    note, weight = report.check("target").plots
    assert note.startswith("not written: path figure failed: ValueError: no finite values (")  # and where it was
    assert weight == str(tmp_path / "target-weight.png")  # the other figure of the same check is still written
    assert report.check("norms").plots == [str(tmp_path / "norms-latents.png")]
    assert report.verdict is Verdict.PASS  # the verdicts never depend on plots


class Curves(Check):
    """A third-party check that leaves curves in its details gets the curve figure, like `overfit`."""

    id = "t_curves"
    title = "curves"
    purpose = "curves for the plot renderer"
    doc = CheckDoc(what="a loss curve", why="to be drawn", bug_example="", fix="")

    def measure(self, ctx):
        return [1.0, 0.5, 0.25, 0.125]

    def judge(self, losses, thresholds):
        return Judgement(measurements=[], summary="fine",
                         details={"curves": {"step": [0, 1, 2, 3], "loss": losses},
                                  "curve_guides": {"loss": [[0.2, "pass"]]}})


@needs_matplotlib
def test_a_plugin_check_with_curves_gets_a_figure(tmp_path, tiny_pipeline):
    registry = Registry()
    registry.add(Curves, name=Curves.id, target="tests:Curves", distribution="tests")
    report = run(tiny_pipeline, Settings(plot_dir=str(tmp_path)), registry=registry)
    assert report.check("t_curves").verdict is Verdict.PASS, report.check("t_curves").summary
    # the runner returns data and draws nothing; the caller (CLI, API) hands the report to the plot renderer
    assert report.check("t_curves").plots == [] and not (tmp_path / "t_curves.png").exists()
    assert plots.write_plots(report, str(tmp_path)) == [str(tmp_path / "t_curves.png")]
    assert report.check("t_curves").plots == [str(tmp_path / "t_curves.png")]
    assert (tmp_path / "t_curves.png").read_bytes()[:4] == PNG


@needs_matplotlib
def test_a_result_without_figure_data_gets_no_plot(tmp_path):
    report = Report(fmcheck_version="0", verdict=Verdict.PASS, exit_code=0,
                    environment={"python": "3"}, checks=[CheckResult(id="x", verdict=Verdict.PASS)])
    assert plots.write_plots(report, str(tmp_path / "none")) == []
    assert not (tmp_path / "none").exists()


@needs_matplotlib
def test_the_cli_lists_the_files(tmp_path):
    result = run_cli("norms", "--module", "fm_variants:build", "--plot", str(tmp_path / "out"), "--json",
                     str(tmp_path / "report.json"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "plots" in result.stdout and "norms-latents.png" in result.stdout
    assert (tmp_path / "out" / "norms-latents.png").read_bytes()[:4] == PNG
    # drawn before the reports are written: the JSON lists the file too
    written = json.loads((tmp_path / "report.json").read_text())["checks"][0]["plots"]
    assert written == [str(tmp_path / "out" / "norms-latents.png")]


def test_latent_statistics_batch_by_batch_equal_the_pooled_ones_for_video_and_token_latents():
    import torch

    from fmcheck.checks.norms.maths import channel_stats as _channel_stats, distributions as _distributions

    gen = torch.Generator().manual_seed(0)
    video = [torch.randn(2, 3, 4, 5, 6, generator=gen) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1, 1) + 2
             for _ in range(3)]
    pooled = torch.cat(video).double().transpose(0, 1).reshape(3, -1)
    std, mean = _channel_stats(video)
    assert torch.allclose(std, pooled.std(dim=1)) and torch.allclose(mean, pooled.mean(dim=1))
    assert _channel_stats([torch.randn(2, 7, 3)]) is None  # (B, L, C): which dimension is the channel is ambiguous

    broken = video[0].clone()
    broken[0, 0, 0, 0, 0] = float("nan")
    data = _distributions({"x0": [broken], "x1": video}, {"x0": torch.ones(2), "x1": torch.full((6,), 4.0)},
                          {"x0": None, "x1": torch.stack([std, mean])})
    values = data["values"]
    assert sum(values["counts"]["x0"]) + values["outside"]["x0"] * (broken.numel() - 1) == \
        pytest.approx(broken.numel() - 1)  # the NaN is left out, not counted
    assert sum(values["counts"]["x1"]) + values["outside"]["x1"] * pooled.numel() == pytest.approx(pooled.numel())
    assert list(data["channels"]) == ["x1"]
    assert sum(data["norms"]["counts"]["x0"]) == 2 and sum(data["norms"]["counts"]["x1"]) == 6


@needs_matplotlib
def test_a_plot_folder_that_cannot_be_created_after_the_run_is_a_note(tmp_path, monkeypatch):
    from pathlib import Path

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    report = _run(tmp_path / "figures", only=("norms",))
    assert report.check("norms").plots == [f"not written: cannot create {tmp_path / 'figures'}: Permission denied"]
    assert report.verdict is Verdict.PASS
