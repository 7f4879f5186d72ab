"""SPELL benchmarks: per-step overhead of the patch, and shield range search latency / recall / RAM.

Run: $SHIELD_PYTHON bench/spell_bench.py [--quick]   (one thread; prints markdown tables)

1. Overhead: a tiny real ComfyUI UNet (reference_models/tiny_unet.py), batch 4, 4x32x32 latents,
   KSampler euler; time per step unpatched vs patched with K = 0 (intra-batch only), 100, 10k shields,
   all variants interleaved round by round in one run; ratio = median of per-round ratios.
2. Search: clustered data (d = 4096, fp16 storage), batch-4 near-duplicate queries, radius set so each
   query has several shields near the boundary. Exact chunked scan (ground truth), projection filter
   (torch and FAISS scans, m = 64/256), and the paper's IVF-Flat (nlist = sqrt K, nprobe 1 and 10).
"""

from __future__ import annotations

import argparse
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
import nodes as comfy_nodes  # noqa: E402

from comfyui_shield.core.shield_set import from_latents, latent_format_name  # noqa: E402
from comfyui_shield.nodes.spell import repellency_model  # noqa: E402
from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning  # noqa: E402
from comfyui_shield.samplers import range_search, shield_index, spell_math  # noqa: E402

faiss.omp_set_num_threads(1)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# -- 1. overhead -----------------------------------------------------------------------------------
def overhead(quick: bool) -> None:
    """Whole-sampler time per step, variants interleaved round by round (each round runs every variant
    once, in a rotated order), so a load change on this shared machine hits all variants alike. The
    ratio is the median over rounds of (variant / unpatched in the same round)."""
    steps, rounds, shape = 6, (5 if quick else 15), (4, 4, 32, 32)
    model = build_tiny_unet("eps")
    positive, negative = random_text_conditioning(1), random_text_conditioning(2)
    latent = {"samples": torch.zeros(shape)}

    def run(m):
        comfy_nodes.common_ksampler(m, 0, steps, 5.0, "euler", "normal", positive, negative, latent)

    variants = [("unpatched", model)]
    generator = torch.Generator().manual_seed(0)
    latent_format = latent_format_name(model)
    for count in (0, 100, 10_000):
        shields = (
            from_latents(torch.randn(count, *shape[1:], generator=generator) * 3, latent_format) if count else None
        )
        name = f"K={count}" + (" (intra-batch only)" if not count else "")
        variants.append((name, repellency_model(model, shields, None, 0.5, "relative", 1.6, True, 0.0, 1.0, "auto")))
    for _, m in variants:  # warm-up; builds the K=10k index (lazily, at its first step) outside the timing
        run(m)
    times = {name: [] for name, _ in variants}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for name, m in variants[shift:] + variants[:shift]:
            start = time.perf_counter()
            run(m)
            times[name].append((time.perf_counter() - start) / steps)
    base = times["unpatched"]
    x0 = torch.randn(shape, generator=generator)
    radius = spell_math.absolute_radius(0.5, x0[0].numel(), True)
    print(
        f"\n### Per-step overhead (tiny UNet, batch 4, latent 4x32x32, {steps} steps, cfg 5, euler; {rounds} interleaved rounds)\n"
    )
    print(
        "| patch | ms/step (whole sampler, median) | ratio vs unpatched (median of per-round ratios) | ratio IQR | "
        "ms/step in the SPELL step alone |\n|---|---|---|---|---|"
    )
    for name, _ in variants:
        ratios = sorted(t / b for t, b in zip(times[name], base, strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        alone = "-"
        if name != "unpatched":
            count = int(name.split("=")[1].split(" ")[0])
            searches = (
                [shield_index.build_range_search(torch.randn(count, x0[0].numel(), generator=generator) * 3)]
                if count
                else []
            )
            alone = f"{median_time(lambda s=searches: spell_math.sparse_repellency_step(x0, s, radius, 1.6, True), rounds * 3) * 1e3:.2f}"
        print(
            f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | {statistics.median(ratios):.3f} | "
            f"{quartiles[0]:.3f}–{quartiles[2]:.3f} | {alone} |",
            flush=True,
        )


# -- 2. search -------------------------------------------------------------------------------------
WITHIN_RANK, ISOTROPIC = 32, 0.1  # within a cluster: a rank-32 spread plus small isotropic noise


def clustered(count: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Cluster centres ~N(0, I), a low-rank spread inside each cluster (norm ~0.5·sqrt(d)) and isotropic noise
    (norm 0.1·sqrt(d)): a decaying spectrum like real latents. Fully isotropic clusters are the worst case
    for any projection filter (every shield of the query's cluster becomes a candidate)."""
    generator = torch.Generator().manual_seed(seed)
    clusters = max(8, int(math.sqrt(count) / 4))
    centres = torch.randn(clusters, dim, generator=generator)
    directions = torch.randn(WITHIN_RANK, dim, generator=generator) * (0.5 / math.sqrt(WITHIN_RANK))
    out = torch.empty(count, dim, dtype=torch.float16)
    for start in range(0, count, 8192):
        rows = min(8192, count - start)
        labels = torch.randint(0, clusters, (rows,), generator=generator)
        within = torch.randn(rows, WITHIN_RANK, generator=generator) @ directions
        isotropic = ISOTROPIC * torch.randn(rows, dim, generator=generator)
        out[start : start + rows] = (centres[labels] + within + isotropic).half()
    return out


class IvfFlat:
    name = "ivf"

    def __init__(self, shields: torch.Tensor, nprobe: int):
        count, dim = shields.shape
        nlist = int(math.sqrt(count))
        quantizer = faiss.IndexFlatL2(dim)
        self.index = faiss.IndexIVFFlat(quantizer, dim, nlist)
        train = shields[torch.randperm(count)[: min(count, 40 * nlist)]].float().numpy()
        self.index.train(train)
        for start in range(0, count, 16384):
            self.index.add(shields[start : start + 16384].float().numpy())
        self.index.nprobe = nprobe
        self.shields = shields

    def search(self, queries, radius):
        limits, distances, labels = self.index.range_search(queries.float().numpy(), radius * radius)
        counts = torch.from_numpy(limits[1:] - limits[:-1]).long()
        return range_search.Neighbours(
            torch.repeat_interleave(torch.arange(queries.shape[0]), counts),
            torch.from_numpy(labels).long(),
            torch.from_numpy(distances).double().sqrt(),
        )


def index_bytes(search) -> int:
    if isinstance(search, IvfFlat):
        return search.index.ntotal * search.index.d * 4 + search.index.nlist * search.index.d * 4
    full = search.shields.data.numel() * search.shields.data.element_size()
    if isinstance(search, shield_index.ClusteredProjectionSearch):
        return search.index_bytes() + full
    if isinstance(search, range_search.ProjectionRangeSearch):
        return search.codes.numel() * 4 + search.basis.numel() * 4 + full
    return full


def search_bench(quick: bool) -> None:
    sizes = (10_000,) if quick else (10_000, 100_000)
    dim, batch, repeats = 4096, 4, (3 if quick else 5)
    print(
        f"\n### Shield range search (d={dim}, clustered, fp16 storage, batch {batch} near-duplicate queries, median of {repeats})\n"
    )
    print(
        "| K | method | build s | ms/step | recall of in-radius pairs | in-radius pairs | index RAM MB (full vectors incl.) |"
    )
    print("|---|---|---|---|---|---|---|")
    for count in sizes:
        search_rows(count, dim, batch, repeats)


def search_rows(count: int, dim: int, batch: int, repeats: int) -> None:
    shields = clustered(count, dim)
    generator = torch.Generator().manual_seed(1)
    picks = torch.randint(0, count, (batch,), generator=generator)
    queries = shields[picks].float() + 0.2 * torch.randn(batch, dim, generator=generator)
    exact = range_search.ExactRangeSearch(shields)
    distances = torch.cat([torch.cdist(queries, shields[s : s + 8192].float()) for s in range(0, count, 8192)], dim=1)
    radius = float(distances.sort(dim=1).values[:, 20].median())  # ~20 shields per query, many near r
    truth = exact.search(queries, radius)
    truth_pairs = set(zip(truth.query.tolist(), truth.shield.tolist(), strict=True))
    methods = [("exact (chunked torch)", lambda: exact)]
    for dims in (64, 256):
        methods.append(
            (
                f"clustered m={dims} (pruned lists, exact)",
                lambda d=dims: shield_index.build_range_search(shields, "clustered", d),
            )
        )
        methods.append(
            (f"projection m={dims} (torch scan)", lambda d=dims: range_search.ProjectionRangeSearch(shields, d))
        )
        methods.append(
            (
                f"projection m={dims} (faiss scan)",
                lambda d=dims: range_search.ProjectionRangeSearch(shields, d, use_faiss=True),
            )
        )
    for nprobe in (1, 10):
        methods.append((f"IVF-Flat nlist=sqrtK nprobe={nprobe}", lambda p=nprobe: IvfFlat(shields, p)))
    for name, build in methods:
        start = time.perf_counter()
        search = build()
        built = time.perf_counter() - start
        found = search.search(queries, radius)
        pairs = set(zip(found.query.tolist(), found.shield.tolist(), strict=True))
        recall = len(pairs & truth_pairs) / max(1, len(truth_pairs))
        latency = median_time(lambda s=search: s.search(queries, radius), repeats)
        print(
            f"| {count} | {name} | {built:.1f} | {latency * 1e3:.1f} | {recall:.4f} | {len(truth_pairs)} | {index_bytes(search) / 2**20:.0f} |",
            flush=True,
        )
        del search


# -- 3. effect ------------------------------------------------------------------------------------
def effect(quick: bool) -> None:
    """Replication on the closed-form memorizer: share of outputs within r of a training item."""
    from comfyui_shield.reference_models.memorizer import build_memorizer, nearest_item_distance, subset_conditioning

    samples, batch = (64, 8) if quick else (256, 8)
    items = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(1234))
    shields = from_latents(items, "LatentFormat")
    conditioning = subset_conditioning(len(items))
    print(f"\n### Replication on the memorizer (16 items 4x8x8, {samples} samples, dpmpp_2m karras 12 steps)\n")
    print(
        "| radius (relative / absolute) | shield | replicated (< r from an item) | min distance to an item |\n|---|---|---|---|"
    )
    for relative in (0.25, 0.5):
        radius = spell_math.absolute_radius(relative, items[0].numel(), True)
        for use_shield in (False, True):
            model = build_memorizer(items)
            if use_shield:
                model = repellency_model(model, shields, None, relative, "relative", 1.6, False, 0.0, 1.0, "auto")
            outs = []
            for seed in range(samples // batch):
                latent = {"samples": torch.zeros(batch, *items.shape[1:])}
                (out,) = comfy_nodes.common_ksampler(
                    model, seed, 12, 1.0, "dpmpp_2m", "karras", conditioning, conditioning, latent
                )
                outs.append(out["samples"])
            nearest, _ = nearest_item_distance(torch.cat(outs), items)
            share = float((nearest < radius).double().mean())
            print(
                f"| {relative} / {radius:.1f} | {'on' if use_shield else 'off'} | {share:.1%} | {float(nearest.min()):.3f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, K=10k only for the search")
    parser.add_argument("--only", choices=["overhead", "search", "effect"], help="run one part")
    options = parser.parse_args()
    if options.only in (None, "overhead"):
        overhead(options.quick)
    if options.only in (None, "effect"):
        effect(options.quick)
    if options.only in (None, "search"):
        search_bench(options.quick)


if __name__ == "__main__":
    main()
