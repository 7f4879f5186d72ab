"""The Shield Report's charts, drawn with matplotlib into an RGB array (no ComfyUI).

Uses a Figure with its own Agg canvas, never pyplot, so nothing process-wide (the backend, rcParams,
a global figure list) changes inside ComfyUI.
"""

from __future__ import annotations

import math

import numpy as np

from ..optional_deps import require
from .records import Curves, Heatmap
from .report import MethodCurves, ReportData

PANEL_SIZE = (6.0, 3.6)  # inches per panel
DPI = 100
INSIDE_COLOR = "#d62728"
OUTSIDE_COLOR = "#1f77b4"


def render_report(report: ReportData) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1]: one panel per available measurement, two panels per row."""
    require("matplotlib", "Shield Report charts")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = _panels(report)
    columns = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), dpi=DPI, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    for index, draw in enumerate(panels):
        draw(figure.add_subplot(rows, columns, index + 1), figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return rgba[..., :3].astype(np.float32) / 255.0


def _panels(report: ReportData) -> list:
    panels = [lambda axes, figure: _draw_summary(axes, report)]
    if report.l2_distance is not None:
        panels.append(lambda axes, figure: _draw_distances(axes, report))
    if report.cosine is not None:
        panels.append(lambda axes, figure: _draw_cosines(axes, report))
    for run in report.runs:
        panel = run.method.chart
        if isinstance(panel, Heatmap):
            panels.append(lambda axes, figure, run=run, panel=panel: _draw_heatmap(axes, figure, run, panel))
        elif isinstance(panel, Curves) and run.field(panel.value) is not None:
            panels.append(lambda axes, figure, run=run, panel=panel: _draw_curves(axes, run, panel))
    return panels


def _draw_summary(axes, report: ReportData) -> None:
    axes.set_axis_off()
    axes.set_title("Shield Report", fontsize=14, fontweight="bold", loc="left")
    lines = [f"outputs: {report.count}"]
    if report.diversity_space:
        lines.append(f"Vendi score: {report.vendi:.2f} of {report.count}  ({report.diversity_space} cosine)")
        mss = "n/a" if math.isnan(report.mss) else f"{report.mss:.3f}"
        lines.append(f"mean pairwise similarity: {mss}")
    violations = report.l2_violations()
    if violations is not None:
        lines.append(f"inside radius r={report.radius:g}: {int(violations.sum())}/{report.count}")
    elif report.l2_distance is not None:
        lines.append(f"nearest shield L2: min {report.l2_distance.min():.3g}")
    if report.cosine is not None:
        lines.append(f"nearest-shield cosine: max {report.cosine.max():.3f} ({report.embedder_key})")
    for run in report.runs:
        lines.append(f"{run.method.title} touched {int(run.touched.sum())} step-samples")
    axes.text(0.0, 0.92, "\n".join(lines), va="top", ha="left", fontsize=12, transform=axes.transAxes, linespacing=1.6)


def _draw_distances(axes, report: ReportData) -> None:
    relative = report.relative_distance
    values = relative if relative is not None else report.l2_distance
    inside = report.l2_violations()
    colors = [INSIDE_COLOR if inside is not None and inside[i] else OUTSIDE_COLOR for i in range(report.count)]
    axes.bar(range(report.count), values, color=colors)
    if relative is not None:
        axes.axhline(1.0, color=INSIDE_COLOR, linestyle="--", label=f"radius r = {report.radius:g}")
        axes.set_ylabel("L2 to nearest shield / r")
        axes.legend(loc="upper right", fontsize=9)
    else:
        axes.set_ylabel("L2 to nearest shield")
    axes.set_title("Nearest shield, latent L2 (red: inside r)")
    _output_ticks(axes, report.count)


def _draw_cosines(axes, report: ReportData) -> None:
    flagged = report.copies() if report.copies() is not None else report.cosine_violations()
    colors = [INSIDE_COLOR if flagged is not None and flagged[i] else OUTSIDE_COLOR for i in range(report.count)]
    axes.bar(range(report.count), report.cosine, color=colors)
    if report.copy_threshold > 0:
        axes.axhline(report.copy_threshold, color=INSIDE_COLOR, linestyle="--", label="copy threshold")
        axes.legend(loc="lower right", fontsize=9)
    elif report.similarity_threshold > 0:
        axes.axhline(report.similarity_threshold, color=INSIDE_COLOR, linestyle="--", label="threshold")
        axes.legend(loc="lower right", fontsize=9)
    axes.set_ylim(min(0.0, float(report.cosine.min())) - 0.05, 1.05)
    axes.set_ylabel("cosine to nearest shield")
    axes.set_title(f"Nearest shield, {report.embedder_key or 'embedder'} cosine")
    _output_ticks(axes, report.count)


def _draw_heatmap(axes, figure, run: MethodCurves, panel: Heatmap) -> None:
    """The panel's field over steps (x) and samples (y); the touched flags where the field is missing."""
    values, label = run.field(panel.value), panel.label
    if values is None:
        values, label = run.touched.astype(float), "touched"
    image = axes.imshow(np.nan_to_num(values).T, aspect="auto", cmap="magma", interpolation="nearest", origin="lower")
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("sample")
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    axes.set_title(f"{run.method.title} (run #{run.run_number})")


def _draw_curves(axes, run: MethodCurves, panel: Curves) -> None:
    """One line per sample; markers where the method touched it, or where it stopped touching it."""
    values = run.field(panel.value)
    steps = np.arange(values.shape[0])
    touched = run.touched
    for sample in range(values.shape[1]):
        (line,) = axes.plot(steps, values[:, sample], marker=".", label=f"sample {sample}")
        column = touched[:, sample] if sample < touched.shape[1] else np.zeros(len(steps), dtype=bool)
        if panel.markers == "last_touched":
            hits = np.flatnonzero(column)
            marked = [] if not hits.size or hits[-1] + 1 >= len(steps) else [hits[-1] + 1]
            if not hits.size:
                marked = [0]  # never touched: normal from the first step
            style = {"markersize": 10, "fillstyle": "none"}
        else:
            marked = np.flatnonzero(column)
            style = {"markersize": 7}
        axes.plot(steps[marked], values[marked, sample], linestyle="none", marker="o", color=line.get_color(), **style)
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 100:
        axes.set_yscale("log")
    axes.set_ylabel(panel.label)
    axes.set_xlabel(f"step ({panel.marker_label})")
    if values.shape[1] <= 8:
        axes.legend(fontsize=8, loc="best")
    _integer_ticks(axes.xaxis)
    axes.set_title(f"{run.method.title} (run #{run.run_number})")


def _output_ticks(axes, count: int) -> None:
    axes.set_xlabel("output")
    if count <= 16:
        axes.set_xticks(range(count))


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
