"""What the Shield Report node measures, as plain data and a text summary (no ComfyUI, no plotting).

Per output: L2 distance in latent space to the nearest shield (relative to the radius when one is
given, SPELL section 4.6) and the embedder's cosine similarity to the nearest shield; for the batch:
Vendi score and mean pairwise similarity (core/metrics.py); and the newest run record of every
registered method (core/records.py): which samples and steps it touched, its per-sample step fields
as [steps x samples] matrices, and the method's own report lines and chart panel. No method is named
here: a method registered in core/records.py appears in the report as it is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np
import torch

from . import metrics
from .records import MethodRecord, RecordBook, RunRecord, registered_methods


@dataclasses.dataclass
class MethodCurves:
    """One run of one method, per step (rows) and sample (columns)."""

    method: MethodRecord
    run_number: int
    label: str
    touched: np.ndarray  # [steps, samples] bool: the method changed this sample at this step
    sigma: np.ndarray  # [steps] the largest sigma of the batch at each step
    fields: dict[str, np.ndarray]  # per-sample step field -> [steps, samples], NaN where not recorded
    summary: dict[str, Any]

    @property
    def steps(self) -> int:
        return int(self.touched.shape[0])

    def field(self, name: str) -> Optional[np.ndarray]:
        return self.fields.get(name)

    def touched_samples(self) -> list[int]:
        return np.flatnonzero(self.touched.any(axis=0)).tolist()

    def sample(self, index: int) -> dict[str, np.ndarray]:
        """One sample's columns: its touched flags and every per-sample field, over the steps."""
        columns = {"touched": self.touched[:, index]}
        columns.update({name: matrix[:, index] for name, matrix in self.fields.items() if index < matrix.shape[1]})
        return columns


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
    copy_threshold: float = 0.0  # > 0 when the embedder is a copy detector: cosine >= it means a copy
    diversity_space: str = ""
    vendi: float = float("nan")
    mss: float = float("nan")
    runs: list[MethodCurves] = dataclasses.field(default_factory=list)  # one per method with a record
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

    def copies(self) -> Optional[np.ndarray]:
        """[B] bool: the copy detector's verdict per output (None without a copy detector)."""
        if self.cosine is None or self.copy_threshold <= 0:
            return None
        return self.cosine >= self.copy_threshold

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
    copy_threshold: float = 0.0,
) -> ReportData:
    """Per-output nearest-shield numbers and batch diversity.

    Diversity uses the embeddings when there are any, else the flattened pixels (what the user sees),
    else the flattened latents (cosine kernel in every case).
    """
    batch = next(t for t in (latents, images, output_embeddings) if t is not None)
    report = ReportData(count=int(batch.shape[0]), names=[""] * int(batch.shape[0]), radius=radius)
    report.similarity_threshold = similarity_threshold
    report.embedder_key = embedder_key
    report.copy_threshold = copy_threshold
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
def method_curves(record: Optional[RunRecord]) -> Optional[MethodCurves]:
    """A registered method's run as matrices; None for no record, a run without steps or an unknown kind."""
    if record is None or not record.steps or record.method is None:
        return None
    fields = {}
    for name in record.method.per_sample_fields():
        matrix = _step_matrix(record.steps, name)
        if matrix is not None:
            fields[name] = matrix
    return MethodCurves(
        method=record.method,
        run_number=record.run_number,
        label=record.label,
        touched=np.array(record.touched_matrix(), dtype=bool).reshape(len(record.steps), -1),
        sigma=np.nanmax(fields["sigma"], axis=1),
        fields=fields,
        summary=dict(record.summary),
    )


def latest_runs(book: RecordBook) -> list[MethodCurves]:
    """The newest run of every registered method, in registration order."""
    runs = (method_curves(book.latest(method.kind)) for method in registered_methods())
    return [run for run in runs if run is not None]


def _step_matrix(steps: list[dict], key: str) -> Optional[np.ndarray]:
    """[steps, samples] of a per-sample list field, NaN-padded (steps without it stay NaN)."""
    rows = [[float(v) for v in step[key]] if key in step else None for step in steps]
    if all(row is None for row in rows):
        return None
    width = max(len(row) for row in rows if row is not None)
    matrix = np.full((len(rows), width), np.nan)
    for index, row in enumerate(rows):
        if row:
            matrix[index, : len(row)] = row
    return matrix


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
        label = "copy-detector similarity" if report.copy_threshold > 0 else "cosine"
        text = f"{label} {_number(report.cosine[index], 4)} to '{report.cosine_names[index]}'"
        if report.copy_threshold > 0 and report.cosine[index] >= report.copy_threshold:
            text += " COPY"
        if report.similarity_threshold > 0 and report.cosine[index] >= report.similarity_threshold:
            text += " SIMILAR"
        parts.append(text)
    return " ".join(parts) if len(parts) > 1 else ""


def _count(value) -> str:
    """A whole float without its '.0' (Early Copy Redraw's probe steps count parts of a batch)."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def method_lines(run: MethodCurves) -> list[str]:
    """The run's head line, what it touched, then the method's own lines."""
    label = f", {run.label}" if run.label else ""
    headline = "".join(f", {_count(run.summary[key])} {key}" for key in run.method.headline if key in run.summary)
    lines = [f"{run.method.title} (run #{run.run_number}{label}): {run.steps} steps recorded{headline}"]
    per_step = run.touched.any(axis=1)
    touched_steps = np.flatnonzero(per_step)
    last = f", last at step {int(touched_steps[-1])}" if touched_steps.size else ""
    lines.append(
        f"  touched {int(run.touched.sum())} step-samples in {touched_steps.size} steps{last}; "
        f"samples touched: {run.touched_samples()}"
    )
    if run.method.describe is not None:
        lines += run.method.describe(run)
    if run.summary.get("note"):
        lines.append(f"  {run.summary['note']}")
    return lines


def summary_text(report: ReportData) -> str:
    lines = [f"Shield Report: {report.count} output{'s' if report.count != 1 else ''}"]
    lines += [line for line in (_output_line(report, i) for i in range(report.count)) if line]
    copies = report.copies()
    if copies is not None:
        lines.append(
            f"copies by the copy detector (similarity >= {report.copy_threshold:.4g}, {report.embedder_key}): "
            f"{int(copies.sum())}/{report.count}"
        )
    l2_violations = report.l2_violations()
    if l2_violations is not None:
        lines.append(
            f"latent L2 (not a copy test: noise and colour move it) inside the radius r={report.radius:g}: {int(l2_violations.sum())}/{report.count} "
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
    for run in report.runs:
        lines += method_lines(run)
    lines += report.notes
    return "\n".join(lines)
