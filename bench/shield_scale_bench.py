"""Shield search at scale: K = 10k, 100k, 1M shields of d = 4096, fp16, memory-mapped from disk.

Run: $SHIELD_PYTHON bench/shield_scale_bench.py [--quick] [--sizes 10000 100000 1000000] [--data-dir DIR]
(one thread; prints a markdown table; the K-row fp16 files, 8 KB per shield, are written once to
--data-dir, default /tmp/shield_scale_bench, and reused).

Data (issue 3): clustered latents with a decaying spectrum (cluster centres ~N(0, I), a rank-32 spread
of norm ~0.5·√d inside each cluster, isotropic noise 0.1 per entry), queries = near-duplicates of
shields (+0.2 per entry), batch 4, 8 batches; radius = median distance to the 20th neighbour, so many
shields sit near the boundary. Ground truth: the exact chunked scan over the whole file. Methods: the
clustered projection index (`samplers/shield_index.py`, exact by construction), and the paper's
IVF-Flat (nlist = √K, nprobe 1 and 10; needs every vector in RAM as float32, so not run at 1M).
RAM: the index's own tensors, and the process's private (anonymous) resident memory after the
searches (the memory-mapped file lives in the OS page cache, shared and reclaimable, and is not counted).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from harness.host import import_comfyui_in_process  # noqa: E402

torch.set_num_threads(1)
import_comfyui_in_process()

import faiss  # noqa: E402

from comfyui_shield.core.shield_files import memory_map_tensor  # noqa: E402
from comfyui_shield.samplers import range_search, shield_index  # noqa: E402

faiss.omp_set_num_threads(1)
DIM, BATCH, BATCHES, WITHIN_RANK, ISOTROPIC, NOISE = 4096, 4, 8, 32, 0.1, 0.2


def rss_anon_mb() -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_clustered(path: pathlib.Path, count: int, seed: int = 0, chunk: int = 8192) -> None:
    """A safetensors file with one F16 tensor "latents" [count, DIM], streamed chunk by chunk."""
    header = json.dumps(
        {"latents": {"dtype": "F16", "shape": [count, DIM], "data_offsets": [0, count * DIM * 2]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    generator = torch.Generator().manual_seed(seed)
    clusters = max(8, int(math.sqrt(count) / 4))
    centres = torch.randn(clusters, DIM, generator=generator)
    directions = torch.randn(WITHIN_RANK, DIM, generator=generator) * (0.5 / math.sqrt(WITHIN_RANK))
    temp = path.with_suffix(".tmp")
    with open(temp, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        for start in range(0, count, chunk):
            rows = min(chunk, count - start)
            labels = torch.randint(0, clusters, (rows,), generator=generator)
            block = centres[labels] + torch.randn(rows, WITHIN_RANK, generator=generator) @ directions
            block += ISOTROPIC * torch.randn(rows, DIM, generator=generator)
            handle.write(block.half().numpy().tobytes())
    temp.rename(path)


def shields_file(data_dir: pathlib.Path, count: int) -> torch.Tensor:
    path = data_dir / f"clustered_{count}x{DIM}_f16.safetensors"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_clustered(path, count)
        print(f"<!-- wrote {path} in {time.perf_counter() - start:.0f} s -->", flush=True)
    return memory_map_tensor(path, "latents")


def near_duplicate_queries(shields: torch.Tensor, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, shields.shape[0], (BATCH * BATCHES,), generator=generator)
    queries = shields[picks.sort().values].float() + NOISE * torch.randn(BATCH * BATCHES, DIM, generator=generator)
    return list(queries.split(BATCH))


def kth_neighbour_radius(rows: range_search.ShieldRows, queries: torch.Tensor, k: int = 20) -> float:
    best = None
    for _, block in rows.chunks(16384):
        distances = torch.cdist(queries, block)
        best = distances if best is None else torch.cat([best, distances], 1).topk(k + 1, dim=1, largest=False).values
        best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
    return float(best[:, k].median())


class IvfFlat:
    """The paper's setting (appendix I): IVF-Flat, nlist = √K, float32 vectors in RAM."""

    def __init__(self, shields: torch.Tensor, nprobe: int):
        count = shields.shape[0]
        nlist = int(math.sqrt(count))
        self.index = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, nlist)
        train = (
            torch.randperm(count, generator=torch.Generator().manual_seed(0))[: min(count, 40 * nlist)].sort().values
        )
        self.index.train(shields[train].float().numpy())
        for start in range(0, count, 16384):
            self.index.add(shields[start : start + 16384].float().numpy())
        self.index.nprobe = nprobe

    def search(self, queries, radius):
        limits, distances, labels = self.index.range_search(queries.float().numpy(), radius * radius)
        counts = torch.from_numpy(limits[1:] - limits[:-1]).long()
        return range_search.Neighbours(
            torch.repeat_interleave(torch.arange(queries.shape[0]), counts),
            torch.from_numpy(labels).long(),
            torch.from_numpy(distances).double().sqrt(),
        )

    def index_bytes(self):
        return self.index.ntotal * DIM * 4 + self.index.nlist * DIM * 4


def pairs_of(found, offset: int) -> set:
    return {(int(q) + offset, int(s)) for q, s in zip(found.query, found.shield, strict=True)}


def bench_size(count: int, data_dir: pathlib.Path, repeats: int, dims_list, with_ivf: bool) -> None:
    shields = shields_file(data_dir, count)
    rows = range_search.ShieldRows(shields)
    batches = near_duplicate_queries(shields)
    radius = kth_neighbour_radius(rows, torch.cat(batches))
    start = time.perf_counter()
    exact = range_search.ExactRangeSearch(rows)
    truth = set()
    exact_times = []
    for index, queries in enumerate(batches):
        begin = time.perf_counter()
        truth |= pairs_of(exact.search(queries, radius), index * BATCH)
        exact_times.append(time.perf_counter() - begin)
    print(
        f"| {count} | exact scan (ground truth, fp16 file) | {time.perf_counter() - start - sum(exact_times):.1f} | "
        f"{statistics.median(exact_times) * 1e3:.0f} | 1.0000 | {len(truth)} | {count} | - | - | {rss_anon_mb():.0f} |",
        flush=True,
    )
    del exact
    methods = [(f"clustered m={m}, lists=sqrtK (exact)", lambda m=m: build_clustered(rows, m)) for m in dims_list]
    if with_ivf:
        methods += [(f"IVF-Flat nlist=sqrtK nprobe={p}", lambda p=p: IvfFlat(shields, p)) for p in (1, 10)]
    for name, build in methods:
        start = time.perf_counter()
        search = build()
        built = time.perf_counter() - start
        found, times, scanned, candidates = set(), [], [], []
        for _ in range(repeats):
            for index, queries in enumerate(batches):
                begin = time.perf_counter()
                result = search.search(queries, radius)
                times.append(time.perf_counter() - begin)
                found |= pairs_of(result, index * BATCH)
                scanned.append(getattr(search, "last_scanned", count))
                candidates.append(getattr(search, "last_candidates", float("nan")))
        recall = len(found & truth) / max(1, len(truth))
        extra = len(found - truth)
        assert extra == 0, f"{name} returned {extra} pairs outside the radius"
        print(
            f"| {count} | {name} | {built:.1f} | {statistics.median(times) * 1e3:.1f} | {recall:.4f} | {len(truth)} | "
            f"{statistics.median(scanned):.0f} | {statistics.median(candidates):.0f} | {search.index_bytes() / 2**20:.0f} | {rss_anon_mb():.0f} |",
            flush=True,
        )
        del search


def build_clustered(rows, dims: int):
    return shield_index.ClusteredProjectionSearch(rows, shield_index.ClusteredProjectionSearch.build_state(rows, dims))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 10k only, 2 repeats")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--dims", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("/tmp/shield_scale_bench"))
    options = parser.parse_args()
    sizes = options.sizes or ([10_000] if options.quick else [10_000, 100_000, 1_000_000])
    repeats = 2 if options.quick else 3
    print(
        f"\n### Shield search at scale (d={DIM}, fp16 memory-mapped file, {BATCHES} batches of {BATCH} near-duplicate "
        f"queries, radius = median 20th-neighbour distance, median over batches x {repeats} repeats)\n"
    )
    print(
        "| K | method | build s | ms/step (batch 4) | recall of in-radius pairs | in-radius pairs | codes/vectors scanned "
        "| pairs re-checked (median per batch) | index RAM MB | process private RAM MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for count in sizes:
        bench_size(count, options.data_dir, repeats, options.dims, with_ivf=count <= 100_000)


if __name__ == "__main__":
    main()
