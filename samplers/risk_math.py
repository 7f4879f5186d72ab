"""Memorization risk math (plain torch, nothing from ComfyUI).

Paper: Wen et al., "Detecting, Explaining, and Mitigating Memorization in Diffusion Models" (ICLR 2024),
§3: a prompt is scored by the magnitude of the text-conditional noise prediction,

    d = (1/N) Σ_{t ≤ N} ‖ε_θ(x_t, c) − ε_θ(x_t, ∅)‖₂        over the first N sampling steps,

which is large for memorized prompts from the very first step. With ComfyUI's denoised predictions D
and ε = (x − D)/σ (the parameterization the Transition-Point CFG docs settle on for every model type:
EPS noise, V-prediction and flow velocity) one step's magnitude is ‖D_c − D_u‖₂/σ, i.e. √d_t of
Transition-Point CFG (transition_math.guidance_distance). The norm is over the whole sample, as in the
paper: its scale grows with √(latent size), so a threshold belongs to one model and one resolution.

Two scores from the per-step magnitudes d_1..d_N of one probe (`sample_score`):

- "magnitude" (Wen et al. §3, the specified score): their mean (1/N) Σ d_i.
- "drop": d_1 / d_N, how far the guidance magnitude falls over the first N steps. Transition-point CFG
  (§4–5, Fig. 2–3) finds that on a memorized trajectory the conditional guidance falls steeply once the
  trajectory is inside the attraction basin of a training image, where the conditional and unconditional
  predictions agree on that image. It matters when the unconditional model knows the memorized image
  too (duplicated training items are part of its data): then the first step's magnitude measures how far
  the prompt's mean image lies from the unconditional mean, not memorization, while the drop sees the
  trajectory settling into the image. A ratio has no scale: it does not grow with the latent size.
  Needs N ≥ 2; measured on the demo model in docs/risk.md.

A prompt's score from n generations (`prompt_score`): Wen et al. (§4, detection experiments) score a
prompt from n = 1, 4 or 32 generations, the per-generation score averaged over them. In ComfyUI one
prompt's batch of n is n generations: the mean of the per-sample scores of the batch.

Which samples a threshold flags (`flags`, the node's `flag` input): "per sample", each sample by its own
score; or "per prompt (batch mean)", the whole batch by its prompt score from all of its samples (Wen et
al.'s detector: the batch is n generations of one prompt), so every sample gets the same flag and the
threshold is a per-prompt threshold, calibrated for one batch size.

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


SCORES = ("magnitude", "drop")


def sample_score(step_scores: torch.Tensor, kind: str) -> torch.Tensor:
    """The score per sample from the per-step magnitudes [N, B] (module doc): "magnitude" or "drop"."""
    step_scores = step_scores.to(torch.float64)
    if kind == "magnitude":
        return step_scores.mean(dim=0)
    if kind == "drop":
        if step_scores.shape[0] < 2:
            raise ValueError("the 'drop' score compares the first probe step with the last: it needs probe_steps >= 2")
        return step_scores[0] / step_scores[-1].clamp_min(torch.finfo(torch.float64).tiny)
    raise ValueError(f"unknown risk score {kind!r}; expected one of {SCORES}")


def prompt_score(sample_scores: torch.Tensor, generations: int) -> float:
    """A prompt's score from its first `generations` samples' scores [B] (module doc): their mean.

    The first n samples of a ComfyUI batch are exactly the batch of n with the same seed (prepare_noise draws
    the batch's noise in one sequence), so one probed batch gives the score for every n up to its size.
    """
    if not 1 <= generations <= sample_scores.shape[0]:
        raise ValueError(f"a prompt score over {generations} generations needs 1..{sample_scores.shape[0]} samples")
    return float(sample_scores[:generations].to(torch.float64).mean())


FLAG_RULES = ("per sample", "per prompt (batch mean)")


def flags(sample_scores: tuple[float, ...], threshold: float, rule: str) -> tuple[bool, ...]:
    """Per sample: flagged or not under the flag rule (module doc); score >= threshold as in core/metrics.py."""
    if rule == FLAG_RULES[0]:
        return tuple(score >= threshold for score in sample_scores)
    if rule == FLAG_RULES[1]:
        at_risk = prompt_score(torch.tensor(sample_scores, dtype=torch.float64), len(sample_scores)) >= threshold
        return (at_risk,) * len(sample_scores)
    raise ValueError(f"unknown flag rule {rule!r}; expected one of {FLAG_RULES}")
