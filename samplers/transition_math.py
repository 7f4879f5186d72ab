"""Transition-point CFG math (plain torch, nothing from ComfyUI).

Paper: "Classifier-free guidance inside the attraction basin may cause memorization"
(`papers/transition-point-cfg.txt`): §4 (the transition point), §5 (static and dynamic transition
points), §5.1 (opposite guidance, Eq. 5) and Algorithm 1.

Guidance is written as in Eq. 4 / Algorithm 1 line 9:  ε̂ = ε_u + s·(ε_c − ε_u).

"No guidance" is ambiguous. The official scripts disagree on whether it means s = 0 (the
unconditional prediction alone: the paper's Algorithm 1 with υ_OG = 0, "zero CFG") or s = 1 (the
conditional prediction alone: what a diffusers `guidance_scale=1` does). Both are offered, named by
the branch that is used, never by a number:

    "unconditional" → s = 0    ε̂ = ε_u
    "conditional"   → s = 1    ε̂ = ε_c
    "opposite"      → s = −λ   ε̂ = ε_u − λ(ε_c − ε_u)   (Eq. 5, Algorithm 1 with υ_OG = 1)

After the transition the sampler's own CFG scale applies: ε̂ = ε_u + cfg·(ε_c − ε_u).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

UNCONDITIONAL = "unconditional"
CONDITIONAL = "conditional"
OPPOSITE = "opposite"
BEFORE_GUIDANCE_CHOICES = (UNCONDITIONAL, CONDITIONAL, OPPOSITE)


def before_guidance_scale(before_guidance: str, opposite_scale: float) -> float:
    """The scale s used before the transition (Algorithm 1 line 3: s = −λ·υ_OG; or s = 1)."""
    if before_guidance == UNCONDITIONAL:
        return 0.0
    if before_guidance == CONDITIONAL:
        return 1.0
    if before_guidance == OPPOSITE:
        if not opposite_scale > 0:
            raise ValueError(f"opposite guidance needs λ > 0 (Eq. 5), got {opposite_scale}")
        return -float(opposite_scale)
    raise ValueError(f"before_guidance must be one of {BEFORE_GUIDANCE_CHOICES}, got {before_guidance!r}")


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale) -> torch.Tensor:
    """ε̂ = ε_u + s·(ε_c − ε_u) (Eq. 4, Eq. 5 with s → −λ). `scale` is a float or a per-sample [B]."""
    if isinstance(scale, torch.Tensor):
        scale = per_sample(scale.to(cond.dtype), cond)
    return uncond + scale * (cond - uncond)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a [B] tensor to broadcast against a [B, ...] tensor."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def guidance_distance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d_t = ‖ε_c − ε_u‖²₂ for each sample of the batch (Algorithm 1 line 5), in float64: [B]."""
    difference = (eps_cond.double() - eps_uncond.double()).flatten(1)
    return (difference * difference).sum(dim=1)


def first_local_minimum_step(distances: Sequence[float]) -> Optional[int]:
    """Algorithm 1 on a whole d_t sequence: the step index at which guidance switches to CFG.

    Lines 2 and 6 literally: d_{T+2} = d_{T+1} = −∞, and at step t the switch happens when
    d_{t+2} > d_{t+1} < d_t with strict inequalities. So the minimum is at the previous step and
    the current step (the one returned) is already guided; the earliest possible switch is index 2;
    a flat minimum (a tie) never switches; a curve without a strict minimum never switches (None).
    """
    before_previous, previous = -math.inf, -math.inf
    for step, current in enumerate(distances):
        if before_previous > previous and previous < current:
            return step
        before_previous, previous = previous, current
    return None


class TransitionDetector:
    """Algorithm 1, per sample and step by step (the batched form of `first_local_minimum_step`).

    `observe(d, counts)` takes this step's d_t [B] and a mask of the samples for which the step
    counts as a new t (the others keep their history); it returns which samples are switched.
    Once switched, a sample stays switched (s = λ is never reset in Algorithm 1).
    """

    def __init__(self, batch_size: int):
        self.before_previous = torch.full((batch_size,), -math.inf, dtype=torch.float64)
        self.previous = torch.full((batch_size,), -math.inf, dtype=torch.float64)
        self.switched = torch.zeros(batch_size, dtype=torch.bool)

    def observe(self, distances: torch.Tensor, counts: Optional[torch.Tensor] = None) -> torch.Tensor:
        distances = distances.detach().to("cpu", torch.float64)
        counts = torch.ones_like(self.switched) if counts is None else counts.to("cpu", torch.bool)
        at_minimum = (self.before_previous > self.previous) & (self.previous < distances)
        self.switched |= at_minimum & counts
        self.before_previous = torch.where(counts, self.previous, self.before_previous)
        self.previous = torch.where(counts, distances, self.previous)
        return self.switched.clone()


def reached_sigma(sigma: torch.Tensor, threshold: float) -> torch.Tensor:
    """A static point or cap in sigma (§5 "static transition point"): reached once σ ≤ threshold.

    With ComfyUI's percent convention, 0 % is a huge sigma (reached at once) and 100 % is σ = 0
    (never reached by a model evaluation), so static 0 % is plain CFG and 100 % never switches.
    """
    return sigma.detach().to("cpu", torch.float64) <= threshold


def replacement_cond(
    cond: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor, cfg_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (cond, uncond) such that the sampler's own CFG yields ε_u + g·(ε_c − ε_u) per sample.

    ComfyUI combines cond' and uncond' as uncond' + cfg·(cond' − uncond'). For every sample whose
    target scale g differs from cfg we set

        cond' = uncond + (g / cfg)·(cond − uncond),   uncond' = uncond,

    so uncond + cfg·(g / cfg)·(cond − uncond) = uncond + g·(cond − uncond) exactly in exact
    arithmetic (the real uncond is kept for any later hook). Samples with g == cfg are returned
    untouched (bit-identical). At cfg = 0 no cond' can do it, so both cond' and uncond' become the
    target itself (any affine CFG of two equal predictions returns that prediction).
    The same algebra holds in ε-, v- or denoised space because each is affine in the other.
    guidance: [B] float64 target scales.
    """
    guidance = guidance.to(cond.device)
    untouched = per_sample(guidance == cfg_scale, cond)
    if cfg_scale == 0:
        target = guided(uncond, cond, guidance)
        return torch.where(untouched, cond, target), torch.where(untouched, uncond, target)
    ratio = (guidance / cfg_scale).to(cond.dtype)
    return torch.where(untouched, cond, guided(uncond, cond, ratio)), uncond
