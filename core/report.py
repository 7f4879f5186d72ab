"""What the Shield Report node measures, as plain data and a text summary (no ComfyUI, no plotting).

Per output: L2 distance in latent space to the nearest shield (relative to the radius when one is
given, SPELL section 4.6) and the embedder's cosine similarity to the nearest shield; for the batch:
Vendi score and mean pairwise similarity (core/metrics.py); and, from the newest run records
(core/records.py), the sparse-repellency intervention timeline, the transition-point d_t curves and
ProCreate's nearest-reference similarity per step and sample.

Run records are read tolerantly: a step entry may hold a scalar or one value per sample, and any key
may be missing; whatever is there is reported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import metrics
from .records import RunRecord


@dataclasses.dataclass
class RepellencyTimeline:
    """Sparse repellency per step (rows) and sample (columns); NaN where the record has no value."""

    run_number: int
    label: str
    steps: int
    delta_ratio: Optional[np.ndarray]  # [steps, samples] ‖Δ‖ relative to the update, 0 = untouched
    touched: Optional[np.ndarray]  # [steps, samples] bool
    active_shields: Optional[np.ndarray]  # [steps, samples] or [steps, 1] shield count within r
    sigma: Optional[np.ndarray]  # [steps]


@dataclasses.dataclass
class TransitionCurves:
    """Transition-point CFG per step (rows) and sample (columns)."""

    run_number: int
    label: str
    steps: int
    d_t: Optional[np.ndarray]  # [steps, samples] ‖ε_cond − ε_uncond‖²
    switched: Optional[np.ndarray]  # [steps, samples] bool: normal CFG is on at this step
    sigma: Optional[np.ndarray]  # [steps]

    def switch_steps(self) -> list[Optional[int]]:
        """Per sample, the first step with normal CFG (None if it never switched)."""
        if self.switched is None:
            return []
        steps = []
        for column in self.switched.T:
            hits = np.flatnonzero(column)
            steps.append(int(hits[0]) if hits.size else None)
        return steps


@dataclasses.dataclass
class ProCreateCurves:
    """ProCreate energy guidance per step (rows) and sample (columns)."""

    run_number: int
    label: str
    steps: int
    similarity: Optional[np.ndarray]  # [steps, samples] cosine to the nearest reference, NaN where not measured
    guided: Optional[np.ndarray]  # [steps, samples] bool: the guidance moved this sample at this step
    sigma: Optional[np.ndarray]  # [steps]
    references: Optional[int] = None  # how many references the run repelled from (a memory grows)

    def guided_samples(self) -> list[int]:
        return [] if self.guided is None else np.flatnonzero(self.guided.any(axis=0)).tolist()


@dataclasses.dataclass
class ReportData:
    count: int
    names: list[str]  # nearest shield name per output ("" without shields)
    l2_distance: Optional[np.ndarray] = None  # [B] latent L2 to the nearest shield
    radius: float = 0.0
    cosine: Optional[np.ndarray] = None  # [B] embedder cosine to the nearest shield
    cosine_names: list[str] = dataclasses.field(default_factory=list)
    similarity_threshold: float = 0.0
    embedder_key: str = ""
    diversity_space: str = ""
    vendi: float = float("nan")
    mss: float = float("nan")
    repellency: Optional[RepellencyTimeline] = None
    transition: Optional[TransitionCurves] = None
    procreate: Optional[ProCreateCurves] = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def relative_distance(self) -> Optional[np.ndarray]:
        if self.l2_distance is None or self.radius <= 0:
            return None
        return self.l2_distance / self.radius

    def l2_violations(self) -> Optional[np.ndarray]:
        if self.l2_distance is None or self.radius <= 0:
            return None
        return self.l2_distance <= self.radius

    def cosine_violations(self) -> Optional[np.ndarray]:
        if self.cosine is None or self.similarity_threshold <= 0:
            return None
        return self.cosine >= self.similarity_threshold


# -- measuring --------------------------------------------------------------------------------------
def measure_outputs(
    *,
    latents: Optional[torch.Tensor],
    images: Optional[torch.Tensor],
    output_embeddings: Optional[torch.Tensor],
    shield_latents: Optional[torch.Tensor],
    shield_names: Sequence[str] = (),
    shield_embeddings: Optional[torch.Tensor] = None,
    radius: float = 0.0,
    similarity_threshold: float = 0.0,
    embedder_key: str = "",
) -> ReportData:
    """Per-output nearest-shield numbers and batch diversity.

    Diversity uses the embeddings when there are any, else the flattened pixels (what the user sees),
    else the flattened latents (cosine kernel in every case).
    """
    batch = next(t for t in (latents, images, output_embeddings) if t is not None)
    report = ReportData(count=int(batch.shape[0]), names=[""] * int(batch.shape[0]), radius=radius)
    report.similarity_threshold = similarity_threshold
    report.embedder_key = embedder_key
    if shield_latents is not None and latents is not None:
        distances, indices = metrics.nearest_distance(latents, shield_latents)
        report.l2_distance = distances.numpy()
        report.names = [shield_names[i] if i < len(shield_names) else f"shield {i}" for i in indices.tolist()]
    if shield_embeddings is not None and output_embeddings is not None:
        similarities, indices = metrics.nearest_similarity(output_embeddings, shield_embeddings)
        report.cosine = similarities.numpy()
        report.cosine_names = [shield_names[i] if i < len(shield_names) else f"shield {i}" for i in indices.tolist()]
    for space, items in (("embedder", output_embeddings), ("pixel", images), ("latent", latents)):
        if items is not None:
            report.diversity_space = space
            report.vendi = metrics.vendi_score(items)
            report.mss = metrics.mean_pairwise_similarity(items)
            break
    return report


# -- run records ------------------------------------------------------------------------------------
def _per_sample(value: Any) -> Optional[list[float]]:
    """A step value as one float per sample: a scalar becomes [scalar]; None stays None."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (int, float, bool, np.number, np.bool_)):
        return [float(value)]
    try:
        return [float(v) for v in value]
    except (TypeError, ValueError):
        return None


def _touched_flags(value: Any, samples: int) -> Optional[list[float]]:
    """Per-sample flags from either booleans per sample or a list of touched sample indices."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().reshape(-1).tolist()
    if isinstance(value, (bool, np.bool_)):
        return [float(value)] * max(samples, 1)
    if isinstance(value, (int, np.integer)):  # a count of touched samples: no per-sample detail
        return None
    values = list(value)
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return [float(v) for v in values]
    flags = [0.0] * max(samples, (max(values) + 1) if values else 0)
    for index in values:
        flags[int(index)] = 1.0
    return flags


def _step_matrix(steps: list[dict], key: str, convert=_per_sample) -> Optional[np.ndarray]:
    """[steps, samples] from the steps' `key` values, NaN-padded; None if no step has the key."""
    rows = [convert(step.get(key)) for step in steps]
    if all(row is None for row in rows):
        return None
    width = max(len(row) for row in rows if row is not None)
    matrix = np.full((len(rows), width), np.nan)
    for index, row in enumerate(rows):
        if row is not None:
            matrix[index, : len(row)] = row
    return matrix


def _sigma_column(steps: list[dict]) -> Optional[np.ndarray]:
    matrix = _step_matrix(steps, "sigma")
    return None if matrix is None else np.nanmax(matrix, axis=1)


def _sample_count(steps: list[dict]) -> int:
    counts = [len(row) for row in (_per_sample(step.get("sigma")) for step in steps) if row is not None]
    return max(counts, default=0)


def repellency_timeline(record: Optional[RunRecord]) -> Optional[RepellencyTimeline]:
    if record is None or not record.steps:
        return None
    samples = _sample_count(record.steps)
    touched = _step_matrix(record.steps, "touched", lambda value: _touched_flags(value, samples))
    delta_ratio = _step_matrix(record.steps, "delta_ratio")
    if touched is None and delta_ratio is not None:
        touched = np.nan_to_num(delta_ratio) > 0
    return RepellencyTimeline(
        run_number=record.run_number,
        label=record.label,
        steps=len(record.steps),
        delta_ratio=delta_ratio,
        touched=None if touched is None else np.nan_to_num(touched) > 0,
        active_shields=_step_matrix(record.steps, "active_shields"),
        sigma=_sigma_column(record.steps),
    )


def transition_curves(record: Optional[RunRecord]) -> Optional[TransitionCurves]:
    if record is None or not record.steps:
        return None
    switched = _step_matrix(record.steps, "switched")
    return TransitionCurves(
        run_number=record.run_number,
        label=record.label,
        steps=len(record.steps),
        d_t=_step_matrix(record.steps, "d_t"),
        switched=None if switched is None else np.nan_to_num(switched) > 0,
        sigma=_sigma_column(record.steps),
    )


def procreate_curves(record: Optional[RunRecord]) -> Optional[ProCreateCurves]:
    if record is None or not record.steps:
        return None
    guided = _step_matrix(record.steps, "active")
    return ProCreateCurves(
        run_number=record.run_number,
        label=record.label,
        steps=len(record.steps),
        similarity=_step_matrix(record.steps, "similarity"),
        guided=None if guided is None else np.nan_to_num(guided) > 0,
        sigma=_sigma_column(record.steps),
        references=record.summary.get("references"),
    )


# -- text -------------------------------------------------------------------------------------------
def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}g}"


def _output_line(report: ReportData, index: int) -> str:
    parts = [f"output {index}:"]
    if report.l2_distance is not None:
        text = f"nearest shield '{report.names[index]}' L2 {_number(report.l2_distance[index], 4)}"
        if report.radius > 0:
            text += f" ({report.l2_distance[index] / report.radius:.2f} r)"
            if report.l2_distance[index] <= report.radius:
                text += " INSIDE"
        parts.append(text)
    if report.cosine is not None:
        text = f"cosine {_number(report.cosine[index], 4)} to '{report.cosine_names[index]}'"
        if report.similarity_threshold > 0 and report.cosine[index] >= report.similarity_threshold:
            text += " SIMILAR"
        parts.append(text)
    return " ".join(parts) if len(parts) > 1 else ""


def _repellency_lines(timeline: RepellencyTimeline) -> list[str]:
    head = f"sparse repellency (run #{timeline.run_number}{', ' + timeline.label if timeline.label else ''}):"
    lines = [f"{head} {timeline.steps} steps recorded"]
    if timeline.touched is not None:
        per_step = timeline.touched.any(axis=1)
        active_steps = np.flatnonzero(per_step)
        last = f", last at step {int(active_steps[-1])}" if active_steps.size else ""
        lines.append(
            f"  intervened on {int(timeline.touched.sum())} step-samples in {active_steps.size} steps{last}; "
            f"samples touched: {np.flatnonzero(timeline.touched.any(axis=0)).tolist()}"
        )
    if timeline.delta_ratio is not None and np.isfinite(timeline.delta_ratio).any():
        lines.append(f"  max ‖Δ‖ ratio {_number(float(np.nanmax(timeline.delta_ratio)))}")
    if timeline.active_shields is not None and np.isfinite(timeline.active_shields).any():
        lines.append(f"  max shields within r at one step: {int(np.nanmax(timeline.active_shields))}")
    return lines


def _transition_lines(curves: TransitionCurves) -> list[str]:
    head = f"transition-point CFG (run #{curves.run_number}{', ' + curves.label if curves.label else ''}):"
    lines = [f"{head} {curves.steps} steps recorded"]
    switch_steps = curves.switch_steps()
    if switch_steps:
        switched = sum(step is not None for step in switch_steps)
        lines.append(f"  switched to normal CFG: {switched}/{len(switch_steps)} samples, at steps {switch_steps}")
    if curves.d_t is not None and np.isfinite(curves.d_t).any():
        lines.append(f"  d_t range {_number(float(np.nanmin(curves.d_t)))} .. {_number(float(np.nanmax(curves.d_t)))}")
    return lines


def _procreate_lines(curves: ProCreateCurves) -> list[str]:
    head = f"procreate energy guidance (run #{curves.run_number}{', ' + curves.label if curves.label else ''}):"
    references = "" if curves.references is None else f", {curves.references} references"
    lines = [f"{head} {curves.steps} steps recorded{references}"]
    if curves.guided is not None:
        guided_steps = np.flatnonzero(curves.guided.any(axis=1))
        last = f", last at step {int(guided_steps[-1])}" if guided_steps.size else ""
        lines.append(
            f"  guided {int(curves.guided.sum())} step-samples in {guided_steps.size} steps{last}; "
            f"samples guided: {curves.guided_samples()}"
        )
    similarity = curves.similarity
    if similarity is not None and np.isfinite(similarity).any():
        measured = [row for row in similarity if np.isfinite(row).any()]
        first, last = np.nanmax(measured[0]), np.nanmax(measured[-1])
        lines.append(
            f"  max nearest-reference similarity: first measured step {_number(float(first))}, "
            f"last {_number(float(last))}"
        )
    return lines


def summary_text(report: ReportData) -> str:
    lines = [f"Shield Report: {report.count} output{'s' if report.count != 1 else ''}"]
    lines += [line for line in (_output_line(report, i) for i in range(report.count)) if line]
    l2_violations = report.l2_violations()
    if l2_violations is not None:
        lines.append(
            f"inside the radius r={report.radius:g}: {int(l2_violations.sum())}/{report.count} "
            f"(share {l2_violations.mean():.3f}); min distance {report.relative_distance.min():.2f} r"
        )
    cosine_violations = report.cosine_violations()
    if cosine_violations is not None:
        lines.append(
            f"cosine >= {report.similarity_threshold:g} ({report.embedder_key}): "
            f"{int(cosine_violations.sum())}/{report.count}"
        )
    if report.cosine is not None:
        lines.append(
            f"nearest-shield cosine: max {report.cosine.max():.4f}, 95th percentile "
            f"{metrics.percentile(report.cosine, 95):.4f}, mean {report.cosine.mean():.4f}"
        )
    if report.diversity_space:
        lines.append(
            f"diversity ({report.diversity_space} cosine): Vendi {_number(report.vendi, 4)} of {report.count}, "
            f"mean pairwise similarity {_number(report.mss, 4)}"
        )
    if report.repellency is not None:
        lines += _repellency_lines(report.repellency)
    if report.transition is not None:
        lines += _transition_lines(report.transition)
    if report.procreate is not None:
        lines += _procreate_lines(report.procreate)
    lines += report.notes
    return "\n".join(lines)
