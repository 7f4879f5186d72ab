"""Shield search at real latent sizes: SD1.5-512, SDXL-1024, Flux-1024 shield sets, fp16 on disk, memory-mapped.

Run (one thread; prints a markdown section):

    $SHIELD_PYTHON bench/shield_scale_bench.py --family sdxl --sizes 10000 100000 [--data-dir DIR] [--keep]
    $SHIELD_PYTHON bench/shield_scale_bench.py --quick   # SD1.5 at 2000 shields, seconds (bench/run_all.py)

Per family and size K, each piece in its own process (so "peak RSS" is that piece's own peak):
1. make: the set file in the pack's shield-set format (the safetensors header and metadata that Save Shield
   Set writes: names, sha256 hashes, latent format), latents fp16, written in streaming chunks (never in RAM).
   Data: latent-like fields (a 1/f amplitude spectrum, i.e. the 1/f^2 power of natural images, channels
   mixed), unit variance in the model's space, in clusters of ~50 (a shared low-frequency "content" field,
   0.6 of the amplitude) and every 20th shield a near-copy of the previous one at 0.2-2 r.
2. truth: Load Shield Set, then the exact range search (`ExactRangeSearch`: a chunked scan of the whole
   file, float64 re-check at the boundary) of all queries at once: the brute-force ground truth.
3. build: the clustered index from a cold page cache (as at the first use of a set), saved beside the set.
0. load (right after make): Load Shield Set's first load (its finite check reads the whole file, cold),
   a later load (the record beside the set says this file content was checked) and the check as it was
   before that record (torch.isfinite on every row, cold).
4. search: Load Shield Set + the saved index (as in a later run), then every batch, warm (the same batch
   searched before) and cold (the set file evicted from the page cache before each search), median ms.
Queries, batch 4, 8 batches of 2 near + 2 far: near = a shield (every 4th one of a near-copy pair)
moved by t·r along a random latent-like direction, t in {0.5, 0.9, 0.99, 1.01, 1.1, 1.5, 0.95, 1.05} (so
recall is tested at the boundary); far = a new member of an existing cluster, or a new independent field.
Radius r = 0.5·√D (Sparse Repellency's default, relative 0.5). Distances in the model's space (the latent
format's scale/shift), as the sampler sees them.
Cold: `posix_fadvise(POSIX_FADV_DONTNEED)` on the set file after `madvise(MADV_DONTNEED)` of this
process's mapping, not `echo 3 > /proc/sys/vm/drop_caches` (that would also drop the Python modules and
every other job's files on a shared machine, and needs root); the file's resident bytes are checked with
mincore (fincore) afterwards: 0 in the recorded runs. Rows read = /proc/self/io read_bytes
(what came from the disk, read-ahead included) / bytes per shield.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import mmap
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
FAMILIES = {  # name -> (ComfyUI latent format, latent shape)
    "sd15": ("SD15", (4, 64, 64)),
    "sdxl": ("SDXL", (4, 128, 128)),
    "flux": ("Flux", (16, 128, 128)),
}
BATCH, BATCHES, CLUSTER, COPY_EVERY, CONTENT = 4, 8, 50, 20, 0.6
NEAR_T = (0.5, 0.9, 0.99, 1.01, 1.1, 1.5, 0.95, 1.05)
RELATIVE_RADIUS = 0.5
REPEATS = 3
FREE_DISK_RESERVE = 20 * 2**30


# -- process facts ----------------------------------------------------------------------------------------
def status_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_read_bytes() -> int:
    for line in pathlib.Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


LIBC = ctypes.CDLL(None, use_errno=True)
MADV_DONTNEED = 4


def evict(path: pathlib.Path, mapped) -> int:
    """Drop the set file from this process's page tables and then from the page cache (a mapped page is
    never evicted); return the file's bytes still resident."""
    start = mapped.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = mapped.data_ptr() + mapped.numel() * mapped.element_size() - start
    if LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise")
    return drop_from_page_cache(path)


def drop_from_page_cache(path: pathlib.Path) -> int:
    """posix_fadvise(POSIX_FADV_DONTNEED) on the whole file (no process may map it); its bytes still resident."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    return resident_bytes(path)


def resident_bytes(path: pathlib.Path) -> int:
    """The file's bytes in the page cache (util-linux fincore, i.e. mincore)."""
    output = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)], capture_output=True)
    return int(output.stdout.split()[0])


# -- data ------------------------------------------------------------------------------------------------
def setup_torch():
    sys.path.insert(0, str(REPO / "tests"))
    import torch

    from harness.host import import_comfyui_in_process

    torch.set_num_threads(1)
    import_comfyui_in_process()
    return torch


class LatentLike:
    """Deterministic latent-like fields in the model's space: 1/f amplitude spectrum, channels mixed,
    unit variance per entry. Drawn in the frequency domain (one inverse FFT per row)."""

    def __init__(self, torch, shape, clusters: int = 1, seed: int = 0):
        self.torch, self.shape = torch, shape
        channels, height, width = shape
        fy = torch.fft.fftfreq(height)[:, None].abs()
        fx = torch.fft.rfftfreq(width)[None, :]
        amplitude = 1.0 / torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / max(height, width))
        self.amplitude = amplitude / amplitude.pow(2).mean().sqrt()
        generator = torch.Generator().manual_seed(seed)
        mixing = torch.randn(channels, channels, generator=generator) + 2.0 * torch.ones(channels, channels)
        self.mixing = mixing / mixing.pow(2).sum(1, keepdim=True).sqrt()
        # each cluster's shared "content": the same spectrum restricted to the lowest 1/8 of frequencies,
        # scaled to the expected energy of a whole spectrum (so that CONTENT is its share of the amplitude)
        self.rows = torch.nonzero(fy[:, 0] < 1 / 16).flatten()
        self.columns = int((fx[0] < 1 / 16).sum())
        low = self.spectrum(clusters, generator)[:, :, self.rows, : self.columns]
        expected = 2 * self.amplitude.pow(2).sum() * channels
        self.contents = low * (expected / low.abs().pow(2).flatten(1).sum(1)).sqrt()[:, None, None, None]

    def spectrum(self, count: int, generator):
        real = self.torch.randn(count, *self.shape[:2], self.shape[2] // 2 + 1, 2, generator=generator)
        return self.torch.view_as_complex(real) * self.amplitude

    def to_field(self, spectrum):
        torch = self.torch
        shaped = torch.fft.irfft2(spectrum, s=self.shape[1:], norm="ortho").flatten(2)
        mixed = (self.mixing @ shaped).reshape(-1, *self.shape)
        return mixed / mixed.flatten(1).pow(2).mean(1).sqrt()[:, None, None, None]

    def field(self, count: int, generator):
        return self.to_field(self.spectrum(count, generator))

    def member(self, cluster_ids, generator):
        """About CONTENT of the amplitude from the cluster's content, the rest the member's own field
        (mixed as spectra, one inverse FFT)."""
        spectrum = math.sqrt(1 - CONTENT**2) * self.spectrum(len(cluster_ids), generator)
        spectrum[:, :, self.rows, : self.columns] += CONTENT * self.contents[cluster_ids]
        return self.to_field(spectrum)


def radius_of(shape) -> float:
    return RELATIVE_RADIUS * math.sqrt(math.prod(shape))


def set_path(data_dir: pathlib.Path, family: str, count: int) -> pathlib.Path:
    return data_dir / f"{family}_{count}.safetensors"


def make_set(family: str, count: int, data_dir: pathlib.Path, chunk_bytes: int = 64 * 2**20) -> dict:
    """Write the set in the pack's file format, streaming: header sized first (hashes have a fixed
    length), payload chunk by chunk, then the header with the real hashes."""
    torch = setup_torch()
    import comfy.latent_formats

    from comfyui_shield.core.shield_set import ShieldSet, metadata_json

    format_name, shape = FAMILIES[family]
    latent_format = getattr(comfy.latent_formats, format_name)()
    path = set_path(data_dir, family, count)
    row_values = math.prod(shape)
    names = tuple(f"shield {index}" for index in range(count))

    def header(hashes) -> bytes:
        placeholder = ShieldSet(torch.empty(count, *shape, device="meta"), format_name, names, hashes)
        entries = {
            "__metadata__": metadata_json(placeholder),
            "latents": {"dtype": "F16", "shape": [count, *shape], "data_offsets": [0, count * row_values * 2]},
        }
        encoded = json.dumps(entries, separators=(",", ":")).encode()
        return encoded + b" " * (-len(encoded) % 8)

    size = len(header(("0" * 64,) * count))
    clusters = max(1, count // CLUSTER)
    data = LatentLike(torch, shape, clusters)
    generator = torch.Generator().manual_seed(1)
    rows_per_chunk = max(COPY_EVERY, chunk_bytes // (row_values * 4) // COPY_EVERY * COPY_EVERY)
    radius = radius_of(shape)
    hashes = []
    start_time = time.perf_counter()
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "wb") as handle:
        handle.write(b"\0" * (8 + size))
        for start in range(0, count, rows_per_chunk):
            rows = min(rows_per_chunk, count - start)
            index = torch.arange(start, start + rows)
            block = data.member((index * 7919) % clusters, generator)
            copies = torch.nonzero(index % COPY_EVERY == COPY_EVERY - 1).flatten()
            copies = copies[copies > 0]
            direction = data.field(len(copies), generator)
            lengths = radius * (0.2 + 1.8 * torch.rand(len(copies), generator=generator))
            block[copies] = (
                block[copies - 1] + direction * (lengths / direction.flatten(1).norm(dim=1))[:, None, None, None]
            )
            stored = latent_format.process_out(block).half()
            if not torch.isfinite(stored).all():
                raise ValueError("latents exceed the float16 range")
            payload = stored.numpy().tobytes()
            step = row_values * 2
            hashes.extend(hashlib.sha256(payload[i : i + step]).hexdigest() for i in range(0, len(payload), step))
            handle.write(payload)
        handle.seek(0)
        final = header(tuple(hashes))
        assert len(final) == size
        handle.write(size.to_bytes(8, "little") + final)
    temp.rename(path)
    return {"seconds": time.perf_counter() - start_time, "bytes": path.stat().st_size}


def make_queries(torch, shield_set, latent_format, shape):
    """BATCHES x BATCH queries in model space and their kinds: 2 near, 2 far per batch."""
    from comfyui_shield.samplers.latent_space import to_model_space

    count = len(shield_set)
    clusters = max(1, count // CLUSTER)
    data = LatentLike(torch, shape, clusters)
    generator = torch.Generator().manual_seed(7)
    radius = radius_of(shape)
    near_count = BATCHES * 2
    picks = torch.randint(0, count, (near_count,), generator=generator)
    picks[::4] = (picks[::4] // COPY_EVERY) * COPY_EVERY + COPY_EVERY - 1  # the copy of a near-copy pair
    picks = picks.clamp(0, count - 1)
    base = torch.cat([to_model_space(shield_set.latents[int(p) : int(p) + 1].float(), latent_format) for p in picks])
    direction = data.field(near_count, generator)
    t = torch.tensor([NEAR_T[i % len(NEAR_T)] for i in range(near_count)])
    near = base + direction * (t * radius / direction.flatten(1).norm(dim=1))[:, None, None, None]
    far_members = data.member(torch.randint(0, clusters, (BATCHES,), generator=generator), generator)
    far_new = data.field(BATCHES, generator)
    far = torch.cat([far_members, far_new])
    queries = torch.empty(BATCHES * BATCH, *shape)
    kinds = []
    for batch in range(BATCHES):
        queries[batch * 4 : batch * 4 + 2] = near[batch * 2 : batch * 2 + 2]
        queries[batch * 4 + 2] = far[batch]
        queries[batch * 4 + 3] = far[BATCHES + batch]
        kinds += [f"near t={float(t[batch * 2]):g}", f"near t={float(t[batch * 2 + 1]):g}", "far member", "far new"]
    return queries.flatten(1), kinds


def load(torch, family: str, count: int, data_dir: pathlib.Path):
    import comfy.latent_formats

    from comfyui_shield.core import shield_files
    from comfyui_shield.samplers.latent_space import shields_in_model_space

    format_name, shape = FAMILIES[family]
    latent_format = getattr(comfy.latent_formats, format_name)()
    path = set_path(data_dir, family, count)
    start = time.perf_counter()
    shield_set = shield_files.load_shield_set(path)
    loaded = time.perf_counter() - start
    return path, shield_set, latent_format, shape, shields_in_model_space(shield_set, latent_format), loaded


# -- pieces (each in its own process) --------------------------------------------------------------------
def piece_load(family: str, count: int, data_dir: pathlib.Path) -> dict:
    """Load Shield Set's own cost: a first load (no record beside the set: the finite check reads every row,
    from a cold page cache), a later load (the record matches: no row read), and the finite check as it
    was before the record and the exponent-bit test (torch.isfinite per 64 MB read, cold), for comparison."""
    torch = setup_torch()
    from comfyui_shield.core import shield_files

    path = set_path(data_dir, family, count)
    shield_files.verified_path_for(path).unlink(missing_ok=True)
    resident = drop_from_page_cache(path)
    read_before, start = disk_read_bytes(), time.perf_counter()
    shield_set = shield_files.load_shield_set(path)
    first, first_read = time.perf_counter() - start, disk_read_bytes() - read_before
    recorded = shield_files.verified_path_for(path).is_file()
    shield_files._VERIFIED.clear()  # as in a new server process
    evict(path, shield_set.latents)
    read_before, start = disk_read_bytes(), time.perf_counter()
    shield_files.load_shield_set(path)
    later, later_read = time.perf_counter() - start, disk_read_bytes() - read_before
    evict(path, shield_set.latents)
    rows, start, cpu = shield_set.file_rows, time.perf_counter(), time.process_time()
    chunk = max(1, shield_files.FINITE_CHECK_BYTES // rows.row_bytes)
    for first_row in range(0, rows.count, chunk):
        assert torch.isfinite(rows.read(first_row, first_row + chunk)).all()
    return {
        "first_load_seconds": first,
        "first_load_read_gb": first_read / 2**30,
        "later_load_seconds": later,
        "later_load_read_mb": later_read / 2**20,
        "check_before_seconds": time.perf_counter() - start,
        "check_before_cpu_seconds": time.process_time() - cpu,
        "recorded": recorded,
        "resident_before_first_load": resident,
        "load_average": os.getloadavg()[0],
    }


def piece_truth(family: str, count: int, data_dir: pathlib.Path) -> dict:
    """The exact range search of all queries in one pass over the file (the scan of `ExactRangeSearch`,
    norms taken per chunk: a filter with slack, then `exact_recheck`, float64 at the boundary)."""
    torch = setup_torch()
    from comfyui_shield.samplers import range_search

    path, shield_set, latent_format, shape, rows, _ = load(torch, family, count, data_dir)
    queries, kinds = make_queries(torch, shield_set, latent_format, shape)
    radius = radius_of(shape)
    start = time.perf_counter()
    query_norms = queries.pow(2).sum(1)
    chunk = max(1, range_search.EXACT_CHUNK_BYTES // (4 * rows.shape[1]))
    found_q, found_s = [], []
    for first, block in rows.chunks(chunk):
        norms = block.pow(2).sum(1)
        squared = query_norms[:, None] - 2.0 * queries @ block.T + norms[None, :]
        slack = range_search.FILTER_SLACK * (query_norms[:, None] + norms[None, :]) + 1e-6
        q, s = torch.nonzero(squared <= radius * radius + slack, as_tuple=True)
        found_q.append(q)
        found_s.append(s + first)
    found = range_search.exact_recheck(queries, rows, torch.cat(found_q), torch.cat(found_s), radius)
    seconds = time.perf_counter() - start
    pairs = sorted((int(q), int(s)) for q, s in zip(found.query, found.shield, strict=True))
    return {"pairs": pairs, "kinds": kinds, "scan_seconds": seconds}


def piece_build(family: str, count: int, data_dir: pathlib.Path) -> dict:
    torch = setup_torch()
    from comfyui_shield.core import shield_files
    from comfyui_shield.samplers import range_search, shield_index

    path, shield_set, _, shape, rows, loaded = load(torch, family, count, data_dir)
    rss_loaded = status_mb("VmRSS")
    resident = evict(path, shield_set.latents)
    read_before = disk_read_bytes()
    dims = range_search.default_projection_dims(count, "clustered")
    start, cpu = time.perf_counter(), time.process_time()
    state = shield_index.ClusteredProjectionSearch.build_state(rows, dims)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    index_file = shield_files.index_path_for(str(path))
    shield_files.save_index(index_file, "bench", state)
    return {
        "load_seconds": loaded,
        "build_seconds": seconds,
        "build_cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "build_read_gb": (disk_read_bytes() - read_before) / 2**30,
        "resident_after_evict": resident,
        "index_mb": index_file.stat().st_size / 2**20,
        "dims": dims,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": status_mb("VmHWM"),
    }


def piece_search(family: str, count: int, data_dir: pathlib.Path, truth: dict) -> dict:
    torch = setup_torch()
    from comfyui_shield.core import shield_files
    from comfyui_shield.samplers import shield_index

    baseline_rss = status_mb("VmRSS")
    path, shield_set, latent_format, shape, rows, _ = load(torch, family, count, data_dir)
    state = shield_files.load_index(shield_files.index_path_for(str(path)), "bench")
    search = shield_index.ClusteredProjectionSearch(rows, state)
    queries, _ = make_queries(torch, shield_set, latent_format, shape)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here: not the query generator's
    radius = radius_of(shape)
    row_bytes = math.prod(shape) * 2
    truth_pairs = {tuple(pair) for pair in truth["pairs"]}
    results = {}
    for mode in ("cold", "warm"):
        times, cpu_times, rows_read, candidates, residents, found = [], [], [], [], [], set()
        for _ in range(REPEATS):
            for batch in range(BATCHES):
                batch_queries = queries[batch * BATCH : (batch + 1) * BATCH]
                if mode == "cold":
                    residents.append(evict(path, shield_set.latents))
                else:
                    search.search(batch_queries, radius)  # the same batch once before: its rows are cached
                before = disk_read_bytes()
                begin, cpu = time.perf_counter(), time.process_time()
                result = search.search(batch_queries, radius)
                times.append(time.perf_counter() - begin)
                cpu_times.append(time.process_time() - cpu)
                rows_read.append((disk_read_bytes() - before) / row_bytes)
                candidates.append(search.last_candidates)
                found |= {(int(q) + batch * BATCH, int(s)) for q, s in zip(result.query, result.shield, strict=True)}
        extra = found - truth_pairs
        assert not extra, f"pairs outside r returned: {sorted(extra)[:5]}"
        results[mode] = {
            "ms": statistics.median(times) * 1e3,
            "ms_max": max(times) * 1e3,
            "cpu_ms": statistics.median(cpu_times) * 1e3,
            "rows_read": statistics.median(rows_read),
            "rows_read_max": max(rows_read),
            "candidates": statistics.median(candidates),
            "recall": len(found & truth_pairs) / max(1, len(truth_pairs)),
            "resident_after_evict": max(residents) if residents else 0,
        }
    results.update(
        {
            "pairs": len(truth_pairs),
            "baseline_rss_mb": baseline_rss,
            "peak_rss_mb": status_mb("VmHWM"),
            "rss_mb": status_mb("VmRSS"),
            "rss_anon_mb": status_mb("RssAnon"),
            "index_ram_mb": search.index_bytes() / 2**20,
            "load_average": os.getloadavg()[0],
        }
    )
    return results


# -- driver ----------------------------------------------------------------------------------------------
def run_piece(arguments: list[str]) -> dict:
    command = [sys.executable, __file__, "--piece", *arguments]
    output = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if output.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments)} failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def bench_one(family: str, count: int, data_dir: pathlib.Path, keep: bool) -> list:
    _, shape = FAMILIES[family]
    path = set_path(data_dir, family, count)
    file_bytes = count * math.prod(shape) * 2
    common = [family, str(count), str(data_dir)]
    if not path.exists():
        free = shutil.disk_usage(data_dir).free
        if free - file_bytes < FREE_DISK_RESERVE:
            print(f"<!-- skipped {family} {count}: {file_bytes / 2**30:.0f} GB would leave < 20 GB free -->")
            return []
        made = run_piece(["make", *common])
        print(f"<!-- wrote {path.name}: {made['bytes'] / 2**30:.1f} GB in {made['seconds']:.0f} s -->", flush=True)
    loads = run_piece(["load", *common])
    print(f"<!-- {family} {count} Load Shield Set: {json.dumps(loads)} -->", flush=True)
    truth_file = path.with_name(path.name + ".truth.json")
    if not truth_file.exists():
        truth_file.write_text(json.dumps(run_piece(["truth", *common])))
    truth = json.loads(truth_file.read_text())
    built = run_piece(["build", *common])
    searched = run_piece(["search", *common, str(truth_file)])
    if not keep:
        for leftover in (
            path,
            truth_file,
            path.with_name(path.name + ".shield-index"),
            path.with_name(path.name + ".shield-verified"),
        ):
            leftover.unlink(missing_ok=True)
    shape_text = "x".join(map(str, shape))
    row = [
        f"{family} {shape_text}",
        count,
        f"{file_bytes / 2**30:.2f}",
        f"{built['build_seconds']:.0f} ({built['build_cpu_seconds']:.0f} CPU, {built['build_read_gb']:.1f} GB read)",
        f"{built['index_mb']:.1f}",
        f"{built['peak_rss_mb']:.0f}",
        f"{searched['warm']['ms']:.1f} ({searched['warm']['cpu_ms']:.1f})",
        f"{searched['cold']['ms']:.1f} ({searched['cold']['cpu_ms']:.1f}), max {searched['cold']['ms_max']:.0f}",
        f"{searched['cold']['rows_read']:.0f} (max {searched['cold']['rows_read_max']:.0f})",
        f"{searched['cold']['candidates']:.0f}",
        f"{searched['peak_rss_mb']:.0f} ({searched['baseline_rss_mb']:.0f})",
        f"{searched['cold']['recall']:.4f} / {searched['warm']['recall']:.4f} ({searched['pairs']})",
        f"{truth['scan_seconds']:.0f}",
        f"{loads['first_load_seconds']:.1f} / {loads['later_load_seconds']:.2f} / {loads['check_before_seconds']:.0f}",
        f"{built['load_average']:.1f} / {searched['load_average']:.1f}",
    ]
    print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)
    details = {"built": built, "searched": searched, "load_seconds": built["load_seconds"]}
    print(f"<!-- {family} {count}: {json.dumps(details)} -->", flush=True)
    return row


HEADER = (
    "| family, latent | K | file GB | index build s (CPU s, disk read) | index MB | build peak RSS MB "
    "| ms/step warm (CPU ms) | ms/step cold (CPU ms) | rows read from disk per step, cold "
    "| candidate pairs re-checked per step | search process peak RSS MB (before loading) "
    "| recall cold / warm (in-radius pairs) | exact scan of all 32 queries, s "
    "| Load Shield Set s: first load (finite check, cold) / later loads / the check before this version (cold) "
    "| load average build / search |"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="SD1.5 at 2000 shields (seconds)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sdxl")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("/tmp/shield_scale_bench"))
    parser.add_argument("--keep", action="store_true", help="keep the set files (default: deleted after each size)")
    parser.add_argument("--piece", nargs="+", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.piece:
        name, family, count, data_dir, *rest = options.piece
        arguments = (family, int(count), pathlib.Path(data_dir))
        if name == "make":
            result = make_set(*arguments)
        elif name == "load":
            result = piece_load(*arguments)
        elif name == "truth":
            result = piece_truth(*arguments)
        elif name == "build":
            result = piece_build(*arguments)
        else:
            result = piece_search(*arguments, json.loads(pathlib.Path(rest[0]).read_text()))
        print(json.dumps(result))
        return
    family, sizes = ("sd15", [2000]) if options.quick else (options.family, options.sizes)
    options.data_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"\n### Shield search at real latent sizes ({family}, fp16 set file memory-mapped, batch {BATCH}, "
        f"{BATCHES} batches of 2 near + 2 far queries, r = {RELATIVE_RADIUS}·√D, median of {REPEATS} repeats)\n"
    )
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for count in sizes:
        bench_one(family, count, options.data_dir, options.keep)


if __name__ == "__main__":
    main()
