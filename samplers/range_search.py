"""Range search over the shields: every shield within r of a query, never one missed (no ComfyUI import).

SPELL's update (spell_math) needs exactly the shields within r of each x̂0 (paper appendix I; the
guarantee of appendix B needs every one of them). `ExactRangeSearch` scans the set in memory-bounded
chunks; `ProjectionRangeSearch` scans a compact projection whose distance is a proven lower bound of
the true distance, then re-checks the few candidates exactly, so it cannot miss an in-radius shield
(`projection_lower_bound` states the bound). The clustered index for a million shields builds on
these in `shield_index`, which also chooses the search for a set (`build_range_search`).
"""

from __future__ import annotations

import dataclasses

import torch

from ..optional_deps import require

# Candidates pass the cheap filter with this slack on r² (relative to ‖a‖² + ‖b‖²), then are re-checked
# exactly. The slack covers the float32 rounding of ‖a‖² − 2a·b + ‖b‖² as measured (4e-7 to 2.4e-6 of the
# norms² for D = 64 to 262144: a 250x to 40x margin), not a proven float32 bound (docs/spell.md).
FILTER_SLACK = 1e-4
EXACT_CHUNK_BYTES = 64 * 2**20
BUILD_CHUNK_BYTES = 64 * 2**20  # float32 rows read at once while building an index
PCA_SAMPLE_BYTES = 256 * 2**20
AUTO_PROJECTION_MIN_SHIELDS = 4096  # bench: at 10k x 4096 the filter is ~100x faster than a scan
SEARCH_METHODS = ("auto", "exact", "clustered", "projection", "faiss")


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


# -- rows and exact search ---------------------------------------------------------------------------------
class ShieldRows:
    """The shields as rows [K, D], read on demand: `rows[idx]` gives float32 rows in the search's space.

    `data` may be any tensor [K, ...] (float32 in RAM, or fp16 memory-mapped from a file), so only the
    rows asked for are read; `transform` maps raw rows [n, D] to the search's space (the hook passes
    the model's latent format, `latent_space.shields_in_model_space`, which commutes with picking rows). Whatever
    the storage dtype, the shield IS the stored value: fp16 storage rounds it once, and every distance
    is computed from that rounded value.
    """

    def __init__(self, data: torch.Tensor, transform=None, file_rows=None):
        self.item_shape = tuple(data.shape[1:])  # one shield's shape, e.g. (4, 128, 128)
        self.data = data.reshape(data.shape[0], -1)
        self.transform = transform
        self.file_rows = file_rows  # shield_files.FileRows of a memory-mapped `data`, or None
        self.shape = (self.data.shape[0], self.data.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice) and self.file_rows is not None and index.step in (None, 1):
            start, stop, _ = index.indices(len(self))
            rows = self.file_rows.read(start, stop).reshape(-1, self.shape[1]).float()  # not mapped: RSS stays low
        else:
            if isinstance(index, torch.Tensor) and self.file_rows is not None:
                self.file_rows.prefetch(index)  # read only these rows from disk, all at once
            rows = self._gather(index)
        return rows if self.transform is None else self.transform(rows)

    def _gather(self, index) -> torch.Tensor:
        if isinstance(index, torch.Tensor) and index.numel() > 1:
            # sorted reads touch a memory-mapped file sequentially; undo the sort afterwards
            order = torch.argsort(index)
            rows = torch.empty(index.numel(), self.shape[1], dtype=torch.float32)
            rows[order] = self.data[index[order]].float()
            return rows
        return self.data[index].float()

    def chunks(self, rows_per_chunk: int):
        for start in range(0, len(self), rows_per_chunk):
            yield start, self[start : start + rows_per_chunk]


def as_rows(shields) -> ShieldRows:
    return shields if isinstance(shields, ShieldRows) else ShieldRows(shields)


def exact_recheck(
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
        return exact_recheck(queries, self.shields, torch.cat(found_q), torch.cat(found_s), radius)


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
    sample = min(sample, max(2 * dims, PCA_SAMPLE_BYTES // (4 * shields.shape[1])))  # ~256 MB of rows at most
    rows = shields[:] if count <= sample else shields[torch.randperm(count, generator=generator)[:sample]]
    mean = rows.mean(0)
    dims = max(1, min(dims, rows.shape[0], rows.shape[1]))
    with torch.random.fork_rng(devices=[]):  # pca_lowrank draws from the global RNG: seed it, leave it unchanged
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(rows - mean, q=dims, center=False, niter=2)
    basis, _ = torch.linalg.qr(v)  # re-orthonormalise: the bound needs PᵀP = I
    return basis.contiguous(), mean


def rows_per_chunk(dims: int, rows: int, bytes_per_value: int = 4) -> int:
    """At most `rows`, and at most BUILD_CHUNK_BYTES of values (16384 SD1.5 rows would be 1 GB, Flux 16 GB)."""
    return max(1, min(rows, BUILD_CHUNK_BYTES // (bytes_per_value * dims)))


def encode_codes(rows, basis: torch.Tensor, mean: torch.Tensor, chunk: int = 16384, on_chunk=None) -> torch.Tensor:
    """[Pᵀ(z − μ), ρ_z] per row (float32 [K, m + 1]): the code whose L2 distance is `projection_lower_bound`.
    `rows` is a tensor or ShieldRows, read chunk by chunk; `on_chunk(done, total)` reports progress."""
    total = rows.shape[0]
    chunk = rows_per_chunk(rows.shape[1], chunk)
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
        return exact_recheck(queries, self.shields, query_idx, shield_idx, radius)


def default_projection_dims(count: int, method: str = "projection") -> int:
    """Code width m. Flat scans: 64 below 50k shields, 256 above (bench: 118 -> 20 ms at 100k x 4096).
    The clustered index prunes whole lists, so 128 above 50k suffices (bench/shield_scale_bench.py:
    ~20-30 ms at 100k with m = 128 against 450 ms with m = 64) and halves the codes' RAM at 1M."""
    if count < 50_000:
        return 64
    return 128 if method == "clustered" else 256
