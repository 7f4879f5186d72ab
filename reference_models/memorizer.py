"""The closed-form memorizer: a real ComfyUI model whose denoiser is the exact optimal denoiser of a
small set of latents (DESIGN.md §6).

For a data distribution that is a uniform mixture of point masses at the items y_1..y_N, and a noisy
latent x = a(σ)·y + s(σ)·n with n ~ N(0, I), the minimum-MSE denoiser is the posterior mean

    D(x, σ) = Σ_i w_i y_i,   w = softmax_i( −‖x − a(σ) y_i‖² / (2 s(σ)²) ).

ComfyUI's k-diffusion models (EPS, V-prediction) use a = 1, s = σ; flow models (CONST) use a = 1 − σ,
s = σ. Both are read from the model's own `model_sampling.noise_scaling`, and the network output is
whatever that parameterization needs for `calculate_denoised` to return D exactly. Sampling such a
model reproduces the items, which makes replication measurable on a CPU.

Conditioning selects a subset: the first token of the cross-attention context holds one flag per
item (see `subset_conditioning`); a row that selects nothing means the whole set. That gives CFG a
real cond/uncond difference (uncond = whole set, cond = a subset).
"""

from __future__ import annotations

from typing import Iterable, Optional

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
import torch

PREDICTION_TYPES = {
    "eps": comfy.model_base.ModelType.EPS,
    "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}


def posterior_mean(
    x: torch.Tensor,
    items: torch.Tensor,
    signal_scale: torch.Tensor,
    noise_scale: torch.Tensor,
    item_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact posterior mean of the items given x = signal_scale·y + noise_scale·n.

    x: [B, ...]; items: [N, ...]; signal_scale, noise_scale: [B]; item_mask: [B, N] bool or None.
    Distances are computed in float64 and the weights with a log-sum-exp softmax, so the result is
    sound from σ ≈ 0 (one item takes all the weight) to σ ≫ ‖y‖ (the set's mean).
    """
    batch = x.shape[0]
    x_flat = x.reshape(batch, -1).double()
    items_flat = items.reshape(items.shape[0], -1).double()
    a = signal_scale.double().reshape(batch, 1)
    s = noise_scale.double().reshape(batch, 1)
    squared_distance = (
        (x_flat * x_flat).sum(1, keepdim=True)
        - 2.0 * a * (x_flat @ items_flat.T)
        + a * a * (items_flat * items_flat).sum(1)[None, :]
    ).clamp_min(0.0)
    logits = -squared_distance / (2.0 * s * s)
    if item_mask is not None:
        logits = logits.masked_fill(~item_mask, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return (weights @ items_flat).reshape(x.shape).to(x.dtype)


class OptimalDenoiserNet(torch.nn.Module):
    """The `diffusion_model` of the memorizer: built by BaseModel from the config's unet_config."""

    def __init__(self, items: torch.Tensor, device=None, operations=None, **unused_config):
        super().__init__()
        self.register_buffer("items", items.detach().clone().float())
        self.dtype = torch.float32
        self._model_sampling: list = []  # set by attach(); a list keeps it out of the module tree

    def attach(self, model_sampling: torch.nn.Module) -> None:
        self._model_sampling[:] = [model_sampling]

    def forward(self, xc, timestep, context=None, transformer_options=None, **unused_conds):
        model_sampling = self._model_sampling[0]
        sigma = self._sigma(timestep, transformer_options or {}, model_sampling, xc.shape[0])
        zeros, ones = torch.zeros_like(xc), torch.ones_like(xc)
        x = xc.float() / model_sampling.calculate_input(sigma, ones)
        signal_scale = model_sampling.noise_scaling(sigma, zeros, ones).flatten(1)[:, 0]
        noise_scale = model_sampling.noise_scaling(sigma, ones, zeros).flatten(1)[:, 0]
        denoised = posterior_mean(x, self.items, signal_scale, noise_scale, self._item_mask(context))
        # calculate_denoised(σ, out, x) is affine in out: denoised = offset + slope·out.
        offset = model_sampling.calculate_denoised(sigma, zeros, x)
        slope = model_sampling.calculate_denoised(sigma, ones, torch.zeros_like(x)) - model_sampling.calculate_denoised(
            sigma, zeros, torch.zeros_like(x)
        )
        return (denoised - offset) / slope

    @staticmethod
    def _sigma(timestep, transformer_options, model_sampling, batch: int) -> torch.Tensor:
        """The exact sigma per row. ComfyUI runs cond and uncond chunks in one call, each chunk with the
        sampler's sigmas, so "sigmas" is tiled to the call's batch; without it, invert the timestep."""
        sigma = transformer_options.get("sigmas")
        if sigma is None or batch % sigma.numel() != 0:
            return model_sampling.sigma(timestep).float().reshape(-1)
        return sigma.float().reshape(-1).repeat(batch // sigma.numel())

    def _item_mask(self, context) -> Optional[torch.Tensor]:
        if context is None:
            return None
        n_items = self.items.shape[0]
        if context.shape[-1] < n_items:
            raise ValueError(
                f"memorizer conditioning has {context.shape[-1]} item flags but the model holds "
                f"{n_items} items: build it with subset_conditioning(n_items={n_items}, ...)"
            )
        mask = context[:, 0, :n_items] > 0.5
        selects_nothing = ~mask.any(dim=1, keepdim=True)
        return mask | selects_nothing


def plain_latent_format(channels: int) -> comfy.latent_formats.LatentFormat:
    latent_format = comfy.latent_formats.LatentFormat()
    latent_format.latent_channels = channels
    return latent_format


class MemorizerConfig(comfy.supported_models_base.BASE):
    unet_extra_config = {}
    memory_usage_factor = 1.0
    supported_inference_dtypes = [torch.float32]


def build_memorizer(
    items: torch.Tensor,
    prediction: str = "eps",
    flow_shift: float = 1.0,
) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL (ModelPatcher) whose denoiser is the posterior mean of `items` [N, C, H, W]."""
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {sorted(PREDICTION_TYPES)}, got {prediction!r}")
    if items.ndim != 4 or items.shape[0] == 0:
        raise ValueError(f"items must be a non-empty [N, C, H, W] latent batch, got shape {tuple(items.shape)}")
    config = MemorizerConfig({"items": items})
    config.latent_format = plain_latent_format(items.shape[1])
    if prediction == "flow":
        config.sampling_settings = {"shift": flow_shift, "multiplier": 1000}
    model = comfy.model_base.BaseModel(
        config, model_type=PREDICTION_TYPES[prediction], device=torch.device("cpu"), unet_model=OptimalDenoiserNet
    )
    model.diffusion_model.attach(model.model_sampling)
    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def subset_conditioning(n_items: int, subset: Optional[Iterable[int]] = None) -> list:
    """ComfyUI CONDITIONING that restricts the memorizer to `subset` (None: the whole set)."""
    flags = torch.zeros(1, 1, n_items)
    if subset is not None:
        indices = list(subset)
        if any(not 0 <= index < n_items for index in indices):
            raise ValueError(f"subset indices must lie in [0, {n_items}), got {indices}")
        flags[0, 0, indices] = 1.0
    return [[flags, {}]]


def nearest_item_distance(samples: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distance from each sample to its nearest item, and that item's index."""
    distances = torch.cdist(samples.flatten(1).double(), items.flatten(1).double())
    nearest, index = distances.min(dim=1)
    return nearest, index


def minimum_item_spacing(items: torch.Tensor) -> float:
    distances = torch.cdist(items.flatten(1).double(), items.flatten(1).double())
    distances.fill_diagonal_(float("inf"))
    return float(distances.min())
