"""Conditioning shaped like each family's text encoders' output, without text-encoder weights.

The family fixtures (harness/families.py) carry no text encoder: CLIP-L/G and T5 have fixed sizes
that no test can afford. The diffusion model only sees tensors, so seeded tensors of the right
shapes exercise the same code: cross-attention context, pooled vectors (SDXL's ADM, SD3's `y`,
Flux's `vector_in`) and, for Flux, the distilled guidance that FluxGuidance adds on top.
"""

from __future__ import annotations

from typing import Optional

import torch


def conditioning_shapes(model_patcher) -> tuple[int, Optional[int]]:
    """(text context width, pooled width or None) that the loaded model's conditioning needs."""
    model = model_patcher.model
    config = model.model_config.unet_config
    kind = type(model).__name__
    if kind == "SD3":
        return config["context_embedder_config"]["params"]["in_features"], config["adm_in_channels"]
    if kind == "Flux":
        return config["context_in_dim"], config["vec_in_dim"]
    if kind.startswith("WAN"):
        return model.diffusion_model.text_embedding[0].in_features, None
    if kind == "SDXL":
        return config["context_dim"], 1280  # ADM 2816 = pooled 1280 + six 256-d size embeddings
    if config.get("context_dim") is None:
        raise ValueError(f"no fabricated conditioning for {kind}")
    return config["context_dim"], None


def fabricated_conditioning(model_patcher, seed: int, tokens: int = 8) -> list:
    """CONDITIONING [[context [1, tokens, D], {pooled_output}]] with seeded entries ~ N(0, 1)."""
    context_dim, pooled_dim = conditioning_shapes(model_patcher)
    generator = torch.Generator().manual_seed(seed)
    extra = {}
    if pooled_dim is not None:
        extra["pooled_output"] = torch.randn(1, pooled_dim, generator=generator)
    return [[torch.randn(1, tokens, context_dim, generator=generator), extra]]
