"""A pooled sketch of large latents: projection codes whose cost per row does not grow with D x m.

Plain torch (no ComfyUI import). The clustered index (`shield_index`) needs, for every shield and query,
a code c_x = [Pᵀ(x − μ), ρ_x] with P orthonormal (its distance is a lower bound of ‖x − z‖, see
`range_search.projection_lower_bound`). With a PCA basis over the full latent (D × m floats) a query of
an SDXL-1024 latent (D = 65,536) costs two D × m products, and the build two per shield. Here
P = U·Q instead:

- U: sum-pooling over f × f spatial blocks divided by f, i.e. the projection onto the normalised block
  indicators. They are disjoint unit vectors, so UᵀU = I: the pooling is an orthonormal projection, a
  contraction, and costs O(D). SDXL-1024 (4×128×128) pools 8×8 to 4×16×16 = 1,024 values.
- Q: an orthonormal PCA basis (m columns) of the pooled sample, re-orthonormalised in float64.
- μ = U·μ_p with μ_p the pooled sample mean, so ‖x − μ‖² = ‖x‖² − 2 (Uᵀx)·μ_p + ‖μ_p‖².

Then Pᵀ(x − μ) = Qᵀ(Uᵀx − μ_p) and ρ_x² = ‖x − μ‖² − ‖Pᵀ(x − μ)‖² (Pythagoras), all in float64 from the
float32 row: the bound is exact up to float64 rounding, whatever the data. Natural images (and their
latents) keep most of their energy at low spatial frequencies, which the pooling keeps: on the
1/f-spectrum fields of bench/shield_scale_bench.py an 8×8 pooling keeps ~46% of a pair's squared distance.

The same split bounds the distance to a list's mean ν (the clustered index's list pruning):
‖x − ν‖² = ‖Uᵀx − Uᵀν‖² + ‖(I − UUᵀ)(x − ν)‖² ≥ ‖Uᵀx − Uᵀν‖² + (σ_x − σ_ν)², σ_v = ‖(I − UUᵀ)v‖, so a
list is tested in the pooled space (1,024 values) instead of the full one (65,536).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import range_search

POOL_TARGET_DIMS = 1024  # pool as far as the pooled sketch keeps at least this many values
POOL_FACTORS = (8, 4, 2)


def pool_factor(item_shape: Sequence[int]) -> int:
    """The largest f in POOL_FACTORS dividing both spatial sizes with D / f² ≥ POOL_TARGET_DIMS; 1 (no
    pooling: the plain PCA code) for small or non-spatial items. Channels (and frames) are kept."""
    if len(item_shape) < 3:
        return 1
    height, width = item_shape[-2:]
    size = math.prod(item_shape)
    for factor in POOL_FACTORS:
        if height % factor == 0 and width % factor == 0 and size // (factor * factor) >= POOL_TARGET_DIMS:
            return factor
    return 1


def pool(rows: torch.Tensor, item_shape: Sequence[int], factor: int) -> torch.Tensor:
    """Uᵀx for rows [n, D] (float64 [n, D / f²]): each f × f block's sum divided by f."""
    rows = rows.double()
    if factor == 1:
        return rows
    *lead, height, width = item_shape
    blocks = rows.reshape(rows.shape[0], math.prod(lead), height // factor, factor, width // factor, factor)
    return blocks.sum(dim=(3, 5)).flatten(1) / factor


class PooledSketch:
    """Codes [Qᵀ(Uᵀx − μ_p), ρ_x] (float32 [n, m + 1]) and the pooled split of rows (see the module)."""

    def __init__(self, item_shape: Sequence[int], factor: int, basis: torch.Tensor, mean: torch.Tensor):
        self.item_shape, self.factor = tuple(int(size) for size in item_shape), int(factor)
        self.basis, self.mean = basis.double(), mean.double()  # Q [D_p, m], μ_p [D_p]
        self._mean_norm = float(self.mean.pow(2).sum())

    @staticmethod
    def fit(rows, dims: int, item_shape: Sequence[int], sample: int = 4096, seed: int = 0) -> "PooledSketch":
        """Q from a PCA of a subsample of the pooled rows (any orthonormal Q keeps the bound exact; PCA
        makes it tight). `rows` is a tensor [K, D] or ShieldRows (read by gather)."""
        factor = pool_factor(item_shape)
        count = rows.shape[0]
        generator = torch.Generator().manual_seed(seed)
        sample = min(sample, max(2 * dims, range_search.PCA_SAMPLE_BYTES // (4 * rows.shape[1])))  # bounded bytes
        picks = torch.arange(count) if count <= sample else torch.randperm(count, generator=generator)[:sample]
        pooled = pool(rows[picks.sort().values], item_shape, factor)
        mean = pooled.mean(0)
        dims = max(1, min(dims, pooled.shape[0], pooled.shape[1]))
        with torch.random.fork_rng(devices=[]):  # pca_lowrank draws from the global RNG: seed it, leave it unchanged
            torch.manual_seed(seed)
            _, _, v = torch.pca_lowrank((pooled - mean).float(), q=dims, center=False, niter=2)
        basis, _ = torch.linalg.qr(v.double())  # orthonormal to float64 rounding: the bound needs QᵀQ = I
        return PooledSketch(item_shape, factor, basis, mean)

    @staticmethod
    def from_state(state: dict) -> "PooledSketch":
        return PooledSketch(
            state["sketch_item_shape"].tolist(), int(state["sketch_factor"]), state["basis"], state["mean"]
        )

    def state(self) -> dict:
        return {
            "basis": self.basis,
            "mean": self.mean,
            "sketch_item_shape": torch.tensor(self.item_shape, dtype=torch.long),
            "sketch_factor": torch.tensor(self.factor, dtype=torch.long),
        }

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Uᵀx float64 [n, D_p], ‖x‖² float64 [n], σ_x = ‖(I − UUᵀ)x‖ float64 [n]) of rows [n, D]."""
        rows64 = rows.double()
        pooled = pool(rows64, self.item_shape, self.factor)
        squared = rows64.pow(2).sum(1)
        outside = (squared - pooled.pow(2).sum(1)).clamp_min(0.0).sqrt()
        return pooled, squared, outside

    def codes(self, rows: torch.Tensor) -> torch.Tensor:
        pooled, squared, _ = self.split(rows)
        return self.codes_of_split(pooled, squared)

    def codes_of_split(self, pooled: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        projected = (pooled - self.mean) @ self.basis
        centred_squared = squared - 2.0 * (pooled @ self.mean) + self._mean_norm  # ‖x − μ‖²
        residual = (centred_squared - projected.pow(2).sum(1)).clamp_min(0.0).sqrt()
        return torch.cat([projected, residual[:, None]], 1).float()

    def encode(self, rows, chunk: int, on_chunk=None) -> torch.Tensor:
        """Codes of every row (float32 [K, m + 1]), reading `chunk` rows at a time."""
        total = rows.shape[0]
        codes = torch.empty(total, self.basis.shape[1] + 1, dtype=torch.float32)
        for start in range(0, total, chunk):
            block = rows[start : start + chunk]
            codes[start : start + block.shape[0]] = self.codes(block)
            if on_chunk is not None:
                on_chunk(min(total, start + chunk), total)
        return codes
