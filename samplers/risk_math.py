"""Memorization risk math (plain torch, nothing from ComfyUI).

Paper: Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024),
§3: a prompt is scored by the magnitude of the text-conditional noise prediction,

    d = (1/N) Σ_{t ≤ N} ‖ε_θ(x_t, c) − ε_θ(x_t, ∅)‖₂        over the first N sampling steps,

which is large for memorized prompts from the very first step. With ComfyUI's denoised predictions D
and ε = (x − D)/σ (the parameterization the Transition-Point CFG docs settle on for every model type:
EPS noise, V-prediction and flow velocity) one step's magnitude is ‖D_c − D_u‖₂/σ, i.e. √d_t of
Transition-Point CFG (transition_math.guidance_distance). The norm is over the whole sample, as in the
paper: its scale grows with √(latent size), so a threshold belongs to one model and one resolution.

The detector statistics (AUC, the threshold for a false-positive rate, the rates there) are the pack's
one implementation in core/metrics.py (roc_auc, threshold_at_fpr, rate_at_threshold; flagged = score >=
threshold), shared with the copy detector.
"""

from __future__ import annotations

import torch

from .transition_math import guidance_distance


def step_magnitude(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """‖ε_c − ε_u‖₂ = ‖D_c − D_u‖₂/σ per sample, float64 [B] (Wen et al. §3, one step)."""
    sigma = sigma.detach().to("cpu", torch.float64).reshape(-1)
    return guidance_distance(cond_denoised, uncond_denoised).cpu().sqrt() / sigma
