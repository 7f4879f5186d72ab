"""Random-weight checkpoints of the real model families, written in each family's own key layout.

ComfyUI's `model_detection` reads a model's sizes from its state dict, so a small file in the real
layout loads through the stock loaders (CheckpointLoaderSimple, UNETLoader, VAELoader) as the real
model class, with the family's latent format and `model_sampling` (HOST.md lists the verified sizes).
The weights are built here with ComfyUI's own module classes at the smallest size detection accepts,
filled from a seeded generator (ComfyUI's layers skip initialisation; nothing is left at zero, or the
outputs would be trivial), and saved with one metadata key, so the same seed writes the same bytes.

Nothing here is committed: tests write the files once per session (`FamilyFiles`) and the benches
write theirs to a folder they are given.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import threading
from typing import Callable, Optional

import torch

SEED = 20261213
UNET_FOLDER, CHECKPOINT_FOLDER, VAE_FOLDER = "diffusion_models", "checkpoints", "vae"


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family as a user loads it, and what ComfyUI must detect from the file."""

    name: str
    loader: str  # "checkpoint" (CheckpointLoaderSimple, VAE inside) or "unet" (UNETLoader + VAELoader)
    model_class: str  # comfy.model_base class the loader must build
    latent_format: str  # comfy.latent_formats class name
    channels: int
    video: bool
    vae: str  # key of VAE_BUILDERS; for "checkpoint" families the VAE is inside the file
    sampling: str  # comfy.model_sampling class name of the loaded model
    distilled_guidance: bool = False  # Flux dev: cfg 1 + FluxGuidance, no negative pass

    @property
    def file_name(self) -> str:
        return f"shield_fixture_{self.name}.safetensors"

    @property
    def folder(self) -> str:
        return CHECKPOINT_FOLDER if self.loader == "checkpoint" else UNET_FOLDER

    @property
    def vae_file_name(self) -> str:
        return self.file_name if self.loader == "checkpoint" else f"shield_fixture_vae_{self.vae}.safetensors"

    def latent_shape(self, batch: int, width: int, height: int, frames: int = 1) -> tuple[int, ...]:
        """What the family's Empty Latent node makes (8x VAE; Wan: 1 + (frames - 1) / 4 latent frames)."""
        if self.video:
            return (batch, self.channels, (frames - 1) // 4 + 1, height // 8, width // 8)
        return (batch, self.channels, height // 8, width // 8)


FAMILIES = {
    family.name: family
    for family in (
        Family("sd15", "checkpoint", "BaseModel", "SD15", 4, False, "sd", "ModelSamplingDiscrete"),
        Family("sdxl", "checkpoint", "SDXL", "SDXL", 4, False, "sd", "ModelSamplingDiscrete"),
        Family("sd3", "unet", "SD3", "SD3", 16, False, "kl16", "ModelSamplingDiscreteFlow"),
        Family("wan21", "unet", "WAN21", "Wan21", 16, True, "wan21", "ModelSamplingDiscreteFlow"),
        Family("flux", "unet", "Flux", "Flux", 16, False, "kl16", "ModelSamplingFlux", distilled_guidance=True),
    )
}
# The families cheap enough for every CI run; Flux (404M parameters: detection pins its width) is opt-in.
FAST_FAMILIES = ("sd15", "sdxl", "sd3", "wan21")


# -- seeded weights -----------------------------------------------------------------------------------
NORM_NAMES = ("norm", "ln_", "gamma", "scale", "layer_norm")


@torch.no_grad()
def fill_seeded(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and float buffer: weights ~ N(0, 1/fan_in) (unit-scale activations),
    norm gains 1 ± 0.1, everything else (biases, embeddings) ± 0.02. Nothing stays zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        noise = torch.randn(tensor.shape, generator=generator)
        leaf = name.rsplit(".", 1)[-1]
        if tensor.ndim >= 2:
            fan_in = math.prod(tensor.shape[1:])
            value = noise / math.sqrt(fan_in)
        elif leaf in ("weight", "scale", "gamma") and any(part in name for part in NORM_NAMES):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.02 * noise
        tensor.copy_(value.to(tensor.dtype))


def save_state_dict(state: dict[str, torch.Tensor], path: pathlib.Path, dtype: torch.dtype, note: str) -> None:
    import safetensors.torch

    tensors = {key: value.detach().to(dtype).contiguous() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    safetensors.torch.save_file(tensors, str(partial), metadata={"shield_fixture": note})
    partial.replace(path)


# -- diffusion models (built with ComfyUI's own classes at the smallest size detection accepts) ---
def _unet_config(**overrides) -> dict:
    config = {
        "use_checkpoint": False,
        "image_size": 32,
        "use_spatial_transformer": True,
        "legacy": False,
        "in_channels": 4,
        "out_channels": 4,
        "adm_in_channels": None,
        "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    config.update(overrides)
    return config


def sd15_unet():
    """SD1.5 pins only 320 channels and context 768: one level, one res block, a transformer in the
    input and middle blocks."""
    import comfy.supported_models

    config = _unet_config(
        model_channels=320,
        num_res_blocks=[1],
        channel_mult=[1],
        transformer_depth=[1],
        transformer_depth_output=[0, 0],
        transformer_depth_middle=1,
        context_dim=768,
        use_linear_in_transformer=False,
    )
    return comfy.supported_models.SD15(config)


def sdxl_unet():
    """The SDXL family through KOALA_700M's layout: all-320 levels, input transformer depths [0, 2, 5]
    (what detection matches), none on the way up."""
    import comfy.supported_models

    config = _unet_config(
        model_channels=320,
        num_res_blocks=[1, 1, 1],
        channel_mult=[1, 1, 1],
        transformer_depth=[0, 2, 5],
        transformer_depth_output=[0, 0, 0, 0, 0, 0],
        transformer_depth_middle=-2,
        context_dim=2048,
        use_linear_in_transformer=True,
        adm_in_channels=2816,
        num_classes="sequential",
    )
    return comfy.supported_models.KOALA_700M(config)


def sd3_unet():
    """SD3 MMDiT: depth = hidden / 64, so hidden 128 gives depth 2 (2.4M); text context 64-d, pooled 64-d."""
    import comfy.supported_models

    config = {
        "in_channels": 16,
        "out_channels": 16,
        "patch_size": 2,
        "depth": 2,
        "input_size": None,
        "adm_in_channels": 64,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 128}},
        "num_patches": 64 * 64,
        "pos_embed_max_size": 64,
        "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }
    return comfy.supported_models.SD3(config)


def wan21_unet():
    """Wan 2.1 text-to-video: dim 128 (one 128-d head), ffn 256, one layer (0.9M); text context 4096-d."""
    import comfy.supported_models

    config = {
        "image_model": "wan2.1",
        "model_type": "t2v",
        "dim": 128,
        "out_dim": 16,
        "num_heads": 1,
        "ffn_dim": 256,
        "num_layers": 1,
        "patch_size": (1, 2, 2),
        "freq_dim": 256,
        "window_size": (-1, -1),
        "qk_norm": True,
        "cross_attn_norm": True,
        "eps": 1e-6,
        "in_dim": 16,
    }
    return comfy.supported_models.WAN21_T2V(config)


def flux_unet():
    """Flux dev: detection pins hidden 3072 and 24 heads, but counts blocks: one double block and no
    single block (404M); guidance embedding on (guidance-distilled), text context 64-d, pooled 64-d."""
    import comfy.supported_models

    config = {
        "image_model": "flux",
        "axes_dim": [16, 56, 56],
        "num_heads": 24,
        "mlp_ratio": 4.0,
        "theta": 10000,
        "out_channels": 16,
        "qkv_bias": True,
        "in_channels": 16,
        "hidden_size": 3072,
        "context_in_dim": 64,
        "vec_in_dim": 64,
        "patch_size": 2,
        "depth": 1,
        "depth_single_blocks": 0,
        "guidance_embed": True,
    }
    return comfy.supported_models.Flux(config)


UNET_BUILDERS: dict[str, Callable] = {
    "sd15": sd15_unet,
    "sdxl": sdxl_unet,
    "sd3": sd3_unet,
    "wan21": wan21_unet,
    "flux": flux_unet,
}


def diffusion_state_dict(name: str, seed: int = SEED) -> dict[str, torch.Tensor]:
    """The diffusion model's state dict (no prefix) of family `name`, seeded."""
    with torch.inference_mode(False):
        model_config = UNET_BUILDERS[name]()
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({}, "", device=torch.device("cpu"))
        fill_seeded(model.diffusion_model, seed)
        return model.diffusion_model.state_dict()


# -- VAEs -------------------------------------------------------------------------------------------
KL_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def kl_vae(channels: int) -> torch.nn.Module:
    """The SD AutoencoderKL (4 channels: SD1.5/SDXL; 16: SD3/Flux). Its widths are fixed (84M)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=dict(KL_CONFIG, z_channels=channels), embed_dim=channels)


def wan21_vae() -> torch.nn.Module:
    """The Wan 2.1 VAE; its width comes from `decoder.head.0.gamma`: width 16 (3.6M)."""
    from comfy.ldm.wan.vae import WanVAE

    return WanVAE(
        dim=16,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
    )


VAE_BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "sd": lambda: kl_vae(4),
    "kl16": lambda: kl_vae(16),
    "wan21": wan21_vae,
}


def vae_state_dict(kind: str, seed: int = SEED + 1) -> dict[str, torch.Tensor]:
    with torch.inference_mode(False):
        vae = VAE_BUILDERS[kind]()
        fill_seeded(vae, seed)
        return vae.state_dict()


# -- files ------------------------------------------------------------------------------------------
def write_family(family: Family, models_dir: pathlib.Path, dtype: Optional[torch.dtype] = None) -> pathlib.Path:
    """Write the family's model file into models_dir/<checkpoints|diffusion_models>; returns its path.

    Checkpoints hold the UNet under `model.diffusion_model.` and the VAE under `first_stage_model.`,
    as a single-file SD1.5/SDXL checkpoint does (no text encoder: conditioning is fabricated).
    """
    path = models_dir / family.folder / family.file_name
    if path.exists():
        return path
    dtype = dtype or (torch.bfloat16 if family.name == "flux" else torch.float16)
    state = diffusion_state_dict(family.name)
    if family.loader == "checkpoint":
        state = {f"model.diffusion_model.{key}": value for key, value in state.items()}
        state.update({f"first_stage_model.{key}": value for key, value in vae_state_dict(family.vae).items()})
    note = json.dumps({"family": family.name, "seed": SEED, "dtype": str(dtype)})
    save_state_dict(state, path, dtype, note)
    return path


def write_vae(kind: str, models_dir: pathlib.Path, dtype: torch.dtype = torch.float16) -> pathlib.Path:
    path = models_dir / VAE_FOLDER / f"shield_fixture_vae_{kind}.safetensors"
    if not path.exists():
        save_state_dict(vae_state_dict(kind), path, dtype, json.dumps({"vae": kind, "seed": SEED + 1}))
    return path


class FamilyFiles:
    """Writes each family's files into one models folder on first use (thread-safe), then reuses them."""

    def __init__(self, models_dir: pathlib.Path):
        self.models_dir = models_dir
        self._lock = threading.Lock()

    def files(self, name: str) -> Family:
        family = FAMILIES[name]
        with self._lock:
            write_family(family, self.models_dir)
            if family.loader == "unet":
                write_vae(family.vae, self.models_dir)
        return family

    def link_into(self, target_models_dir: pathlib.Path, name: str) -> Family:
        """Symlink the family's files into another models folder (a server's), writing them if needed."""
        family = self.files(name)
        sources = [self.models_dir / family.folder / family.file_name]
        if family.loader == "unet":
            sources.append(self.models_dir / VAE_FOLDER / family.vae_file_name)
        for source in sources:
            link = target_models_dir / source.parent.name / source.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(source)
        return family
