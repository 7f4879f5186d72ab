"""Memorization risk math (plain torch, nothing from ComfyUI).

Paper: Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024),
§3: a prompt is scored by the magnitude of the text-conditional noise prediction,

    d = (1/N) Σ_{t ≤ N} ‖ε_θ(x_t, c) − ε_θ(x_t, ∅)‖₂        over the first N sampling steps,

which is large for memorized prompts from the very first step. With ComfyUI's denoised predictions D
and ε = (x − D)/σ (the parameterization the Transition-Point CFG docs settle on for every model type:
EPS noise, V-prediction and flow velocity) one step's magnitude is ‖D_c − D_u‖₂/σ, i.e. √d_t of
Transition-Point CFG (transition_math.guidance_distance). The norm is over the whole sample, as in the
paper: its scale grows with √(latent size), so a threshold belongs to one model and one resolution.

Below: the score of one step, and the detector statistics the bench and the tests use (AUC, the
threshold for a false-positive rate, the true-positive rate there).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .transition_math import guidance_distance


def step_magnitude(cond_denoised: torch.Tensor, uncond_denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """‖ε_c − ε_u‖₂ = ‖D_c − D_u‖₂/σ per sample, float64 [B] (Wen et al. §3, one step)."""
    sigma = sigma.detach().to("cpu", torch.float64).reshape(-1)
    return guidance_distance(cond_denoised, uncond_denoised).cpu().sqrt() / sigma


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative
    (ties count half). NaN when either class is empty."""
    scores_t = torch.as_tensor(list(scores), dtype=torch.float64)
    labels = torch.as_tensor(list(positive), dtype=torch.bool)
    pos, neg = scores_t[labels], scores_t[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    above = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return float(above.mean())


def threshold_at_fpr(negative_scores: Sequence[float], fpr: float) -> float:
    """The smallest threshold t at which at most a share `fpr` of the negatives score strictly above t."""
    values = sorted(float(v) for v in negative_scores)
    if not values:
        raise ValueError("threshold_at_fpr needs at least one negative score")
    allowed = int(fpr * len(values))  # negatives that may lie above the threshold
    return values[len(values) - 1 - allowed]


def rates_at(scores: Sequence[float], positive: Sequence[bool], threshold: float) -> tuple[float, float]:
    """(true-positive rate, false-positive rate) of the rule score > threshold."""
    flagged = [float(s) > threshold for s in scores]
    pos = [f for f, p in zip(flagged, positive, strict=True) if p]
    neg = [f for f, p in zip(flagged, positive, strict=True) if not p]
    tpr = sum(pos) / len(pos) if pos else float("nan")
    fpr = sum(neg) / len(neg) if neg else float("nan")
    return tpr, fpr
