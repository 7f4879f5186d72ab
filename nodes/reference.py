"""Shield Memorizer Model: the closed-form memorizer (reference_models/memorizer.py) as a MODEL.

Experimental and for testing: a real ComfyUI model whose denoiser is the exact optimal denoiser of the
given latents, so sampling reproduces them. It shows what Sparse Repellency does without any weights.
"""

from comfy_api.v0_0_2 import io

from ..reference_models.memorizer import PREDICTION_TYPES, build_memorizer, subset_conditioning
from .common import CATEGORY


class ShieldMemorizerModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldMemorizerModel",
            display_name="Shield Memorizer Model (test)",
            category=f"{CATEGORY}/testing",
            description="A model that memorizes the given latents exactly (the posterior mean of the set): sampling it "
            "reproduces them. For tests and demos of Sparse Repellency; conditioning is ignored unless built with "
            "the pack's subset conditioning.",
            inputs=[
                io.Latent.Input("latent", tooltip="The latents the model memorizes (batch of N items)."),
                io.Combo.Input("prediction", options=list(PREDICTION_TYPES), default="eps",
                               tooltip="The parameterization of the model: eps, v_prediction or flow."),
            ],
            outputs=[
                io.Model.Output(),
                io.Conditioning.Output("conditioning", tooltip="Conditioning that selects the whole set (use as positive and negative)."),
            ],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, latent, prediction) -> io.NodeOutput:
        items = latent["samples"].float()
        return io.NodeOutput(build_memorizer(items, prediction), subset_conditioning(items.shape[0]))
