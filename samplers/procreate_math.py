"""ProCreate propulsive energy guidance as plain torch functions (no ComfyUI import).

Paper: Lu et al., "ProCreate, Don't Reproduce! Propulsive Energy Diffusion for Creative Generation"
(`papers/procreate.txt`), §3 equations 1–3, §4 equations 4–5 and the Multi-Step Look Ahead, checked
against the official code (`src/guided_inference.py` of procreate-diffusion-public).

The paper works in the DDPM/DDIM variance-preserving (VP) parameterization

    x_vp = √ᾱ · y + √(1−ᾱ) · n                         (y: clean latent, n: unit noise)
    x̂0  = (x_vp − √(1−ᾱ) ε) / √ᾱ                        (eq. 1)
    ε'   = ε + √(1−ᾱ) ∇_{x_vp} g,   g = γ max_i cos(f(x̂0), f(ref_i))   (eq. 4, 5)

(the paper prints √(1−ᾱ_{t−1}) in eq. 4; the official code uses ᾱ of the current step, as we do).

ComfyUI's samplers work on x = a·y + s·n with a "denoised" prediction D(x, σ) and derive the step
from (x, D): EPS and V-prediction models use a = 1, s = σ; flow (CONST) models use a = 1 − σ, s = σ.

Derivation of the update in that parameterization (`guided_denoised`)
-----------------------------------------------------------------------
Dividing x by √(a² + s²) gives the VP form, with

    x_vp = x / √(a²+s²),   √ᾱ = a / √(a²+s²),   √(1−ᾱ) = s / √(a²+s²),
    x = a·D + s·ε   (so D is exactly eq. 1's x̂0, and ε the same noise estimate).

Chain rule: ∇_{x_vp} g = √(a²+s²) · ∇_x g. Replacing ε by ε' in x = a·D + s·ε at fixed x gives

    D' = (x − s ε') / a = D − (s/a) · √(1−ᾱ) · G = D − (s² / (a·√(a²+s²))) · G,

with G = ∇_{x_vp} g after clipping (the official code clips the gradient in the VP variable:
per-element clamp to ±γ·element_clip, then its norm to γ·max_norm). Without clipping,
D' = D − (s²/a) ∇_x g, i.e. D' = D − σ² ∇_x g for EPS/V (x = y + σn) and
D' = D − σ²/(1−σ) ∇_x g for flow (x = (1−σ)y + σn).

Every ComfyUI sampler then takes its step from (x, D'); its noise estimate (x − a·D')/s is exactly
ε', so the deterministic DDIM step (ComfyUI's "ddim" = Euler in x/a) reproduces eq. 2 with ε'.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch


def cosine_to_references(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Cosine similarity [B, K] between sample embeddings [B, D] and reference embeddings [K, D]."""
    sample_unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    reference_unit = torch.nn.functional.normalize(references.float().to(embeddings.device), dim=-1)
    return sample_unit @ reference_unit.T


def _candidates(embeddings: torch.Tensor, references: torch.Tensor, batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The vectors each sample is repelled from and its cosine to each [B, K(+B)].

    With `batch`, the other samples' embeddings (detached: each sample moves only itself) join the
    references, as the paper's growing reference set would hold them once generated (§4); a sample's
    own column is masked out.
    """
    candidates = references.float().to(embeddings.device)
    if batch and embeddings.shape[0] > 1:
        candidates = torch.cat([candidates, embeddings.detach().float()])
    similarity = (
        cosine_to_references(embeddings, candidates)
        if candidates.shape[0]
        else embeddings.new_zeros(embeddings.shape[0], 0)
    )
    if batch and embeddings.shape[0] > 1:
        own = torch.arange(embeddings.shape[0], device=embeddings.device)
        similarity = similarity.clone()
        similarity[own, references.shape[0] + own] = float("-inf")
    return candidates, similarity


def nearest_reference(
    embeddings: torch.Tensor, references: torch.Tensor, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest cosine similarity of each sample to the references, and that reference's index (eq. 5's max).

    With `batch`, the other samples of the batch count as references too: an index ≥ K is sample index − K.
    Without any candidate the similarity is −1 (nothing to repel from).
    """
    _, similarity = _candidates(embeddings.detach(), references, batch)
    if similarity.shape[1] == 0:
        return torch.full((embeddings.shape[0],), -1.0, device=embeddings.device), torch.zeros(
            embeddings.shape[0], dtype=torch.long, device=embeddings.device
        )
    best, index = similarity.max(dim=1)
    return best, index


def energy(
    embeddings: torch.Tensor, references: torch.Tensor, gamma: float, batch: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = γ·max_i cos(f(x̂0), f(ref_i)) per sample (eq. 5), differentiable w.r.t. `embeddings`.

    The nearest reference is picked without gradient, as the official code does; the gradient of the
    max is the gradient at the arg-max anyway. With `batch`, the other samples (detached) are candidates
    too. Returns (g [B], nearest index [B]).
    """
    candidates, _ = _candidates(embeddings, references, batch)
    _, index = nearest_reference(embeddings, references, batch)
    chosen = candidates[index]
    g = gamma * torch.nn.functional.cosine_similarity(embeddings.float(), chosen, dim=-1)
    return g, index


def nearest_reference_over_frames(
    embeddings: torch.Tensor, references: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Video: per clip, the highest cosine of any of its frames to any reference, and that reference.

    embeddings [B, T, D] (T frames per clip) -> (similarity [B], reference index [B]). With T = 1 this
    is `nearest_reference` of the images."""
    clips, frames = embeddings.shape[:2]
    similarity, index = nearest_reference(embeddings.flatten(0, 1), references)
    best, frame = similarity.reshape(clips, frames).max(dim=1)
    return best, index.reshape(clips, frames).gather(1, frame[:, None]).squeeze(1)


def energy_over_frames(embeddings: torch.Tensor, references: torch.Tensor, gamma: float) -> torch.Tensor:
    """Video: eq. 5 per clip on its most similar frame, g = γ·max_t max_i cos(f(frame_t), f(ref_i)) [B],
    differentiable w.r.t. `embeddings` [B, T, D] (the max's gradient is that frame's, as eq. 5's max)."""
    clips, frames = embeddings.shape[:2]
    g, _ = energy(embeddings.flatten(0, 1), references, gamma)
    return g.reshape(clips, frames).max(dim=1).values


def clip_gradient(grad_vp: torch.Tensor, gamma: float, element_clip: float, max_norm: float) -> torch.Tensor:
    """The official code's clipping, per sample: clamp each element to ±γ·element_clip, then scale the
    sample's gradient so its L2 norm is at most γ·max_norm. A value of 0 turns that clip off."""
    grad = grad_vp
    if element_clip > 0:
        bound = gamma * element_clip
        grad = grad.clamp(-bound, bound)
    if max_norm > 0:
        limit = gamma * max_norm
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-30)
        factor = torch.where(norms > limit, limit / norms, torch.ones_like(norms))
        grad = grad * factor.reshape(-1, *([1] * (grad.ndim - 1)))
    return grad


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device).reshape(-1)
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def to_vp_gradient(grad_x: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """∇_{x_vp} g = √(a²+s²)·∇_x g (x_vp = x/√(a²+s²))."""
    a, s = _per_sample(signal, grad_x), _per_sample(noise, grad_x)
    return grad_x * torch.sqrt(a * a + s * s)


def guided_denoised(
    denoised: torch.Tensor, grad_vp: torch.Tensor, signal: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """D' = D − s²/(a·√(a²+s²))·G: eq. 4 (ε' = ε + √(1−ᾱ)·G) in ComfyUI's (x, D) form (module docstring)."""
    a, s = _per_sample(signal, denoised), _per_sample(noise, denoised)
    return denoised - (s * s / (a * torch.sqrt(a * a + s * s))) * grad_vp.to(denoised.dtype)


def ddim_step(
    x: torch.Tensor,
    denoised: torch.Tensor,
    signal_from: torch.Tensor,
    noise_from: torch.Tensor,
    signal_to: torch.Tensor,
    noise_to: torch.Tensor,
) -> torch.Tensor:
    """Deterministic DDIM (eq. 2) from x = a·y + s·n to the next noise level, keeping the noise estimate."""
    a0, s0 = _per_sample(signal_from, x), _per_sample(noise_from, x)
    a1, s1 = _per_sample(signal_to, x), _per_sample(noise_to, x)
    noise_estimate = (x - a0 * denoised) / s0
    return a1 * denoised + s1 * noise_estimate


def sigma_to_percent(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 60) -> float:
    """The schedule percent p (0 = start, 1 = end) with percent_to_sigma(p) = sigma, by bisection: the
    model sampling's percent_to_sigma decreases in p, and it is the only map every ComfyUI sampling
    (discrete, shifted flow, continuous EDM) defines consistently (`timestep` does not invert `sigma`
    for shifted flow, and EDM's timestep grows with sigma)."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if percent_to_sigma(middle) > sigma:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def look_ahead_percents(percent: float, steps: int) -> list[float]:
    """The §4 Multi-Step Look Ahead schedule in percent: `steps` levels evenly spaced from `percent`
    towards the end of the schedule (1, σ = 0), level k at p + (1 − p)·k/steps.

    For a discrete (DDPM) schedule, percent p is timestep (1 − p)·999, so this is the paper's
    t·(1 − k/steps) on timesteps. The official code rounds to integer timesteps and lands on timestep 0
    (σ_min ≈ 0.03 for SD1.5): a negligible difference we do not reproduce.
    """
    if steps < 1:
        raise ValueError(f"look-ahead needs at least 1 step, got {steps}")
    return [percent + (1.0 - percent) * k / steps for k in range(steps)]


def look_ahead_sigmas(
    sigma: torch.Tensor, steps: int, percent_to_sigma: Callable[[float], float]
) -> list[torch.Tensor]:
    """Per level of the look-ahead (`look_ahead_percents`), sigma per sample [B]; level 0 is `sigma`."""
    per_sample = []
    for value in sigma.reshape(-1).tolist():
        percents = look_ahead_percents(sigma_to_percent(value, percent_to_sigma), steps)
        per_sample.append([value] + [float(percent_to_sigma(p)) for p in percents[1:]])
    levels = torch.tensor(per_sample, dtype=sigma.dtype, device=sigma.device).T
    return list(levels.reshape(steps, *sigma.shape))


def look_ahead(
    x: torch.Tensor,
    sigma: torch.Tensor,
    steps: int,
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    percent_to_sigma: Callable[[float], float],
    scales: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    first_denoised: Optional[torch.Tensor] = None,
    check_interrupt: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """x̂0 by `steps` DDIM steps from (x, σ) to σ = 0 with the model's own denoiser (§4 MSLA).

    Differentiable when `denoise` is. steps = 0 is the one-step x̂0 = D(x, σ) (eq. 1).
    `scales(σ)` returns (a, s) of x = a·y + s·n; `first_denoised` reuses D(x, σ) if already computed.
    """
    current = first_denoised if first_denoised is not None else denoise(x, sigma)
    if steps <= 1:
        return current
    sigmas = look_ahead_sigmas(sigma, steps, percent_to_sigma)
    for k in range(1, steps):
        if check_interrupt is not None:
            check_interrupt()
        a_from, s_from = scales(sigmas[k - 1])
        a_to, s_to = scales(sigmas[k])
        x = ddim_step(x, current, a_from, s_from, a_to, s_to)
        current = denoise(x, sigmas[k])
    # the last DDIM step lands on σ = 0, where x = a(0)·D = D
    return current
