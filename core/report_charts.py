"""The Shield Report's charts, drawn with matplotlib into an RGB array (no ComfyUI).

Uses a Figure with its own Agg canvas, never pyplot, so nothing process-wide (the backend, rcParams,
a global figure list) changes inside ComfyUI.
"""

from __future__ import annotations

import math

import numpy as np

from ..optional_deps import require
from .report import ProCreateCurves, RepellencyTimeline, ReportData, TransitionCurves

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
    timeline = report.repellency
    if timeline is not None and (timeline.delta_ratio is not None or timeline.touched is not None):
        panels.append(lambda axes, figure: _draw_repellency(axes, figure, timeline))
    curves = report.transition
    if curves is not None and (curves.d_t is not None or curves.switched is not None):
        panels.append(lambda axes, figure: _draw_transition(axes, curves))
    procreate = report.procreate
    if procreate is not None and procreate.similarity is not None:
        panels.append(lambda axes, figure: _draw_procreate(axes, procreate))
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
    if report.repellency is not None and report.repellency.touched is not None:
        lines.append(f"repellency touched {int(report.repellency.touched.sum())} step-samples")
    if report.transition is not None:
        steps = report.transition.switch_steps()
        if steps:
            lines.append(f"CFG switch steps: {steps}")
    if report.procreate is not None and report.procreate.guided is not None:
        lines.append(f"ProCreate guided {int(report.procreate.guided.sum())} step-samples")
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
    violations = report.cosine_violations()
    colors = [INSIDE_COLOR if violations is not None and violations[i] else OUTSIDE_COLOR for i in range(report.count)]
    axes.bar(range(report.count), report.cosine, color=colors)
    if report.similarity_threshold > 0:
        axes.axhline(report.similarity_threshold, color=INSIDE_COLOR, linestyle="--", label="threshold")
        axes.legend(loc="lower right", fontsize=9)
    axes.set_ylim(min(0.0, float(report.cosine.min())) - 0.05, 1.05)
    axes.set_ylabel("cosine to nearest shield")
    axes.set_title(f"Nearest shield, {report.embedder_key or 'embedder'} cosine")
    _output_ticks(axes, report.count)


def _draw_repellency(axes, figure, timeline: RepellencyTimeline) -> None:
    if timeline.delta_ratio is not None:
        values, label = np.nan_to_num(timeline.delta_ratio).T, "‖Δ‖ ratio"
    else:
        values, label = timeline.touched.T.astype(float), "touched"
    image = axes.imshow(values, aspect="auto", cmap="magma", interpolation="nearest", origin="lower")
    figure.colorbar(image, ax=axes, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("sample")
    _integer_ticks(axes.xaxis)
    _integer_ticks(axes.yaxis)
    axes.set_title(f"Sparse repellency interventions (run #{timeline.run_number})")


def _draw_transition(axes, curves: TransitionCurves) -> None:
    switch_steps = curves.switch_steps()
    if curves.d_t is not None:
        steps = np.arange(curves.d_t.shape[0])
        for sample in range(curves.d_t.shape[1]):
            (line,) = axes.plot(steps, curves.d_t[:, sample], marker=".", label=f"sample {sample}")
            if sample < len(switch_steps) and switch_steps[sample] is not None:
                step = switch_steps[sample]
                axes.plot(
                    [step],
                    [curves.d_t[step, sample]],
                    marker="o",
                    markersize=10,
                    color=line.get_color(),
                    fillstyle="none",
                )
        positive = curves.d_t[np.isfinite(curves.d_t)]
        if positive.size and positive.min() > 0 and positive.max() / positive.min() > 100:
            axes.set_yscale("log")
        axes.set_ylabel("d_t = ‖ε_cond − ε_uncond‖²")
        if curves.d_t.shape[1] <= 8:
            axes.legend(fontsize=8, loc="best")
    else:
        for sample, step in enumerate(switch_steps):
            if step is not None:
                axes.plot([step], [sample], marker="o")
        axes.set_ylabel("sample")
    axes.set_xlabel("step (circle: switch to normal CFG)")
    _integer_ticks(axes.xaxis)
    axes.set_title(f"Transition-point CFG (run #{curves.run_number})")


def _draw_procreate(axes, curves: ProCreateCurves) -> None:
    """Nearest-reference similarity per step, one line per sample; filled dots where the guidance acted."""
    similarity = curves.similarity
    steps = np.arange(similarity.shape[0])
    for sample in range(similarity.shape[1]):
        (line,) = axes.plot(steps, similarity[:, sample], marker=".", label=f"sample {sample}")
        if curves.guided is not None and sample < curves.guided.shape[1]:
            guided = curves.guided[:, sample]
            axes.plot(
                steps[guided],
                similarity[guided, sample],
                linestyle="none",
                marker="o",
                markersize=7,
                color=line.get_color(),
            )
    axes.set_ylabel("cosine to nearest reference")
    axes.set_xlabel("step (dot: guided)")
    if similarity.shape[1] <= 8:
        axes.legend(fontsize=8, loc="best")
    _integer_ticks(axes.xaxis)
    axes.set_title(f"ProCreate energy guidance (run #{curves.run_number})")


def _output_ticks(axes, count: int) -> None:
    axes.set_xlabel("output")
    if count <= 16:
        axes.set_xticks(range(count))


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))
