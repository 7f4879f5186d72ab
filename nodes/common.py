"""What every node of the pack shares: the category root, the id prefix, custom socket types, the check of
a tensor input's values."""

import torch
from comfy_api.v0_0_2 import io

CATEGORY = "shield"
NODE_ID_PREFIX = "Shield"

SHIELD_SET = io.Custom("SHIELD_SET")
EMBEDDER = io.Custom("SHIELD_EMBEDDER")
RISK = io.Custom("SHIELD_RISK")


def embedding_space_inputs(space: str) -> list:
    """The inputs every method that measures shields in an embedding space starts with; `space` says what the
    embedder is for in this node."""
    return [
        io.Model.Input("model", tooltip="The model to patch."),
        io.Vae.Input("vae", tooltip="This model's VAE: decodes the predicted x̂0 for the embedder."),
        EMBEDDER.Input(
            "embedder",
            tooltip=f"{space}: the copy detector's embedder (demo), DreamSim, CLIP Vision Embedder, or Pixel Embedder.",
        ),
        SHIELD_SET.Input(
            "shield_set",
            tooltip="The protected images (a set with images, or embeddings for this embedder, or latents that "
            "'vae' decodes). A Shield Memory grows with every finished generation.",
        ),
    ]


def require_finite(tensor: torch.Tensor, where: str) -> None:
    """Refuse NaN or inf in a tensor input; `where` names the node and the input ("Shield Report: 'latent'")."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} contains NaN or inf; check the node that made it (a VAE or sampler that diverged)")


def require_latent_batch(samples: torch.Tensor, where: str) -> None:
    """A LATENT's samples as a sampler needs them: [N, C, H, W] (or [N, C, T, H, W] video), N >= 1, finite.
    Nested (multi-part) latents are left to the nodes that read them."""
    if getattr(samples, "is_nested", False):
        return
    if samples.ndim < 4:
        raise ValueError(
            f"{where} has shape {list(samples.shape)}; it must be a batch of latents [N, C, H, W] (or [N, C, T, H, "
            "W] for video), as Empty Latent Image, VAE Encode or a sampler make them"
        )
    if samples.shape[0] == 0:
        raise ValueError(f"{where} is an empty batch (0 latents); connect a latent with batch_size 1 or more")
    require_finite(samples, where)
