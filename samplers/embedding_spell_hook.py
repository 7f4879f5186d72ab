"""Sparse repellency in an embedding space inside ComfyUI's sampler: a post-CFG function that edits `denoised`.

As `spell_hook`, the hook replaces the denoised prediction x̂0 after CFG, which every sampler steps from. The
distances are measured between f(decode(x̂0)) and the shields' embeddings f(shield image) (a copy detector's
descriptor, DreamSim, CLIP, ...), and a sample inside a ball is moved through the gradient of f∘decode so that
its embedding reaches SPELL's target e + λΔ (math and paper sections in `embedding_spell_math`). A sample
outside every ball is not differentiated and not changed; a step where no sample is inside returns x̂0 itself.
The patch follows the method contract (`method_patch.MethodPatch`); its record schema is
`EMBEDDING_SPELL_RECORD` below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import comfy.model_management
import numpy as np
import torch
from typing_extensions import TypedDict

from ..core.records import Curves, MethodRecord, StepEntry
from . import embedding_spell_math as esm
from .embedded_shields import EmbeddedShieldsPatch, EmbeddedShieldsRun, shield_count
from .embedders import autograd_through
from .method_patch import window_problem
from .procreate_hook import decode_images

NODE_TITLE = "Sparse Repellency (embedding space)"
RESIDUAL_TOLERANCE = (
    0.25  # stop once ‖e − t‖ ≤ this × ‖λΔ‖ (below 1 − 1/λ = 0.375 for λ 1.6: e is then out of the ball)
)


# -- the record (what the Report, the frontend and the benches read) --------------------------------
class EmbeddingSpellStep(StepEntry):
    """One evaluation. Outside the window the per-sample lists other than sigma/touched are empty.

    similarity: cosine of each sample's embedding to its nearest shield before the step (−1 without shields);
    similarity_after: the same after the correction (equal to `similarity` for untouched samples);
    shield_hits / batch_hits: shields / other samples within r; inside_after: still inside a ball after it.
    """

    similarity: list[float]
    similarity_after: list[float]
    shield_hits: list[int]
    batch_hits: list[int]
    inside_after: list[bool]


class EmbeddingSpellSummary(TypedDict):
    steps: int
    active_steps: int
    touched_samples: list[int]
    still_inside: int  # step-samples still inside a ball after their correction
    shields: int
    similarity: float
    radius: float  # θ_r in radians
    embedder: str
    memory_id: Optional[str]


def describe_embedding_spell(curves) -> list[str]:
    after = curves.field("similarity_after")
    if after is None or not np.isfinite(after).any():
        return []
    measured = [row for row in after if np.isfinite(row).any()]
    return [f"  max similarity to the nearest shield after the last measured step: {np.nanmax(measured[-1]):.3g}"]


EMBEDDING_SPELL_RECORD = MethodRecord(
    kind="embedding_repellency",
    title=NODE_TITLE,
    step=EmbeddingSpellStep,
    summary=EmbeddingSpellSummary,
    chart=Curves(value="similarity", label="cosine to nearest shield (embedding)"),
    describe=describe_embedding_spell,
    headline=("shields",),
)


@dataclasses.dataclass(frozen=True)
class EmbeddingRepellencySettings:
    similarity: float = 0.7  # inside a shield: cosine of the embeddings above this
    overcompensation: float = 1.6
    intra_batch: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0
    iterations: int = 3

    def validate(self) -> None:
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"{NODE_TITLE}: similarity must lie in [-1, 1], got {self.similarity}")
        window = window_problem(NODE_TITLE, self.start_percent, self.end_percent)
        if window:
            raise ValueError(window)
        if self.iterations < 1:
            raise ValueError(f"{NODE_TITLE}: iterations must be ≥ 1, got {self.iterations}")

    @property
    def radius(self) -> float:
        return esm.angular_radius(self.similarity)


@dataclasses.dataclass
class RunState(EmbeddedShieldsRun):
    still_inside: int = 0


class EmbeddingRepellencyPatch(EmbeddedShieldsPatch[EmbeddingRepellencySettings, RunState]):
    """One node execution: the VAE that decodes x̂0, the embedder, the shields and the settings."""

    method = EMBEDDING_SPELL_RECORD
    run_state = RunState

    def summarize(self, state: RunState) -> dict:
        steps = state.record.steps
        return dict(
            steps=len(steps),
            active_steps=sum(1 for step in steps if any(step["touched"])),
            touched_samples=sorted({b for step in steps for b, moved in enumerate(step["touched"]) if moved}),
            still_inside=state.still_inside,
            shields=shield_count(state.shields),
            similarity=self.settings.similarity,
            radius=self.settings.radius,
            embedder=self.embedder.key,
            memory_id=self.shields.memory_id or None,
        )

    # -- the hook -------------------------------------------------------------------------------
    def step(self, state: RunState, args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        sigma = args["sigma"].reshape(-1).float()
        batch = denoised.shape[0]
        if denoised.is_nested or not self.in_window(state, args["model"], float(sigma.max())):
            state.record.add_step(
                sigma=sigma.tolist(),
                in_window=False,
                touched=[False] * batch,
                similarity=[],
                similarity_after=[],
                shield_hits=[],
                batch_hits=[],
                inside_after=[],
            )
            return denoised
        comfy.model_management.load_models_gpu([self.vae.patcher])
        first_stage = self.vae.first_stage_model
        with torch.inference_mode(False), autograd_through(first_stage):  # no copy of the VAE's weights
            return self._repel(state, args, denoised, sigma, first_stage)

    def _repel(self, state: RunState, args: dict, denoised: torch.Tensor, sigma: torch.Tensor, first_stage):
        settings, batch = self.settings, denoised.shape[0]
        embed = self._embed_function(first_stage, args["model"])
        x0 = denoised.detach().clone().float()
        with torch.no_grad():
            embedded = embed(x0)
        shields = state.shields.to(embedded.device) if state.shields.numel() else embedded.new_zeros(0, 1)
        found = esm.inside_balls(embedded, shields, settings.radius, settings.intra_batch)
        moving = found.inside
        acting = self.acting_samples(args, batch)
        if acting is not None:
            moving = moving & acting
        entry = dict(
            sigma=sigma.tolist(),
            in_window=True,
            similarity=found.nearest_similarity,
            shield_hits=found.shield_hits,
            batch_hits=found.batch_hits,
        )
        if not bool(moving.any()):  # nothing inside a ball: no gradient, the same tensor back
            state.record.add_step(
                **entry,
                touched=[False] * batch,
                similarity_after=found.nearest_similarity,
                inside_after=found.inside.tolist(),
            )
            return denoised
        step = settings.overcompensation * found.delta
        targets = esm.exp_map(embedded, step).to(embedded)
        tolerance = RESIDUAL_TOLERANCE * step.norm(dim=1).to(embedded)

        def reached(current: torch.Tensor) -> torch.Tensor:
            return (current - targets).norm(dim=1) <= tolerance

        moved, moved_embedding, _ = esm.move_to_targets(
            x0,
            targets,
            embed,
            moving,
            settings.iterations,
            done=reached,
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        )
        after = esm.inside_balls(moved_embedding, shields, settings.radius, settings.intra_batch)
        inside_after = (after.inside & moving).tolist()
        state.still_inside += sum(inside_after)
        state.record.add_step(
            **entry,
            touched=moving.tolist(),
            similarity_after=[
                a if bool(m) else b
                for a, b, m in zip(after.nearest_similarity, found.nearest_similarity, moving, strict=True)
            ],
            inside_after=inside_after,
        )
        mask = moving.reshape(-1, *[1] * (denoised.ndim - 1)).to(denoised.device)
        return torch.where(mask, moved.detach().to(denoised.dtype), denoised)

    # -- pieces -------------------------------------------------------------------------------------
    def _embed_function(self, first_stage: torch.nn.Module, model):
        """x̂0 in the sampler's space -> unit embeddings [B, D], differentiable (VAE decode, then the embedder)."""

        def embed(latent: torch.Tensor) -> torch.Tensor:
            return esm.unit_embeddings(self.embedder.embed(decode_images(self.vae, first_stage, model, latent)))

        return embed
