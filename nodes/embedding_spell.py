"""Sparse Repellency in an embedding space: SPELL's shields measured by a copy detector, DreamSim or CLIP.

SPELL (arXiv 2410.06025) leaves shields in a semantic space as future work (§5); the math is in
samplers/embedding_spell_math.py, the hook in samplers/embedding_spell_hook.py.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..core.shield_set import ShieldSet, ShieldSetError
from ..samplers.embedding_spell_hook import NODE_TITLE, EmbeddingRepellencyPatch, EmbeddingRepellencySettings
from ..samplers.method_patch import window_problem
from .common import embedding_space_inputs
from .method_node import method_schema, patched_model
from .run_summary import node_id_of
from .validation import ShieldNode


class ShieldEmbeddingRepellency(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return method_schema(
            node_id="ShieldEmbeddingRepellency",
            display_name=NODE_TITLE,
            description="SPELL's sparse repellency with the shields measured in an embedding space (a copy "
            "detector, DreamSim, CLIP) instead of latent L2: a sample whose predicted image embeds within the "
            "radius of a shield is moved, through the gradient of decoder and embedder, to SPELL's target outside "
            "the ball. Samples outside every ball are left exactly as they are. Works with every sampler. The move "
            "can change the embedding more than the picture: judge its outputs with another embedder than this one "
            "(docs/effects.md), and put Transition-Point CFG before it to redraw rather than disguise.",
            inputs=[
                *embedding_space_inputs("The space the shields live in"),
                io.Float.Input(
                    "similarity",
                    default=0.7,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="A sample is inside a shield when the cosine similarity of its embedding to the "
                    "shield's is above this (an angle arccos(similarity) on the unit sphere). Set it below the copy "
                    "detector's threshold (demo detector: 0.724; 0.7 measured best on the stage-3 demo weights, docs/effects.md); 1 turns the patch off.",
                ),
                io.Float.Input(
                    "overcompensation",
                    default=1.6,
                    min=0.0,
                    max=4.0,
                    step=0.05,
                    tooltip="λ: the embedding is moved to e + λΔ (paper 1.6; 1 lands on the shield sphere); "
                    "0 turns the patch off.",
                ),
                io.Boolean.Input(
                    "intra_batch",
                    default=False,
                    tooltip="Also repel the samples of one batch from each other in the embedding space "
                    "(diversity); off repels from the shield set only.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Start of the active window (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="End of the active window (1 = last step; needed for outputs to end outside).",
                ),
                io.Int.Input(
                    "iterations",
                    default=3,
                    min=1,
                    max=20,
                    step=1,
                    tooltip="Gradient steps per model evaluation that move a sample's embedding to its target "
                    "(each costs one decode + embed with gradient and one without). There is no off value.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, **_) -> bool | str:
        return window_problem(NODE_TITLE, start_percent, end_percent) or True

    @classmethod
    def execute(
        cls,
        model,
        vae,
        embedder,
        shield_set,
        similarity,
        overcompensation,
        intra_batch,
        start_percent,
        end_percent,
        iterations,
    ) -> io.NodeOutput:
        if not isinstance(shield_set, ShieldSet):
            raise ShieldSetError(f"{NODE_TITLE}: 'shield_set' is a {type(shield_set).__name__}, not a SHIELD_SET")
        settings = EmbeddingRepellencySettings(
            similarity=similarity,
            overcompensation=overcompensation,
            intra_batch=bool(intra_batch),
            start_percent=start_percent,
            end_percent=end_percent,
            iterations=iterations,
        )
        settings.validate()  # at execution too: a linked start/end skips validate_inputs
        has_memory = bool(shield_set.settings.get("shield_memory_id"))
        off = similarity >= 1.0 or overcompensation == 0 or not (len(shield_set) or intra_batch or has_memory)
        patch = None if off else EmbeddingRepellencyPatch(vae, embedder, shield_set, settings)
        return io.NodeOutput(patched_model(model, patch, node_id_of(cls)))


EMBEDDING_SPELL_NODES = [ShieldEmbeddingRepellency]
