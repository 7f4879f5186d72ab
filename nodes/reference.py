"""Shield Memorizer Model and Conditioning: the closed-form memorizer (reference_models/memorizer.py) as nodes.

Experimental and for testing: a real ComfyUI model whose denoiser is the exact optimal denoiser of the
given latents, so sampling reproduces them, and the conditioning that restricts it to a subset of its
items (a real cond/uncond difference for CFG). They show what the pack's patches do without weights.
"""

from comfy_api.v0_0_2 import io

from ..reference_models.memorizer import PREDICTION_TYPES, build_memorizer, subset_conditioning
from .common import CATEGORY, require_finite
from .validation import ShieldNode

MAX_ITEMS = 4096


def parse_subset(subset: str, n_items: int) -> list[int] | None:
    """ "1,4" -> [1, 4]; "" -> None (the whole set). Raises ValueError naming the input."""
    parts = [part.strip() for part in subset.split(",") if part.strip()]
    if not parts:
        return None
    try:
        indices = [int(part) for part in parts]
    except ValueError:
        raise ValueError(
            f"Shield Memorizer Conditioning: subset must be comma-separated item indices like '1,4' (or empty for "
            f"the whole set), got {subset!r}"
        ) from None
    bad = [index for index in indices if not 0 <= index < n_items]
    if bad:
        raise ValueError(
            f"Shield Memorizer Conditioning: subset indices {bad} are outside 0..{n_items - 1}; n_items must match the "
            f"memorizer's number of items ({n_items} given)"
        )
    return indices


class ShieldMemorizerModel(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldMemorizerModel",
            display_name="Shield Memorizer Model (test)",
            category=f"{CATEGORY}/testing",
            description="A model that memorizes the given latents exactly (the posterior mean of the set): sampling it "
            "reproduces them. For tests and demos of the pack's patches; conditioning is ignored unless built with "
            "Shield Memorizer Conditioning (or the conditioning output here, which selects the whole set).",
            inputs=[
                io.Latent.Input(
                    "latent",
                    tooltip="The latents the model memorizes (batch of N items). 3-channel items "
                    "decode with the stock pixel_space VAE.",
                ),
                io.Combo.Input(
                    "prediction",
                    options=list(PREDICTION_TYPES),
                    default="eps",
                    tooltip="The parameterization of the model: eps, v_prediction or flow.",
                ),
            ],
            outputs=[
                io.Model.Output(),
                io.Conditioning.Output(
                    "conditioning", tooltip="Conditioning that selects the whole set (use as positive and negative)."
                ),
                io.Int.Output(
                    "n_items", tooltip="How many items the model memorizes (for Shield Memorizer Conditioning)."
                ),
            ],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, latent, prediction) -> io.NodeOutput:
        items = latent["samples"].float()
        require_finite(items, "Shield Memorizer Model: 'latent'")
        return io.NodeOutput(
            build_memorizer(items, prediction), subset_conditioning(items.shape[0]), int(items.shape[0])
        )


class ShieldMemorizerConditioning(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldMemorizerConditioning",
            display_name="Shield Memorizer Conditioning (test)",
            category=f"{CATEGORY}/testing",
            description="Conditioning that restricts the Shield Memorizer Model to a subset of its items, so CFG has a "
            "real cond/uncond difference (positive: a subset, negative: the whole set).",
            inputs=[
                io.String.Input(
                    "subset",
                    default="",
                    tooltip="Comma-separated item indices, e.g. '1,4'. Empty selects the whole set (no restriction).",
                ),
                io.Int.Input(
                    "n_items",
                    default=6,
                    min=1,
                    max=MAX_ITEMS,
                    step=1,
                    tooltip="The memorizer's number of items (its n_items output).",
                ),
            ],
            outputs=[io.Conditioning.Output("conditioning", tooltip="The memorizer's subset conditioning.")],
            is_experimental=True,
        )

    @classmethod
    def validate_inputs(cls, subset="", **unused) -> bool | str:
        # only the syntax here: n_items may come from a link (the memorizer's n_items output)
        try:
            parse_subset(subset, MAX_ITEMS)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, subset, n_items) -> io.NodeOutput:
        return io.NodeOutput(subset_conditioning(n_items, parse_subset(subset, n_items)))


REFERENCE_NODES = [ShieldMemorizerModel, ShieldMemorizerConditioning]
