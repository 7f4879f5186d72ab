"""What the ProCreate tests share: pixel-space memorizer items, a small differentiable embedder, and a
writer of random-weight DreamSim files in the dreamsim package's own layout (HOST.md)."""

from __future__ import annotations

import pathlib

import torch


def pixel_cosine(latents: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """[B, K] cosine of the Pixel Embedder at 16 px: for 16×16 pixel-space latents, the latents themselves."""
    a = torch.nn.functional.normalize(latents.clamp(-1, 1).flatten(1).double(), dim=1)
    b = torch.nn.functional.normalize(items.flatten(1).double(), dim=1)
    return a @ b.T


def rgb_items(count: int = 6, size: int = 16, seed: int = 7) -> torch.Tensor:
    """[count, 3, size, size] in [-1, 1]: 3-channel latents that ComfyUI's pixel_space VAE decodes."""
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def to_images(latents: torch.Tensor) -> torch.Tensor:
    """What the pixel_space VAE decodes 3-channel latents to: IMAGE [B, H, W, 3] in [0, 1]."""
    return ((latents + 1) / 2).clamp(0, 1).movedim(1, -1)


def pooled_projection_embedder(seed: int = 3, size: int = 16):
    """A fixed differentiable feature map: 2x2 average pooling, then a seeded random projection to 32-d."""
    from comfyui_shield.samplers.embedders import CallableEmbedder

    projection = torch.randn(3 * (size // 2) ** 2, 32, generator=torch.Generator().manual_seed(seed))

    def features(images):
        return torch.nn.functional.avg_pool2d(images.movedim(-1, 1) - 0.5, 2).flatten(1) @ projection

    return CallableEmbedder(features, "test/pooled-projection")


def write_random_dreamsim(folder: pathlib.Path) -> pathlib.Path:
    """open_clip_vitb32 files as dreamsim 0.2.1 reads them, with random weights (seeded)."""
    from dreamsim.feature_extraction.vision_transformer import vit_base
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    vit = vit_base(patch_size=32)
    vit.pos_drop = torch.nn.LayerNorm(768)
    state = dict(vit.state_dict(), proj=torch.randn(768, 512) / 30)
    torch.save({"state_dict": state}, folder / "open_clip_vitb32_pretrain.pth.tar")
    perceptual = PerceptualModel(
        model_type="open_clip_vitb32", feat_type="embedding", stride="32", lora=True, load_dir=str(folder), device="cpu"
    )
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", target_modules=["qkv"])
    get_peft_model(perceptual, config).save_pretrained(str(folder / "open_clip_vitb32_single_lora"))
    return folder
