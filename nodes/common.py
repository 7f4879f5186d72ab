"""What every node of the pack shares: the category root, the id prefix, custom socket types, the check of
a tensor input's values."""

import torch
from comfy_api.v0_0_2 import io

CATEGORY = "shield"
NODE_ID_PREFIX = "Shield"

SHIELD_SET = io.Custom("SHIELD_SET")
EMBEDDER = io.Custom("SHIELD_EMBEDDER")
RISK = io.Custom("SHIELD_RISK")


def require_finite(tensor: torch.Tensor, where: str) -> None:
    """Refuse NaN or inf in a tensor input; `where` names the node and the input ("Shield Report: 'latent'")."""
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{where} contains NaN or inf; check the node that made it (a VAE or sampler that diverged)")
