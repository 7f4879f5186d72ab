"""LATENT <-> model space: the one owner of the latent format's process_in/out for the whole pack.

A LATENT (what VAE Encode and the samplers' outputs hold, and what shield sets store) and the space
the sampler works in differ by the model family's latent format: SD1.5 scales by 0.18215, SDXL by
0.13025, SD3/Flux shift then scale, Wan normalises per channel. SPELL's radius, Radius Calibration
and the Shield Report's distances are all measured in the model's space, through this module.
"""

from __future__ import annotations

import copy
from typing import Optional

import comfy.latent_formats
import torch

from ..core.shield_set import ShieldSet
from .range_search import ShieldRows


def latent_format_of(model_patcher):
    """The model's LatentFormat object (ComfyUI's, with the model's own scale factor)."""
    return model_patcher.get_model_object("latent_format")


def latent_format_named(name: str) -> Optional[comfy.latent_formats.LatentFormat]:
    """The default LatentFormat of a family by its class name ("SD15", "SDXL", "SD3", ...); None when
    the name is not one of ComfyUI's latent formats (e.g. "VAE4ch" for a set built without a model)."""
    candidate = getattr(comfy.latent_formats, name, None) if name else None
    if isinstance(candidate, type) and issubclass(candidate, comfy.latent_formats.LatentFormat):
        return candidate()
    return None


def to_model_space(latents: torch.Tensor, latent_format) -> torch.Tensor:
    """[B, C, ...] LATENT -> [B, C, ...] model space, float32 (a new tensor; the input is unchanged)."""
    return latent_format.process_in(latents.float().clone()).float()


def from_model_space(latents: torch.Tensor, latent_format) -> torch.Tensor:
    """Model space -> LATENT (what the VAE decodes); differentiable, for decoding a predicted x̂0."""
    return _autograd_safe(latent_format).process_out(latents)


def _autograd_safe(latent_format):
    """The latent format itself, or (under autograd) a copy whose tensors are normal tensors: Wan's
    per-channel mean/std are made when the model loads, under inference mode, and autograd cannot save
    inference tensors."""
    inference = {
        name: value
        for name, value in vars(latent_format).items()
        if isinstance(value, torch.Tensor) and value.is_inference()
    }
    if not inference or not torch.is_grad_enabled():
        return latent_format
    safe = copy.copy(latent_format)
    with torch.inference_mode(False):
        for name, value in inference.items():
            setattr(safe, name, value.clone())
    return safe


def shields_in_model_space(shield_set: ShieldSet, latent_format) -> ShieldRows:
    """The set's shields as rows [K, D] in model space, converted as they are read (a memory-mapped set
    stays on disk; the latent format works per entry or per channel, so it commutes with picking rows)."""
    item_shape = shield_set.item_shape

    def convert(rows: torch.Tensor) -> torch.Tensor:
        return to_model_space(rows.reshape(-1, *item_shape), latent_format).reshape(rows.shape[0], -1)

    return ShieldRows(shield_set.latents, convert, shield_set.file_rows)
