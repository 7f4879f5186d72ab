"""SPELL sparse repellency as plain torch functions (no ComfyUI import).

Paper: "Shielded Diffusion: Generating Novel and Diverse Images using Sparse Repellency" (ICML 2025,
arXiv 2410.06025). Notation: x̂0 the denoised prediction of one sample, z_k the shields, r the radius.

- `repellency` is Eq. 5 / Algorithm 1 (appendix D): Δ = Σ_k ReLU(r/‖x̂0 − z_k‖ − 1)(x̂0 − z_k), over
  the shields within r and, for intra-batch repellency (Eq. 8), the other samples' x̂0.
- `apply_repellency` returns x̂0 + λΔ (overcompensation λ, §4.5; the paper uses 1.6).
- Only shields within r contribute, so Δ needs a range search (appendix I). `ExactRangeSearch`
  scans the set in memory-bounded chunks; `ProjectionRangeSearch` scans a compact projection whose
  distance is a proven lower bound of the true distance, then re-checks the few candidates exactly,
  so it cannot miss an in-radius shield (`projection_lower_bound` states the bound).
- Radius units (docs/spell.md): a relative radius r_rel is r = r_rel·√D for D latent entries, so one
  value transfers across resolutions; `median_pairwise_distance` is the paper's calibration
  (appendix D: radii tried between 0 and 2× the median pairwise distance of a plain batch).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

# Candidates pass the cheap filter with this relative slack on r², then are re-checked exactly in
# float64; the slack covers float32 rounding of ‖a‖² − 2a·b + ‖b‖² (error ~1e-6 of the norms²).
FILTER_SLACK = 1e-4
EXACT_CHUNK_BYTES = 64 * 2**20
AUTO_PROJECTION_MIN_SHIELDS = 4096  # bench: at 10k x 4096 the filter is ~100x faster than a scan
SEARCH_METHODS = ("auto", "exact", "clustered", "projection", "faiss")


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
@dataclasses.dataclass
class Neighbours:
    """In-radius pairs: query row `query[i]` is at exact distance `distance[i]` < r of shield `shield[i]`."""

    query: torch.Tensor  # long [P]
    shield: torch.Tensor  # long [P]
    distance: torch.Tensor  # float64 [P]

    @staticmethod
    def empty() -> "Neighbours":
        return Neighbours(
            torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.float64)
        )

    def __len__(self) -> int:
        return int(self.query.numel())


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


# -- range search ---------------------------------------------------------------------------------
class ShieldRows:
    """The shields as rows [K, D], read on demand: `rows[idx]` gives float32 rows in the search's space.

    `data` may be any tensor [K, ...] (float32 in RAM, or fp16 memory-mapped from a file), so only the
    rows asked for are read; `transform` maps raw rows [n, D] to the search's space (the hook passes
    the model's `process_latent_in`, which is per-entry, so it commutes with picking rows). Whatever
    the storage dtype, the shield IS the stored value: fp16 storage rounds it once, and every distance
    is computed from that rounded value.
    """

    def __init__(self, data: torch.Tensor, transform=None):
        self.data = data.reshape(data.shape[0], -1)
        self.transform = transform
        self.shape = (self.data.shape[0], self.data.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor) and index.numel() > 1:
            # sorted reads touch a memory-mapped file sequentially; undo the sort afterwards
            order = torch.argsort(index)
            rows = torch.empty(index.numel(), self.shape[1], dtype=torch.float32)
            rows[order] = self.data[index[order]].float()
        else:
            rows = self.data[index].float()
        return rows if self.transform is None else self.transform(rows)

    def chunks(self, rows_per_chunk: int):
        for start in range(0, len(self), rows_per_chunk):
            yield start, self[start : start + rows_per_chunk]


def as_rows(shields) -> ShieldRows:
    return shields if isinstance(shields, ShieldRows) else ShieldRows(shields)


def _exact_recheck(
    queries: torch.Tensor, shields: torch.Tensor, query_idx, shield_idx, radius: float, chunk: int = 2048
) -> Neighbours:
    """Keep the candidate pairs whose true distance is < r.

    Distances of differences in float32 (relative error ~1e-6), and pairs within 1e-4·r of the
    boundary are recomputed in float64, so the decision equals a float64 computation. Chunked, so
    the memory stays bounded however many candidates the filter let through."""
    if query_idx.numel() == 0:
        return Neighbours.empty()
    kept_q, kept_s, kept_d = [], [], []
    for start in range(0, query_idx.numel(), chunk):
        q, z = query_idx[start : start + chunk], shield_idx[start : start + chunk]
        distance = (queries[q].float() - shields[z].float()).norm(dim=1).double()
        near = (distance - radius).abs() <= 1e-4 * radius
        if bool(near.any()):
            distance[near] = (queries[q[near]].double() - shields[z[near]].double()).norm(dim=1)
        keep = distance < radius
        kept_q.append(q[keep])
        kept_s.append(z[keep])
        kept_d.append(distance[keep])
    return Neighbours(torch.cat(kept_q), torch.cat(kept_s), torch.cat(kept_d))


class ExactRangeSearch:
    """Every shield within r: chunked ‖x − z‖² with a slack, then an exact float64 re-check.

    Peak extra memory is one chunk of the [B, chunk] distance matrix plus the chunk of shields read
    (bounded by `chunk_bytes`), whatever K is.
    """

    name = "exact"

    def __init__(self, shields, chunk_bytes: int = EXACT_CHUNK_BYTES):
        self.shields = as_rows(shields)
        row_bytes = self.shields.shape[1] * 4
        self.chunk = max(1, chunk_bytes // max(1, row_bytes))
        self.norms = torch.cat([block.pow(2).sum(1) for _, block in self.shields.chunks(self.chunk)])

    def __len__(self) -> int:
        return self.shields.shape[0]

    def search(self, queries: torch.Tensor, radius: float) -> Neighbours:
        queries = queries.flatten(1).to("cpu", torch.float32)
        query_norms = queries.pow(2).sum(1)
        threshold = radius * radius
        found_q, found_s = [], []
        for start in range(0, len(self), self.chunk):
            block = self.shields[start : start + self.chunk]
            norms = self.norms[start : start + self.chunk]
            squared = query_norms[:, None] - 2.0 * queries @ block.T + norms[None, :]
            slack = FILTER_SLACK * (query_norms[:, None] + norms[None, :]) + 1e-6
            q, s = torch.nonzero(squared <= threshold + slack, as_tuple=True)
            found_q.append(q)
            found_s.append(s + start)
        if not found_q:
            return Neighbours.empty()
        return _exact_recheck(queries, self.shields, torch.cat(found_q), torch.cat(found_s), radius)


def projection_lower_bound(x: torch.Tensor, z: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """‖Pᵀ(x − z)‖² + (ρ_x − ρ_z)², a lower bound of ‖x − z‖² for any orthonormal P (columns).

    Why: x − z = PPᵀ(x − z) + (res_x − res_z) with res_v = (I − PPᵀ)(v − μ) orthogonal to the first
    term, so ‖x − z‖² = ‖Pᵀ(x − z)‖² + ‖res_x − res_z‖², and ‖res_x − res_z‖ ≥ |ρ_x − ρ_z| with ρ = ‖res‖
    (reverse triangle inequality). x: [B, D], z: [K, D]; returns [B, K].
    """
    px, rx = project_with_residual(x, basis, mean)
    pz, rz = project_with_residual(z, basis, mean)
    return torch.cdist(px.double(), pz.double()).pow(2) + (rx.double()[:, None] - rz.double()[None, :]).pow(2)


def project_with_residual(
    v: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    centred = v.float() - mean
    projected = centred @ basis
    residual = (centred - projected @ basis.T).norm(dim=1)
    return projected, residual


def pca_basis(shields, dims: int, sample: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis [D, m] of the set's main directions (PCA of a subsample) and the mean.

    Any orthonormal basis keeps the bound exact; PCA only makes it tight (fewer candidates)."""
    shields = as_rows(shields)
    generator = torch.Generator().manual_seed(seed)
    count = len(shields)
    rows = shields[:] if count <= sample else shields[torch.randperm(count, generator=generator)[:sample]]
    mean = rows.mean(0)
    dims = max(1, min(dims, rows.shape[0], rows.shape[1]))
    with torch.random.fork_rng(devices=[]):  # pca_lowrank draws from the global RNG: seed it, leave it unchanged
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(rows - mean, q=dims, center=False, niter=2)
    basis, _ = torch.linalg.qr(v)  # re-orthonormalise: the bound needs PᵀP = I
    return basis.contiguous(), mean


def encode_codes(rows, basis: torch.Tensor, mean: torch.Tensor, chunk: int = 16384, on_chunk=None) -> torch.Tensor:
    """[Pᵀ(z − μ), ρ_z] per row (float32 [K, m + 1]): the code whose L2 distance is `projection_lower_bound`.
    `rows` is a tensor or ShieldRows, read chunk by chunk; `on_chunk(done, total)` reports progress."""
    total = rows.shape[0]
    codes = torch.empty(total, basis.shape[1] + 1, dtype=torch.float32)
    for start in range(0, total, chunk):
        projected, residual = project_with_residual(rows[start : start + chunk], basis, mean)
        codes[start : start + projected.shape[0], :-1] = projected
        codes[start : start + projected.shape[0], -1] = residual
        if on_chunk is not None:
            on_chunk(min(total, start + chunk), total)
    return codes


class ProjectionRangeSearch:
    """Every shield within r, reading only a compact code of the set per step.

    Each shield is coded as [Pᵀ(z − μ), ρ_z] (m + 1 floats); the L2 distance between the codes of x and
    z is exactly `projection_lower_bound`, so every shield with a code distance ≥ r is provably out of
    range. The remaining candidates are re-checked against the full vectors in float64, which may
    therefore stay in fp16 or on disk. With `use_faiss`, the code scan is FAISS's exact flat range
    search; otherwise a chunked torch scan.
    """

    def __init__(self, shields, dims: int = 64, use_faiss: bool = False, chunk_rows: int = 262_144):
        self.shields = as_rows(shields)
        self.basis, self.mean = pca_basis(self.shields, dims)
        self.codes = self._encode(self.shields)
        self.chunk_rows = chunk_rows
        self.name = "faiss" if use_faiss else "projection"
        self.index = None
        if use_faiss:
            from ..optional_deps import require

            faiss = require("faiss", "the FAISS shield search")
            self.index = faiss.IndexFlatL2(self.codes.shape[1])
            self.index.add(self.codes.numpy())
        self.code_norms = self.codes.pow(2).sum(1)

    def _encode(self, rows, chunk: int = 16384) -> torch.Tensor:
        return encode_codes(rows, self.basis, self.mean, chunk)

    def __len__(self) -> int:
        return self.shields.shape[0]

    def candidates(self, queries: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs whose code distance is within r (with slack): a superset of the in-radius pairs."""
        codes = self._encode(queries)
        query_norms = codes.pow(2).sum(1)
        threshold = radius * radius
        if self.index is not None:
            slack = FILTER_SLACK * (float(query_norms.max()) + float(self.code_norms.max())) + 1e-6
            limits, _, labels = self.index.range_search(codes.numpy(), threshold + slack)
            counts = torch.from_numpy(limits[1:] - limits[:-1]).long()
            query_idx = torch.repeat_interleave(torch.arange(codes.shape[0]), counts)
            return query_idx, torch.from_numpy(labels).long()
        found_q, found_s = [], []
        for start in range(0, len(self), self.chunk_rows):
            block, norms = self.codes[start : start + self.chunk_rows], self.code_norms[start : start + self.chunk_rows]
            squared = query_norms[:, None] - 2.0 * codes @ block.T + norms[None, :]
            slack = FILTER_SLACK * (query_norms[:, None] + norms[None, :]) + 1e-6
            q, s = torch.nonzero(squared <= threshold + slack, as_tuple=True)
            found_q.append(q)
            found_s.append(s + start)
        return torch.cat(found_q), torch.cat(found_s)

    def search(self, queries: torch.Tensor, radius: float) -> Neighbours:
        queries = queries.flatten(1).to("cpu", torch.float32)
        query_idx, shield_idx = self.candidates(queries, radius)
        return _exact_recheck(queries, self.shields, query_idx, shield_idx, radius)


def default_projection_dims(count: int, method: str = "projection") -> int:
    """Code width m. Flat scans: 64 below 50k shields, 256 above (bench: 118 -> 20 ms at 100k x 4096).
    The clustered index prunes whole lists, so 128 above 50k suffices (bench/shield_scale_bench.py:
    ~20-30 ms at 100k with m = 128 against 450 ms with m = 64) and halves the codes' RAM at 1M."""
    if count < 50_000:
        return 64
    return 128 if method == "clustered" else 256


def build_range_search(shields, method: str = "auto", projection_dims: Optional[int] = None):
    """`auto`: exact below AUTO_PROJECTION_MIN_SHIELDS shields, else the clustered projection index
    (`shield_index`: inverted lists over the codes, pruned by the triangle inequality). Every method
    returns every shield within r (see the classes). `shields`: a tensor [K, ...] or ShieldRows; the
    projection width defaults to `default_projection_dims`."""
    count = shields.shape[0]
    if method not in SEARCH_METHODS:
        raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {method!r}")
    if method == "auto":
        method = "exact" if count < AUTO_PROJECTION_MIN_SHIELDS else "clustered"
    if projection_dims is None:
        projection_dims = default_projection_dims(count, method)
    if method == "exact":
        return ExactRangeSearch(shields)
    if method == "clustered":
        from .shield_index import ClusteredProjectionSearch

        return ClusteredProjectionSearch(shields, ClusteredProjectionSearch.build_state(shields, projection_dims))
    return ProjectionRangeSearch(shields, dims=projection_dims, use_faiss=method == "faiss")


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
