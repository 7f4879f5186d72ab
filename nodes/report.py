"""Shield Report: did the shield work? Nearest-shield distances, diversity, and what the patches did.

The node is thin: it gathers tensors, calls the embedder, and hands over to core/report.py (numbers
and text) and core/report_charts.py (matplotlib charts).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from comfy_api.v0_0_2 import io, ui

from ..core.records import RECORDS
from ..core.report import ReportData, latest_runs, measure_outputs, summary_text
from ..core.report_charts import render_report
from ..core.shield_set import ShieldSet, latent_format_name
from ..samplers.latent_space import latent_format_named, latent_format_of, to_model_space
from .common import CATEGORY, EMBEDDER, SHIELD_SET, require_finite
from .validation import ShieldNode

logger = logging.getLogger(__name__)


class ShieldReport(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldReport",
            display_name="Shield Report",
            category=f"{CATEGORY}/report",
            description=(
                "Measures a batch of outputs: latent L2 distance and embedder cosine similarity to the "
                "nearest shield, violations of the radius, batch diversity (Vendi score, mean pairwise "
                "similarity), and the newest run record of every Shield method (what it touched, its curves)."
            ),
            inputs=[
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip="Decoded outputs (needed for the embedder's cosine similarity). Leave unconnected to measure latents only.",
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="Output latents (needed for the L2 distance to the shields). Leave unconnected to measure images only.",
                ),
                SHIELD_SET.Input(
                    "shield_set",
                    optional=True,
                    tooltip="The protected set to measure against. Unconnected: only diversity and run records are reported.",
                ),
                EMBEDDER.Input(
                    "embedder",
                    optional=True,
                    tooltip="Embeds images for cosine similarity and diversity (e.g. DreamSim). A Shield Copy Detector "
                    "Loader here makes the report count copies by the detector's threshold. Unconnected: diversity "
                    "uses latents or pixels.",
                ),
                io.Float.Input(
                    "radius",
                    default=0.0,
                    min=0.0,
                    max=100000.0,
                    step=0.1,
                    tooltip="Shield radius, L2 in the model's latent space (Sparse Repellency's absolute radius): outputs "
                    "within it count as violations. 0 turns the check off.",
                ),
                io.Float.Input(
                    "similarity_threshold",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Embedder cosine similarity at or above which an output counts as too similar to a shield. 0 turns the check off.",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The model that made the outputs: its latent format turns latents into the model's space, "
                    "where Sparse Repellency measures its radius. Unconnected: the shield set's latent format.",
                ),
                io.Boolean.Input(
                    "include_run_records",
                    default=True,
                    tooltip="Add the newest run record of every Shield method (SPELL, Transition-Point CFG, "
                    "ProCreate, ...): the samples and steps it touched and its curves. Off: outputs only.",
                ),
            ],
            outputs=[
                io.Image.Output("charts", tooltip="The report's charts as one image."),
                io.String.Output(
                    "summary", tooltip="The report's numbers as text, one line per output and per measurement."
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls,
        images: Optional[torch.Tensor] = None,
        latent: Optional[dict] = None,
        shield_set: Optional[ShieldSet] = None,
        embedder=None,
        radius: float = 0.0,
        similarity_threshold: float = 0.0,
        include_run_records: bool = True,
        model=None,
    ) -> io.NodeOutput:
        report = build_report(
            images, latent, shield_set, embedder, radius, similarity_threshold, include_run_records, model
        )
        text = summary_text(report)
        charts = torch.from_numpy(render_report(report)).unsqueeze(0)
        preview = ui.PreviewImage(charts, cls=cls).as_dict()
        return io.NodeOutput(charts, text, ui={**preview, "text": [text]})


def build_report(
    images: Optional[torch.Tensor],
    latent: Optional[dict],
    shield_set: Optional[ShieldSet],
    embedder,
    radius: float,
    similarity_threshold: float,
    include_run_records: bool,
    model=None,
) -> ReportData:
    latents = None if latent is None else latent["samples"].float().cpu()
    for tensor, name in ((latents, "latent"), (images, "images")):
        if tensor is not None:
            require_finite(tensor, f"Shield Report: '{name}'")
    if latents is None and images is None:
        raise ValueError(
            "Shield Report: connect the outputs to measure, to the 'images' input, the 'latent' input, or both."
        )
    if latents is not None and images is not None and latents.shape[0] != images.shape[0]:
        raise ValueError(
            f"Shield Report: 'latent' holds {latents.shape[0]} items but 'images' holds {images.shape[0]}; "
            "connect the latents and their decoded images from the same batch."
        )
    if shield_set is not None and latents is not None:
        _check_latent_shape(shield_set, latents, model)
    output_embeddings, shield_embeddings = _embeddings(images, shield_set, embedder)
    latent_format = _latent_format(shield_set, model)
    shield_latents = None if shield_set is None else shield_set.latents
    if latent_format is not None:  # distances in the model's space, the units of SPELL's radius
        latents = None if latents is None else to_model_space(latents, latent_format)
        shield_latents = None if shield_latents is None else to_model_space(shield_latents, latent_format)
    report = measure_outputs(
        latents=latents,
        images=images,
        output_embeddings=output_embeddings,
        shield_latents=shield_latents,
        shield_names=() if shield_set is None else shield_set.names,
        shield_embeddings=shield_embeddings,
        radius=radius,
        similarity_threshold=similarity_threshold,
        embedder_key="" if embedder is None else str(embedder.key),
        copy_threshold=float(getattr(embedder, "copy_threshold", 0.0)),
    )
    if shield_set is not None and latents is None:
        report.notes.append("no 'latent' connected: latent L2 distances to the shields are not measured")
    elif shield_set is not None and latent_format is None:
        report.notes.append(
            f"the shield set's latent format {shield_set.latent_format!r} is not a ComfyUI model family: L2 "
            "distances are in LATENT units, not the model's; connect 'model' to measure as Sparse Repellency does"
        )
    if include_run_records:
        report.runs = latest_runs(RECORDS)
    return report


def _latent_format(shield_set: Optional[ShieldSet], model):
    """The model's latent format, else the shield set's family's default one (None when unknown)."""
    if model is not None:
        return latent_format_of(model)
    return None if shield_set is None else latent_format_named(shield_set.latent_format)


def _check_latent_shape(shield_set: ShieldSet, latents: torch.Tensor, model=None) -> None:
    if model is not None and len(shield_set):
        shield_set.check_compatible(shield_set.item_shape, latent_format_name(model), "Shield Report: shield_set")
    if tuple(latents.shape[1:]) != shield_set.item_shape:
        raise ValueError(
            f"Shield Report: the 'latent' items have shape {tuple(latents.shape[1:])} but the 'shield_set' holds "
            f"{shield_set.describe()}; connect a shield set built at this generation's size and model family."
        )


def _embeddings(images, shield_set: Optional[ShieldSet], embedder):
    """(output embeddings, shield embeddings), each None when it cannot be computed."""
    if embedder is None:
        return None, None
    if images is None:
        raise ValueError("Shield Report: the 'embedder' embeds images; connect the decoded outputs to 'images'.")
    with torch.no_grad():
        output_embeddings = embedder.embed(images).float().cpu()
        if shield_set is None:
            return output_embeddings, None
        stored = shield_set.embeddings.get(embedder.key)
        if stored is not None:
            return output_embeddings, stored
        if shield_set.images is None:
            raise ValueError(
                f"Shield Report: the 'shield_set' has no embeddings for embedder '{embedder.key}' and no images to "
                "embed; build the shield set with this embedder connected (Shield Set from Images)."
            )
        logger.info("embedding %d shield images with %s for the report", len(shield_set), embedder.key)
        return output_embeddings, embedder.embed(shield_set.images).float().cpu()
