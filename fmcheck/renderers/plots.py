"""`--plot DIR`: PNG figures drawn from the data checks leave in their results' ``details``.

Checks never draw. A check that wants a figure puts one of these documented shapes in its details, and this renderer
draws it (built-in and plugin checks alike; docs/plugins.md):

- ``curves``: ``{"step": [...], name: [...], ...}`` -> one panel per curve, or per group in ``curve_panels``
  (``[{"keys": [...], "title": str, "log": bool}]``); ``curve_guides`` (``{name: [[value, "pass"|"warn"|"fail"]]}``)
  draws the thresholds; ``curve_title`` titles the figure. (``overfit``.)
- ``latents``: shared-bin histograms of z0 (x0) and z1 (x1) element values (``values``) and per-sample norms
  (``norms``), and per-channel std and mean (``channels``). (``norms``.)
- ``path.schedule``: per-sample path coefficients (t, a, b), the fitted a(t), b(t) and a'(t), b'(t) on a grid, and
  per-sample cos(v_target, path velocity) against t. (``target``.)
- ``implied.weight_curve``: ``{"t": [...], "k": [...]}`` the implied per-sample loss weight k_i / median against t,
  and ``implied.cos_curve`` ``{"t": [...], "cos": [...]}`` the implied target's cosine with the path velocity.
  (``target``.)

matplotlib is an optional extra (``pip install 'fmcheck[plot]'``); only its object API is used, so no global backend
or pyplot state of the user's process is touched.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Callable, Optional

from ..isolate import capture, describe
from ..report import CheckResult, Report

MISSING_MATPLOTLIB = "not written: matplotlib is not installed (pip install 'fmcheck[plot]')"
GUIDE_COLOURS = {"pass": "tab:green", "warn": "tab:orange", "fail": "tab:red"}
SERIES = {"x0": ("x0 (z0, the source)", "tab:blue"), "x1": ("x1 (z1, the data latent)", "tab:orange")}


def write_plots(report: Report, directory: str) -> list[str]:
    """Draw every figure the report's checks carry data for into ``directory``; record the files on each result.

    Returns every path written. A figure that cannot be drawn becomes a ``not written: ...`` note on its result
    rather than an error: the verdicts do not depend on plots.
    """
    figures = [(result, name, draw) for result in report.checks for name, draw in _figures_of(result)]
    if not figures:
        return []
    if importlib.util.find_spec("matplotlib") is None:
        for result in {id(r): r for r, _, _ in figures}.values():
            result.plots.append(MISSING_MATPLOTLIB)
        return []
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # after a long run the report matters more than its pictures
        for result in {id(r): r for r, _, _ in figures}.values():
            result.plots.append(f"not written: cannot create {directory}: {exc.strerror or exc}")
        return []
    written = []
    for result, name, draw in figures:
        target = folder / f"{result.id}{'-' + name if name else ''}.png"
        # a figure that fails to draw (a plugin's odd data, a full disk) must not lose the report
        outcome = capture(lambda: draw(result).savefig(target, dpi=110))
        if not outcome.ok:
            result.plots.append(f"not written: {name or result.id} figure failed: {describe(outcome.exc)}")
            continue
        result.plots.append(str(target))
        written.append(str(target))
    return written


def _figures_of(result: CheckResult) -> list[tuple[str, Callable[[CheckResult], Any]]]:
    """(file-name suffix, drawing function) for each figure the result has data for; a check's only figure
    is named after the check alone (overfit.png)."""
    details = result.details if isinstance(result.details, dict) else {}
    found = []
    if isinstance(details.get("latents"), dict):
        found.append(("latents", _latents_figure))
    path = details.get("path")
    if isinstance(path, dict) and isinstance(path.get("schedule"), dict):
        found.append(("path", _path_figure))
    implied = details.get("implied")
    if isinstance(implied, dict) and isinstance(implied.get("weight_curve"), dict) and \
            implied["weight_curve"].get("t"):
        found.append(("weight", _weight_figure))
    if isinstance(details.get("curves"), dict) and details["curves"].get("step"):
        found.insert(0, ("curves" if found else "", _curves_figure))
    return found


def _figure(columns: int, rows: int = 1, width: float = 4.6, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, columns, squeeze=False)


def _numbers(values: list) -> list[float]:
    return [float(v) if isinstance(v, (int, float)) else math.nan for v in values]


def _log_ok(values: list[float]) -> bool:
    """A log axis only where it helps: positive values spanning more than a decade (narrower, its ticks are noise)."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and all(v > 0 for v in finite) and max(finite) / min(finite) > 10


def _plain_log(axis, which: str, values: list[float]) -> None:
    """A log scale with plain tick labels (0.2, 1, 5), not 2 x 10^-1: ratios and norms read as numbers. On axes
    spanning under three decades, where the powers of ten alone are too few, the 2s and 5s are labelled too."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def two_and_five(value: float, _: Any) -> str:
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9) if value > 0 else 0
        return f"{value:g}" if round(mantissa, 6) in (2.0, 5.0) else ""

    target = axis.yaxis if which == "y" else axis.xaxis
    (axis.set_yscale if which == "y" else axis.set_xscale)("log")
    target.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    finite = [v for v in values if math.isfinite(v) and v > 0]
    narrow = bool(finite) and max(finite) / min(finite) < 1000
    target.set_minor_formatter(FuncFormatter(two_and_five) if narrow else NullFormatter())


# -- curves (overfit) -------------------------------------------------------------------------------------------------
def _curves_figure(result: CheckResult):
    details = result.details
    curves = details["curves"]
    panels = details.get("curve_panels") or [{"keys": [k], "title": k, "log": False} for k in curves if k != "step"]
    panels = [p for p in panels if any(k in curves for k in p["keys"])]
    guides = details.get("curve_guides") or {}
    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = _figure(columns, rows)
    cells = [axis for row in axes for axis in row]
    for unused in cells[len(panels):]:
        unused.set_visible(False)
    steps = curves["step"]
    for axis, panel in zip(cells, panels):
        plotted: list[float] = []
        for key in panel["keys"]:
            if key not in curves:
                continue
            values = _numbers(curves[key])
            plotted += values
            axis.plot(steps, values, marker=".", markersize=4, label=key)
            for value, kind in guides.get(key, []):
                plotted.append(float(value))
                axis.axhline(value, linestyle="--", linewidth=1, color=GUIDE_COLOURS.get(kind, "grey"),
                             label=f"{key} {kind} threshold {value:.3g}")
        if panel.get("log") and _log_ok(plotted):
            _plain_log(axis, "y", plotted)
        axis.set_title(panel["title"], fontsize=10)
        axis.set_xlabel("step")
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(details.get("curve_title") or f"{result.id}: {result.verdict.value}")
    return figure


# -- latents (norms) --------------------------------------------------------------------------------------------------
def _latents_figure(result: CheckResult):
    latents = result.details["latents"]
    channels = latents.get("channels") or {}
    columns = 2 + (1 if channels else 0)
    figure, axes = _figure(columns, width=5.0)
    if latents.get("values"):
        _histogram(axes[0][0], latents["values"], log_x=False, log_y=True)
        outside = latents["values"].get("outside") or {}
        clipped = ", ".join(f"{k} {100 * v:.2g}%" for k, v in outside.items() if v > 0)
        axes[0][0].set_title("element values" + (f" (outside the bins: {clipped})" if clipped else ""), fontsize=10)
        axes[0][0].set_xlabel("value")
    if latents.get("norms"):
        edges = latents["norms"]["edges"]
        _histogram(axes[0][1], latents["norms"], log_x=_log_ok([edges[0], edges[-1]]), log_y=False)
        for key, mean in (latents.get("mean_norm") or {}).items():
            if key in SERIES and mean and mean > 0:
                axes[0][1].axvline(mean, color=SERIES[key][1], linestyle="--", linewidth=1,
                                   label=f"E||{key}|| {mean:.4g}")
        axes[0][1].legend(fontsize=7)
        axes[0][1].set_title("per-sample L2 norm", fontsize=10)
        axes[0][1].set_xlabel("||x||" + (" (log scale)" if axes[0][1].get_xscale() == "log" else ""))
    if channels:
        _channel_bars(axes[0][2], channels)
    ratio = latents.get("ratio")
    figure.suptitle(f"{result.id}: z0 vs z1" + (f", E||x1|| / E||x0|| = {ratio:.3g}" if ratio else "")
                    + f" ({result.verdict.value})")
    return figure


def _histogram(axis, data: dict, log_x: bool, log_y: bool) -> None:
    edges = data["edges"]
    widths = [high - low for low, high in zip(edges[:-1], edges[1:])]
    for key, counts in data["counts"].items():
        total = sum(counts) or 1
        density = [c / total / w if w > 0 else 0.0 for c, w in zip(counts, widths)]  # comparable areas
        label, colour = SERIES.get(key, (key, None))
        axis.stairs(density, edges, label=label, color=colour, fill=True, alpha=0.35)
        axis.stairs(density, edges, color=colour, linewidth=1.2)
    if log_x:
        _plain_log(axis, "x", [edges[0], edges[-1]])
    if log_y and any(c > 0 for counts in data["counts"].values() for c in counts):
        axis.set_yscale("log")
    axis.set_ylabel("density")
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)


def _channel_bars(axis, channels: dict) -> None:
    keys = [k for k in ("x0", "x1") if k in channels] + [k for k in channels if k not in ("x0", "x1")]
    width = 0.8 / len(keys)
    for index, key in enumerate(keys):
        std, mean = channels[key]["std"], channels[key]["mean"]
        positions = [c + (index - (len(keys) - 1) / 2) * width for c in range(len(std))]
        label, colour = SERIES.get(key, (key, None))
        axis.bar(positions, std, width=width, color=colour, alpha=0.6, label=f"{key} std")
        axis.plot(positions, mean, linestyle="none", marker="D", markersize=5, color=colour,
                  markeredgecolor="black", label=f"{key} mean")
    count = max(len(channels[k]["std"]) for k in keys)
    axis.set_xticks(range(count))
    axis.axhline(1.0, color="grey", linestyle=":", linewidth=1, label="std 1")
    axis.axhline(0.0, color="black", linewidth=0.6)
    axis.set_xlabel("channel")
    axis.set_title("per-channel std (bars) and mean (diamonds)", fontsize=10)
    axis.grid(True, axis="y", alpha=0.3)
    axis.legend(fontsize=7)


# -- path schedule (target) -------------------------------------------------------------------------------------------
def _path_figure(result: CheckResult):
    path = result.details["path"]
    schedule = path["schedule"]
    grid: Optional[dict] = schedule.get("grid")
    cos = schedule.get("cos")
    columns = 1 + (1 if grid else 0) + (1 if cos else 0)
    figure, axes = _figure(columns)
    row = list(axes[0])
    time_label = "t" + (f" (raw t / {schedule['t_scale']:g})" if schedule.get("t_scale") else "")

    axis = row.pop(0)
    axis.scatter(schedule["t"], schedule["a"], s=8, alpha=0.5, color="tab:blue", label="a_i (coefficient of x0)")
    axis.scatter(schedule["t"], schedule["b"], s=8, alpha=0.5, color="tab:orange", label="b_i (coefficient of x1)")
    if grid:
        axis.plot(grid["t"], grid["a"], color="tab:blue", linewidth=2, label="fitted a(t)")
        axis.plot(grid["t"], grid["b"], color="tab:orange", linewidth=2, label="fitted b(t)")
    axis.set_title("x_t = a(t) x0 + b(t) x1, per sample and fitted", fontsize=10)
    _time_axis(axis, time_label)

    if grid:
        axis = row.pop(0)
        axis.plot(grid["t"], grid["da"], color="tab:blue", linewidth=2, label="a'(t)")
        axis.plot(grid["t"], grid["db"], color="tab:orange", linewidth=2, label="b'(t)")
        axis.axhline(0.0, color="black", linewidth=0.6)
        axis.set_title("path velocity v = a'(t) x0 + b'(t) x1", fontsize=10)
        _time_axis(axis, time_label)

    if cos:
        axis = row.pop(0)
        axis.scatter(cos["t"], cos["cos"], s=8, alpha=0.6, color="tab:purple", label="per sample")
        for value, kind in (schedule.get("guides") or {}).get("cos", []):
            axis.axhline(value, linestyle="--", linewidth=1, color=GUIDE_COLOURS.get(kind, "grey"),
                         label=f"{kind} below {value:g} (median)")
        low = min([c for c in cos["cos"] if math.isfinite(c)] or [0.0])
        axis.set_ylim(min(low, 0.8) - 0.05, 1.02)
        axis.set_title("cos(v_target, path velocity)", fontsize=10)
        _time_axis(axis, time_label)

    fit = path.get("fit") or {}
    described = f": {fit['describe']}" if fit.get("describe") else (f": not fitted ({fit['reason']})"
                                                                   if fit.get("reason") else "")
    figure.suptitle(f"{result.id}: interpolation path{described} ({result.verdict.value})", fontsize=11)
    return figure


# -- implied loss weight (target) -------------------------------------------------------------------------------------
def _weight_figure(result: CheckResult):
    implied = result.details["implied"]
    curve = implied["weight_curve"]
    cos = implied.get("cos_curve") if isinstance(implied.get("cos_curve"), dict) else None
    figure, axes = _figure(2 if cos and cos.get("t") else 1)
    row = list(axes[0])
    axis = row.pop(0)
    t, k = _numbers(curve["t"]), _numbers(curve["k"])
    colours = ["tab:red" if value < 0 else "tab:blue" for value in k]
    axis.scatter(t, k, s=8, alpha=0.6, c=colours, label="k_i / median (red: negative)")
    axis.axhline(0.0, color="black", linewidth=0.6)
    if _log_ok(k):
        _plain_log(axis, "y", k)
    axis.set_title("implied loss weight w(t) = k_i / median k", fontsize=10)
    _time_axis(axis, "t (the path's time)")
    if row:
        axis = row.pop(0)
        axis.scatter(cos["t"], cos["cos"], s=8, alpha=0.6, color="tab:purple", label="per sample")
        axis.set_ylim(min([c for c in _numbers(cos["cos"]) if math.isfinite(c)] + [0.8]) - 0.05, 1.02)
        axis.set_title("cos(implied target, path velocity)", fontsize=10)
        _time_axis(axis, "t (the path's time)")
    figure.suptitle(f"{result.id}: what the loss trains {implied.get('module', 'the output')} toward "
                    f"({result.verdict.value})", fontsize=11)
    return figure


def _time_axis(axis, label: str) -> None:
    axis.set_xlabel(label)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=7)
