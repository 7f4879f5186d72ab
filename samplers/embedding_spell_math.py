"""Sparse repellency with distances in an embedding space, as plain torch functions (no ComfyUI import).

SPELL (arXiv 2410.06025) repels the denoised prediction x̂0 from shields by L2 in the diffusion model's
latent space, where a copy with a colour shift or pixel noise already lies outside the ball. The paper
leaves "shields in semantic spaces, e.g. comparing the DINOv2 embeddings of expected image outputs" as
future work (§5 "Limitations and future work", §6 "Conclusion"). This module is that variant:

- e = f(decode(x̂0)) and the shields z_k = f(shield image), both unit length (`unit_embeddings`): copy
  detectors, DreamSim and CLIP compare by cosine. On the unit sphere the distance is the angle
  θ_k = arccos(e·z_k), and a sample is inside shield k when θ_k < θ_r = arccos(similarity): the radius is
  given as a cosine similarity, the language of a copy detector's threshold.
- Δ is SPELL's Eq. 5 written on the sphere: the difference x̂0 − z_k becomes the log map at e, θ_k·u_k
  (u_k the unit tangent at e pointing away from z_k), so Δ = Σ_k ReLU(θ_r − θ_k)·u_k; intra-batch adds the
  other samples (Eq. 8). The target is the exponential map t = exp_e(λΔ) (§4.5 overcompensation λ): with
  one shield it lies at angle θ + λ(θ_r − θ) ≥ θ_r from it, as SPELL's x̂0 + λΔ does in L2 (appendix B).
- x̂0 then moves so that its embedding reaches t, through the gradient of f∘decode as ProCreate's energy
  (§4 there): along −∇_x̂0 ½‖f(x̂0) − t‖² (= Jᵀ(t − e), J the Jacobian of f∘decode), with the step length
  that minimises the linearised residual (a Cauchy step: α = ‖g‖² / ‖J g‖², J g by a forward
  difference), repeated a few times (`move_to_targets`) because f is not linear.

Only samples that have a shield (or, intra-batch, another sample) within θ_r are moved; when none has,
nothing is differentiated and the caller returns x̂0 itself (bit-identical to plain sampling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

FORWARD_DIFFERENCE = 1e-2  # the forward-difference step, relative to the sample's RMS entry size


# -- radius ----------------------------------------------------------------------------------------
def angular_radius(similarity: float) -> float:
    """θ_r = arccos(similarity): the ball {e: cos(e, z) > similarity} on the unit sphere."""
    if not -1.0 <= similarity <= 1.0:
        raise ValueError(f"a cosine similarity lies in [-1, 1], got {similarity}")
    return math.acos(similarity)


def unit_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """[B, D] -> unit-length rows (float32)."""
    return torch.nn.functional.normalize(embeddings.flatten(1).float(), dim=1, eps=1e-8)


# -- who is inside which ball, and SPELL's Δ on the sphere ----------------------------------------------
@dataclasses.dataclass
class Inside:
    """Which samples are inside a ball, and SPELL's Δ (a tangent vector at e) for them; zero rows otherwise."""

    delta: torch.Tensor  # [B, D] float64
    shield_hits: list[int]
    batch_hits: list[int]
    nearest_similarity: list[float]  # cosine to the nearest shield per sample (-1 without shields)

    @property
    def inside(self) -> torch.Tensor:
        """bool [B]: the sample has a shield or another sample within θ_r."""
        return torch.tensor([s + b > 0 for s, b in zip(self.shield_hits, self.batch_hits, strict=True)])


def away_from(e: torch.Tensor, z: torch.Tensor, cosine: torch.Tensor) -> torch.Tensor:
    """Unit tangents at e [P, D] pointing away from z [P, D] along the great circle: (cos θ·e − z)/sin θ.

    An exact copy (θ = 0, which a memorizing model does produce) has no direction of its own; it is pushed
    along the first axis not parallel to e (SPELL's Eq. 5 limit is a push of full length, any direction).
    """
    tangent = cosine[:, None] * e - z
    norms = tangent.norm(dim=1, keepdim=True)
    fallback = torch.zeros_like(e)
    fallback[:, 0] = 1.0
    fallback[e[:, 0].abs() > 0.9, 1] = 1.0
    fallback = fallback - (fallback * e).sum(dim=1, keepdim=True) * e
    fallback = fallback / fallback.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.where(norms > 1e-9, tangent / norms.clamp_min(1e-30), fallback)


def repellency(
    e: torch.Tensor, points: torch.Tensor, cosine: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ per row of e [B, D] (Eq. 5 on the sphere): Σ over points with θ < θ_r of (θ_r − θ)·u, and the
    number of such points per row.

    cosine [B, K]: e·points, with −inf where a pair must not count (a sample and itself)."""
    query, other = torch.nonzero(cosine > math.cos(radius), as_tuple=True)
    delta = torch.zeros_like(e)
    if query.numel():
        pair_cosine = cosine[query, other].clamp(-1.0, 1.0)
        weight = radius - torch.acos(pair_cosine)
        push = away_from(e[query], points[other], pair_cosine) * weight[:, None]
        delta.index_add_(0, query, push)
    return delta, torch.bincount(query.cpu(), minlength=e.shape[0])


def inside_balls(embeddings: torch.Tensor, shields: torch.Tensor, radius: float, intra_batch: bool) -> Inside:
    """SPELL's Δ on the unit sphere (Eq. 5; Eq. 8 with `intra_batch`) for unit embeddings [B, D], θ_r `radius`."""
    e = embeddings.double()
    batch = e.shape[0]
    z = shields.to(e.device).double()
    cosine = e @ z.T if z.shape[0] else e.new_zeros(batch, 0)
    delta, shield_hits = repellency(e, z, cosine, radius)
    batch_hits = torch.zeros(batch, dtype=torch.long)
    if intra_batch and batch > 1:
        pairwise = e @ e.T
        pairwise.fill_diagonal_(float("-inf"))
        batch_delta, batch_hits = repellency(e, e, pairwise, radius)
        delta = delta + batch_delta
    nearest = cosine.max(dim=1).values.tolist() if z.shape[0] else [-1.0] * batch
    return Inside(delta, shield_hits.tolist(), batch_hits.tolist(), nearest)


def exp_map(e: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """The point at arc length ‖v‖ from e along the tangent v [B, D]: cos‖v‖·e + sin‖v‖·v/‖v‖ (v = 0: e)."""
    e, tangent = e.double(), tangent.double()
    length = tangent.norm(dim=1, keepdim=True)
    direction = tangent / length.clamp_min(1e-30)
    return torch.where(length > 0, torch.cos(length) * e + torch.sin(length) * direction, e)


# -- moving x̂0 so that its embedding reaches the target ------------------------------------------------
def cauchy_step(
    x0: torch.Tensor, gradient: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor
) -> torch.Tensor:
    """α per sample [B] minimising ‖r − α J g‖ along −g, with g = Jᵀr: α = ‖g‖² / ‖J g‖².

    J g is taken by a forward difference of `embed` (no second backward pass): (embed(x0 + h ĝ) − base)/h·‖g‖.
    """
    batch = x0.shape[0]
    norms = gradient.flatten(1).norm(dim=1)
    direction = gradient / norms.clamp_min(1e-30).reshape(-1, *[1] * (x0.ndim - 1))
    scale = x0.flatten(1).norm(dim=1) / math.sqrt(x0[0].numel())
    h = (FORWARD_DIFFERENCE * scale.clamp_min(1e-3)).reshape(-1, *[1] * (x0.ndim - 1))
    with torch.no_grad():
        moved = embed(x0 + h * direction)
    jg = (moved - base) / h.reshape(batch, 1) * norms.reshape(batch, 1)
    return norms.pow(2) / jg.pow(2).sum(dim=1).clamp_min(1e-30)


def correction_step(
    x0: torch.Tensor, target: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor], moving: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gauss-Newton-free step of x̂0 towards embed(x̂0) = target, for the rows in `moving` (bool [B]).

    Returns (the new x̂0, its embedding). Rows not moving are returned unchanged (the same values).
    """
    with torch.enable_grad():
        variable = x0.detach().requires_grad_(True)
        embedded = embed(variable)
        residual = embedded - target.to(embedded)
        loss = 0.5 * (residual.pow(2).sum(dim=1) * moving.to(embedded)).sum()
        (gradient,) = torch.autograd.grad(loss, variable)
    base = embedded.detach()
    alpha = cauchy_step(x0, gradient, embed, base)
    mask = moving.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.device)
    stepped = torch.where(mask, x0 - alpha.reshape(-1, *[1] * (x0.ndim - 1)) * gradient, x0)
    with torch.no_grad():
        return stepped, embed(stepped)


def move_to_targets(
    x0: torch.Tensor,
    targets: torch.Tensor,
    embed: Callable[[torch.Tensor], torch.Tensor],
    moving: torch.Tensor,
    iterations: int,
    done: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    check_interrupt: Optional[Callable[[], None]] = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Up to `iterations` correction steps for the `moving` rows; a row stops once `done(embedding)` holds.

    Returns (x̂0, its embedding, the number of steps taken).
    """
    moving = moving.clone()
    current, embedded, taken = x0, None, 0
    for _ in range(iterations):
        if check_interrupt is not None:
            check_interrupt()
        current, embedded = correction_step(current, targets, embed, moving)
        taken += 1
        if done is not None:
            moving = moving & ~done(embedded).to(moving.device)
        if not bool(moving.any()):
            break
    if embedded is None:
        with torch.no_grad():
            embedded = embed(current)
    return current, embedded, taken
