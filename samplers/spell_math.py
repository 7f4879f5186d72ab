"""SPELL sparse repellency as plain torch functions (no ComfyUI import).

Paper: "Shielded Diffusion: Generating Novel and Diverse Images using Sparse Repellency" (ICML 2025,
arXiv 2410.06025). Notation: x̂0 the denoised prediction of one sample, z_k the shields, r the radius.

- `repellency` is Eq. 5 / Algorithm 1 (appendix D): Δ = Σ_k ReLU(r/‖x̂0 − z_k‖ − 1)(x̂0 − z_k), over
  the shields within r and, for intra-batch repellency (Eq. 8), the other samples' x̂0.
- `apply_repellency` returns x̂0 + λΔ (overcompensation λ, §4.5; the paper uses 1.6).
- Only shields within r contribute, so Δ needs a range search (appendix I): `range_search` (exact and
  projection scans) and `shield_index` (the clustered index, and `build_range_search`).
- Radius units (docs/spell.md): a relative radius r_rel is r = r_rel·√D for D latent entries, so one
  value transfers across resolutions; `median_pairwise_distance` is the paper's calibration
  (appendix D: radii tried between 0 and 2× the median pairwise distance of a plain batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .range_search import Neighbours


# -- radius --------------------------------------------------------------------------------------
def absolute_radius(radius: float, latent_numel: int, relative: bool) -> float:
    """The L2 radius in latent units: r = r_rel·√D when `relative`, else `radius` itself."""
    return float(radius) * math.sqrt(latent_numel) if relative else float(radius)


def median_pairwise_distance(latents: torch.Tensor) -> float:
    """Median L2 distance between the items of a batch [B, ...] (B ≥ 2): the paper's radius scale."""
    flat = latents.flatten(1).double()
    if flat.shape[0] < 2:
        raise ValueError("the median pairwise distance needs a batch of at least 2 latents")
    distances = torch.cdist(flat, flat)
    upper = torch.triu_indices(flat.shape[0], flat.shape[0], offset=1)
    return float(distances[upper[0], upper[1]].median())


# -- the update (Eq. 5, Algorithm 1) --------------------------------------------------------------
def repellency(
    x0: torch.Tensor,
    points: torch.Tensor,
    neighbours: Neighbours,
    radius: float,
    fallback_direction: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Δ per query row (Eq. 5): Σ over in-radius pairs of ReLU(r/‖x̂0 − z‖ − 1)(x̂0 − z).

    x0: [B, D]; points: [K, D] the shields; neighbours from a range search of x0 against points.
    An exact copy (‖x̂0 − z‖ = 0, which a memorizing model does produce) has no direction of its own;
    Eq. 5's limit is a push of length r, taken along `fallback_direction` [B, D] (the hook passes the
    current noise direction x_t − x̂0), or along the first axis if that is zero too.
    """
    delta = torch.zeros_like(x0, dtype=torch.float64)
    if len(neighbours) == 0:
        return delta.to(x0.dtype)
    diff = x0[neighbours.query].double() - points[neighbours.shield].to(x0.device).double()
    distance = diff.norm(dim=1)
    copies = distance <= radius * 1e-12
    if bool(copies.any()):
        diff[copies] = (
            _unit_directions(fallback_direction, neighbours.query[copies], x0.shape[1]).to(diff) * radius * 1e-6
        )
        distance = diff.norm(dim=1)
    weight = torch.relu(radius / distance - 1.0)
    delta.index_add_(0, neighbours.query.to(x0.device), diff * weight[:, None])
    return delta.to(x0.dtype)


def _unit_directions(fallback: Optional[torch.Tensor], rows: torch.Tensor, dim: int) -> torch.Tensor:
    first_axis = torch.zeros(rows.numel(), dim, dtype=torch.float64)
    first_axis[:, 0] = 1.0
    if fallback is None:
        return first_axis
    chosen = fallback[rows.to(fallback.device)].double().cpu()
    norms = chosen.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, chosen / norms.clamp_min(1e-300), first_axis)


def intra_batch_neighbours(x0: torch.Tensor, radius: float) -> Neighbours:
    """Pairs (b, b') with b ≠ b' and ‖x̂0_b − x̂0_b'‖ < r (Eq. 8: the batch's own predictions as shields)."""
    flat = x0.double()
    distance = torch.cdist(flat, flat)
    distance.fill_diagonal_(float("inf"))
    query, other = torch.nonzero(distance < radius, as_tuple=True)
    return Neighbours(query.cpu(), other.cpu(), distance[query, other].cpu())


def apply_repellency(x0: torch.Tensor, delta: torch.Tensor, overcompensation: float) -> torch.Tensor:
    """x̂0 + λΔ (§4.5). With λ = 1 and one active shield the result lies exactly on the sphere of radius r
    (appendix B); λ > 1 overshoots to r + (λ − 1)(r − ‖x̂0 − z‖)."""
    return x0 + overcompensation * delta


# -- one step --------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    denoised: torch.Tensor
    shield_hits: list[int]  # in-radius shields per sample
    batch_hits: list[int]  # in-radius other samples per sample (intra-batch)
    delta_norm: list[float]  # ‖λΔ‖ per sample

    @property
    def touched(self) -> list[int]:
        return [b for b, norm in enumerate(self.delta_norm) if norm > 0]


def sparse_repellency_step(
    x0: torch.Tensor,
    searches: list,
    radius: float,
    overcompensation: float,
    intra_batch: bool,
    fallback_direction: Optional[torch.Tensor] = None,
) -> StepResult:
    """x̂0 + λΔ for a batch x0 [B, ...], Δ from every search's shields and (optionally) the batch itself.

    Returns x0 itself (the same tensor) when nothing is within r, so an inactive patch changes no bit.
    fallback_direction [B, ...]: where to push exact copies (see `repellency`).
    """
    batch = x0.shape[0]
    flat = x0.reshape(batch, -1)
    fallback = None if fallback_direction is None else fallback_direction.reshape(batch, -1)
    delta = torch.zeros(flat.shape, dtype=torch.float64, device=x0.device)
    shield_hits = torch.zeros(batch, dtype=torch.long)
    for search in searches:
        found = search.search(flat, radius)
        if len(found):
            delta += repellency(flat, search.shields, found, radius, fallback).double()
            shield_hits += torch.bincount(found.query, minlength=batch)
    batch_hits = torch.zeros(batch, dtype=torch.long)
    if intra_batch and batch > 1:
        found = intra_batch_neighbours(flat, radius)
        if len(found):
            delta += repellency(flat, flat, found, radius, fallback).double()
            batch_hits += torch.bincount(found.query, minlength=batch)
    delta_norm = (overcompensation * delta.norm(dim=1)).tolist()
    if not any(norm > 0 for norm in delta_norm):
        return StepResult(x0, shield_hits.tolist(), batch_hits.tolist(), delta_norm)
    moved = apply_repellency(flat.double(), delta, overcompensation).to(x0.dtype).reshape(x0.shape)
    return StepResult(moved, shield_hits.tolist(), batch_hits.tolist(), delta_norm)


def relative_magnitude(delta_norm: list[float], x: torch.Tensor, x0: torch.Tensor) -> list[float]:
    """‖λΔ‖ / ‖x − x̂0‖ per sample: the correction against the denoising step (§4.5, Fig. 5a)."""
    step = (x - x0).flatten(1).double().norm(dim=1).clamp_min(1e-12).tolist()
    return [d / s for d, s in zip(delta_norm, step, strict=True)]
