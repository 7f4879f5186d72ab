"""Exact range search over a million shields: projection codes in inverted lists, pruned by a proof.

Plain torch (no ComfyUI import). Builds on `range_search.ProjectionRangeSearch` (paper appendix I asks
for a range search; SPELL's guarantee, appendix B, needs every shield within r to be found):

1. Each shield z has a code c_z = [Pᵀ(z − μ), ρ_z] (m + 1 floats, P orthonormal); the code distance
   ‖c_x − c_z‖ is a lower bound of ‖x − z‖ (`range_search.projection_lower_bound`). P is a PCA basis
   of the latents pooled over spatial blocks (`pooled_sketch`): a code costs O(D), not D × m.
2. The codes are clustered (k-means in code space) into inverted lists L_j with centroid μ_j and radius
   R_j = max_{z ∈ L_j} ‖c_z − μ_j‖ (measured after assignment, so it holds whatever k-means did).
3. For a query code q, every member of L_j has ‖q − c_z‖ ≥ ‖q − μ_j‖ − R_j (triangle inequality in
   code space). A list is skipped when that bound exceeds the scan's own acceptance threshold for
   every member, so this pruning drops exactly pairs the flat code scan would drop: none in radius.
   The same holds in the full space with the list's full-dimensional mean ν_j and radius
   S_j = max ‖z − ν_j‖: ‖x − z‖ ≥ ‖x − ν_j‖ − S_j ≥ r proves every member out of range. The code-space
   bound alone loses the directions P does not keep (at 1M shields in 250 clusters, m = 128 keeps about
   half of the cluster-centre directions and almost nothing was pruned); the full-space bound does not.
   ‖x − ν_j‖ itself is bounded below through the pooled split (`pooled_sketch`), so a step reads the
   lists' pooled means (1,024 values each at SDXL-1024), not their full means (65,536).
4. The surviving lists' codes are scanned like the flat filter; the candidates are re-checked against
   the full vectors (`range_search.exact_recheck`, float64 near the boundary), which are read only for
   those candidates and may stay memory-mapped on disk in fp16.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..core.bounded_cache import BoundedCache
from . import range_search
from .pooled_sketch import PooledSketch

SCAN_CHUNK = 16384  # codes scanned at once (a [B, 16384] distance block)
PRUNE_MARGIN = 1e-9  # relative: float64 rounding of ‖q − μ‖ and R_j
RADIUS_MARGIN = 1e-6  # relative: S_j from float32 differences summed in float64 (rounding ≤ 6e-8)


def kmeans(codes: torch.Tensor, lists: int, iterations: int = 10, sample: int = 64, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means on a subsample (≤ `sample` points per list); returns centroids [lists, m + 1].
    Only the pruning's speed depends on it: the list radii are measured on the final assignment."""
    generator = torch.Generator().manual_seed(seed)
    count = codes.shape[0]
    lists = max(1, min(lists, count))
    train = codes if count <= lists * sample else codes[torch.randperm(count, generator=generator)[: lists * sample]]
    centroids = train[torch.randperm(train.shape[0], generator=generator)[:lists]].clone()
    for _ in range(iterations):
        labels = assign(train, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, labels, train)
        sizes = torch.bincount(labels, minlength=lists).float()
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled, None]
    return centroids


def assign(codes: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    centroid_norms = centroids.pow(2).sum(1)
    labels = torch.empty(codes.shape[0], dtype=torch.long)
    for start in range(0, codes.shape[0], chunk):
        block = codes[start : start + chunk]
        labels[start : start + chunk] = (centroid_norms[None, :] - 2.0 * block @ centroids.T).argmin(1)
    return labels


def full_space_lists(
    rows, labels: torch.Tensor, lists: int, chunk: int, on_chunk=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each list's mean ν_j in the full space [lists, D] (float32) and radius S_j ≥ max ‖z − ν_j‖ (float64),
    from two passes over the rows (labels in row order). The radius is measured on the float32 mean that
    the search's pooled split is computed from, so the pruning bound holds for exactly that ν_j."""
    total = len(rows)
    sums = torch.zeros(lists, rows.shape[1], dtype=torch.float64)
    for start, block in rows.chunks(chunk):
        sums.index_add_(0, labels[start : start + block.shape[0]], block.double())
        if on_chunk is not None:
            on_chunk(min(total, start + chunk), total)
    sizes = torch.bincount(labels, minlength=lists).clamp_min(1)
    means = (sums / sizes[:, None]).float()
    radius = torch.zeros(lists, dtype=torch.float64)
    for start, block in rows.chunks(chunk):
        block_labels = labels[start : start + block.shape[0]]
        spread = torch.linalg.vector_norm(block - means[block_labels], dim=1, dtype=torch.float64)
        radius.scatter_reduce_(0, block_labels, spread, "amax")
        if on_chunk is not None:
            on_chunk(min(total, start + chunk), total)
    return means, radius * (1 + RADIUS_MARGIN)


class ClusteredProjectionSearch:
    """Every shield within r; per step it reads only the codes of lists not proven out of reach.

    RAM: (m + 1)·4 bytes per shield for the codes, 8 for the list order; the full vectors stay where
    `shields` keeps them (a memory-mapped file for Load Shield Set). Build once per set (cached by the
    caller, see `cached_index`); the tensors are in `state()` / `from_state()` for saving.
    """

    name = "clustered"

    def __init__(self, shields, state: dict):
        self.shields = range_search.as_rows(shields)
        self.sketch = PooledSketch.from_state(state)
        self.codes, self.order, self.offsets = state["codes"], state["order"], state["offsets"]
        self.centroids, self.list_radius, self.list_max_norm = (
            state["centroids"],
            state["list_radius"],
            state["list_max_norm"],
        )
        # each list's full-space mean ν_j as its pooled split (Uᵀν_j, σ_ν_j), and its radius S_j
        self.list_pooled, self.list_outside = state["list_pooled"], state["list_outside"]
        self.full_radius = state["full_radius"]
        self._centroids64 = self.centroids.double()
        self._list_pooled_norms = self.list_pooled.pow(2).sum(1)
        self.code_norms = self.codes.pow(2).sum(1)
        self.code_lists = torch.repeat_interleave(torch.arange(len(self.offsets) - 1), self.offsets.diff())
        self.last_scanned = 0  # codes scanned by the last search (for benchmarks and reports)
        self.last_candidates = 0  # pairs the last search re-checked against the full vectors

    @staticmethod
    def build_state(
        shields,
        dims: int = 64,
        lists: Optional[int] = None,
        chunk: int = 16384,
        on_chunk: Optional[Callable[[int, int], None]] = None,
    ) -> dict:
        """PCA basis, codes sorted by list, list offsets, centroids, radii. `on_chunk(done, total)` runs
        after every chunk read (progress, interrupts)."""
        rows = range_search.as_rows(shields)
        count = len(rows)
        sketch = PooledSketch.fit(rows, dims, rows.item_shape)
        codes = sketch.encode(rows, range_search.rows_per_chunk(rows.shape[1], chunk, 8), on_chunk)
        lists = lists or max(1, int(math.sqrt(count)))
        centroids = kmeans(codes, lists)
        labels = assign(codes, centroids)
        order = torch.argsort(labels, stable=True)
        codes, labels = codes[order].contiguous(), labels[order]
        sizes = torch.bincount(labels, minlength=centroids.shape[0])
        offsets = torch.zeros(centroids.shape[0] + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)
        spread = (codes.double() - centroids.double()[labels]).norm(dim=1)
        list_radius = torch.zeros(centroids.shape[0], dtype=torch.float64).scatter_reduce_(0, labels, spread, "amax")
        norms = codes.double().pow(2).sum(1)
        list_max_norm = torch.zeros(centroids.shape[0], dtype=torch.float64).scatter_reduce_(0, labels, norms, "amax")
        # float64 sums of a chunk: BUILD_CHUNK_BYTES bounds the transient memory at every latent size
        full_means, full_radius = full_space_lists(
            rows,
            labels[torch.argsort(order)],
            centroids.shape[0],
            range_search.rows_per_chunk(rows.shape[1], chunk, 8),
            on_chunk,
        )
        list_pooled, _, list_outside = sketch.split(full_means)
        return {
            **sketch.state(),
            "codes": codes,
            "order": order,
            "offsets": offsets,
            "centroids": centroids,
            "list_radius": list_radius,
            "list_max_norm": list_max_norm,
            "list_pooled": list_pooled,
            "list_outside": list_outside,
            "full_radius": full_radius,
        }

    def state(self) -> dict:
        return {
            **self.sketch.state(),
            "codes": self.codes,
            "order": self.order,
            "offsets": self.offsets,
            "centroids": self.centroids,
            "list_radius": self.list_radius,
            "list_max_norm": self.list_max_norm,
            "list_pooled": self.list_pooled,
            "list_outside": self.list_outside,
            "full_radius": self.full_radius,
        }

    def __len__(self) -> int:
        return len(self.shields)

    def index_bytes(self) -> int:
        extra = (self.code_norms, self.code_lists)
        return sum(t.numel() * t.element_size() for t in (*self.state().values(), *extra))

    def surviving_lists(
        self, query_codes: torch.Tensor, radius: float, queries: Optional[torch.Tensor] = None, split=None
    ) -> torch.Tensor:
        """[B, lists] bool: False only where the triangle inequality proves every member out of reach.

        Code space: the scan accepts z when ‖q − c_z‖² ≤ r² + s·(‖q‖² + ‖c_z‖²) + 1e-6 (s = FILTER_SLACK);
        with ‖c_z‖² ≤ max_norm_j that is at most t_j², so ‖q − μ_j‖ − R_j > t_j rules out every member.
        Full space (when `queries` [B, D] or their `split` is given): ‖x − ν_j‖ − S_j > r rules out every
        member, with ‖x − ν_j‖ bounded below by the pooled split (`pooled_sketch`)."""
        alive = self._code_space_alive(query_codes, radius)
        if split is None and queries is not None:
            split = self.sketch.split(queries.flatten(1).float())
        if split is not None:
            alive &= (
                self._full_space_lower(split[0], split[2]) - self.full_radius[None, :]
                <= radius * (1 + PRUNE_MARGIN) + PRUNE_MARGIN
            )
        return alive

    def _full_space_lower(self, pooled: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
        """A lower bound of ‖x − ν_j‖ [B, lists]: √(‖Uᵀx − Uᵀν_j‖² + (σ_x − σ_ν_j)²), float64, minus a
        slack far above float64's rounding of ‖a‖² − 2a·b + ‖b‖² over D_p terms."""
        pooled_norms = pooled.pow(2).sum(1)
        squared = pooled_norms[:, None] - 2.0 * pooled @ self.list_pooled.T + self._list_pooled_norms[None, :]
        squared = squared - 1e-12 * (pooled_norms[:, None] + self._list_pooled_norms[None, :])
        squared = squared + (outside[:, None] - self.list_outside[None, :]).pow(2)
        return squared.clamp_min(0.0).sqrt()

    def _code_space_alive(self, query_codes: torch.Tensor, radius: float) -> torch.Tensor:
        to_centroid = torch.cdist(query_codes.double(), self._centroids64)
        query_norms = query_codes.double().pow(2).sum(1)
        threshold = (
            radius * radius + range_search.FILTER_SLACK * (query_norms[:, None] + self.list_max_norm[None, :]) + 1e-6
        ).sqrt()
        lower = to_centroid - self.list_radius[None, :]
        return lower <= threshold * (1 + PRUNE_MARGIN) + PRUNE_MARGIN

    def candidates(self, queries: torch.Tensor, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (query, shield) whose code passes the flat scan's test, among the codes of the lists
        `surviving_lists` keeps for that query; a superset of the in-radius pairs.

        One vectorised pass: the surviving codes are scanned in chunks (gathered when few survive, sliced
        in place when most do), then the pairs of a list pruned for that query are dropped. A Python
        loop over the lists cost ~0.2 ms per list, 60 ms per step at 100k shields when none is pruned."""
        split = self.sketch.split(queries)
        codes = self.sketch.codes_of_split(split[0], split[1])
        query_norms = codes.pow(2).sum(1)
        alive = self.surviving_lists(codes, radius, split=split)
        surviving = alive.any(0)[self.code_lists]  # [K] bool, in code order
        count = int(surviving.sum())
        self.last_scanned = count
        found_q, found_s = [], []
        if count > 0:
            gather = count < len(self.code_lists) // 2
            positions = torch.nonzero(surviving).flatten() if gather else None
            for start in range(0, count if gather else len(self.code_lists), SCAN_CHUNK):
                where = positions[start : start + SCAN_CHUNK] if gather else slice(start, start + SCAN_CHUNK)
                q, s = self._scan(codes, query_norms, alive, where, radius)
                found_q.append(q)
                found_s.append(self.order[s])
        self.last_candidates = sum(int(q.numel()) for q in found_q)
        if not found_q:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        return torch.cat(found_q), torch.cat(found_s)

    def _scan(self, codes, query_norms, alive, where, radius: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(query, code position) of the codes at `where` (positions or a slice) that pass the flat
        scan's test ‖q − c‖² ≤ r² + slack, in a list alive for that query."""
        block, norms, lists = self.codes[where], self.code_norms[where], self.code_lists[where]
        squared = query_norms[:, None] - 2.0 * codes @ block.T + norms[None, :]
        slack = range_search.FILTER_SLACK * (query_norms[:, None] + norms[None, :]) + 1e-6
        q, s = torch.nonzero((squared <= radius * radius + slack) & alive[:, lists], as_tuple=True)
        if isinstance(where, slice):
            return q, s + where.start
        return q, where[s]

    def search(self, queries: torch.Tensor, radius: float) -> range_search.Neighbours:
        queries = queries.flatten(1).to("cpu", torch.float32)
        query_idx, shield_idx = self.candidates(queries, radius)
        return range_search.exact_recheck(queries, self.shields, query_idx, shield_idx, radius)


# -- choosing a search for a set ---------------------------------------------------------------------
def resolve_search_method(method: str, count: int) -> str:
    """`auto`: exact below AUTO_PROJECTION_MIN_SHIELDS shields, else the clustered projection index."""
    if method not in range_search.SEARCH_METHODS:
        raise ValueError(f"search method must be one of {range_search.SEARCH_METHODS}, got {method!r}")
    if method == "auto":
        return "exact" if count < range_search.AUTO_PROJECTION_MIN_SHIELDS else "clustered"
    return method


def build_range_search(shields, method: str = "auto", projection_dims: Optional[int] = None):
    """A range search over `shields` (a tensor [K, ...] or ShieldRows) by `method` (see
    `resolve_search_method`). Every method returns every shield within r (see the classes); the
    projection width defaults to `range_search.default_projection_dims`."""
    method = resolve_search_method(method, shields.shape[0])
    if projection_dims is None:
        projection_dims = range_search.default_projection_dims(shields.shape[0], method)
    if method == "exact":
        return range_search.ExactRangeSearch(shields)
    if method == "clustered":
        return ClusteredProjectionSearch(shields, ClusteredProjectionSearch.build_state(shields, projection_dims))
    return range_search.ProjectionRangeSearch(shields, dims=projection_dims, use_faiss=method == "faiss")


# -- cache: one index per set content (and storage/transform), built lazily ------------------------
CACHE_ENTRIES = 4
INDEX_STATES: BoundedCache[str, dict] = BoundedCache(CACHE_ENTRIES)


def cached_state(
    key: str,
    build: Callable[[], dict],
    load: Optional[Callable[[], Optional[dict]]] = None,
    save: Optional[Callable[[dict], None]] = None,
) -> dict:
    """The index state for `key` (a set content hash plus index settings): from RAM, else from `load`
    (a saved index file that still matches the key), else `build` it (and `save` it)."""

    def load_or_build() -> dict:
        state = load() if load is not None else None
        if state is None:
            state = build()
            if save is not None:
                save(state)
        return state

    return INDEX_STATES.get_or_build(key, load_or_build)
