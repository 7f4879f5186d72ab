"""A tiny real ComfyUI UNet (the SD1.5 architecture at a few dozen channels) with seeded weights.

It predicts nothing useful; it exists so tests run real ComfyUI models of every parameterization
(EPS, V-prediction, flow) through the same code paths a real checkpoint takes. ComfyUI's layers
skip weight initialisation, so every parameter is filled here from a seeded generator.
"""

from __future__ import annotations

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch

from .memorizer import PREDICTION_TYPES, plain_latent_format

CONTEXT_DIM = 64


class TinyUNetConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
    latent_format = comfy.latent_formats.SD15
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def tiny_unet_config(in_channels: int = 4) -> dict:
    return {
        "image_size": 32,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "model_channels": 32,
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "transformer_depth": [1, 1],
        "transformer_depth_output": [1, 1, 1, 1],
        "transformer_depth_middle": 1,
        "context_dim": CONTEXT_DIM,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "legacy": False,
        "adm_in_channels": None,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


@torch.no_grad()
def fill_seeded(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    for parameter in module.parameters():
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def build_tiny_unet(prediction: str = "eps", seed: int = 0, flow_shift: float = 1.0, channels: int = 4):
    """A ComfyUI MODEL (ModelPatcher) around a tiny UNetModel with seeded weights.

    4 channels use SD1.5's latent format; any other count a plain scale-1 format (3 channels is what
    the stock pixel_space VAE decodes)."""
    config = TinyUNetConfig(tiny_unet_config(in_channels=channels))
    if channels != 4:
        config.latent_format = plain_latent_format(channels)
    if prediction == "flow":
        config.sampling_settings = {"shift": flow_shift, "multiplier": 1000}
    model = comfy.model_base.BaseModel(config, model_type=PREDICTION_TYPES[prediction], device=torch.device("cpu"))
    fill_seeded(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def random_text_conditioning(seed: int, tokens: int = 4) -> list:
    """CONDITIONING shaped like a text encoder's output for the tiny UNet."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, CONTEXT_DIM, generator=generator), {}]]
