"""Large shield sets: memory-mapped fp16 files, the clustered index (built lazily, cached, saved beside
the set), and the exactness of list pruning on adversarial cases."""

import os
import time

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.core import shield_files
from comfyui_shield.core.bounded_cache import BoundedCache
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes.spell import repellency_model
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers import pooled_sketch, range_search, shield_index
from harness.files import row_written_in_place

RADIUS = 4.0


def _pairs(found):
    return {(int(q), int(s)) for q, s in zip(found.query, found.shield, strict=True)}


def _brute_force(queries, shields, radius):
    distance = torch.cdist(queries.double(), shields.double())
    q, s = torch.nonzero(distance < radius, as_tuple=True)
    return set(zip(q.tolist(), s.tolist(), strict=True))


def _clustered_search(shields, dims=6, lists=None):
    return shield_index.ClusteredProjectionSearch(
        shields, shield_index.ClusteredProjectionSearch.build_state(shields, dims, lists)
    )


def _mapped_ranges(path):
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(str(path)):
                low, high = line.split()[0].split("-")
                yield int(low, 16), int(high, 16)


# -- exactness of the pruning --------------------------------------------------------------------------
def test_pruned_search_equals_brute_force_on_adversarial_queries():
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(12, 48, generator=generator) * 6
    shields = centres[torch.randint(0, 12, (1500,), generator=generator)] + torch.randn(1500, 48, generator=generator)
    shields[100:110] = shields[99]  # exact duplicates
    search = _clustered_search(shields, dims=6, lists=40)
    labels = shield_index.assign(search.codes, search.centroids)
    # queries: on a list's boundary (a member at distance R_j), between two centroids, duplicates, far away
    codes_outer = search.order[int(search.offsets[3])]
    between = 0.5 * (centres[0] + centres[1])
    queries = torch.stack(
        [shields[codes_outer] + 1e-3, shields[99], between, shields[7] * 0.5, torch.full((48,), 50.0)]
    )
    assert int(labels.numel()) == len(shields)
    for radius in (0.5, 3.0, 8.0, 60.0):  # from tiny to larger than any list
        found = search.search(queries, radius)
        assert _pairs(found) == _brute_force(queries, shields, radius)
    assert len(search.search(shields[99:100], 1e-3)) == 11  # the duplicates are all found
    everything = search.search(queries[:1], 1e4)  # radius bigger than every list: nothing pruned
    assert len(everything) == len(shields) and search.last_scanned == len(shields)


def test_pruning_skips_lists_only_with_a_proof_and_does_skip_far_lists():
    generator = torch.Generator().manual_seed(6)
    centres = torch.randn(20, 32, generator=generator) * 20
    shields = centres.repeat_interleave(100, 0) + torch.randn(2000, 32, generator=generator)
    search = _clustered_search(shields, dims=8, lists=20)
    query = shields[:1] + 0.1
    found = search.search(query, 6.0)
    assert _pairs(found) == _brute_force(query, shields, 6.0)
    assert search.last_scanned < len(shields) // 4  # far clusters were proven out of reach
    codes = search.sketch.codes(query)
    code_alive = search.surviving_lists(codes, 6.0)[0]
    alive = search.surviving_lists(codes, 6.0, query)[0]
    assert bool((alive <= code_alive).all()) and int(alive.sum()) >= 1  # the full-space bound only prunes more
    for j in torch.nonzero(~alive).flatten().tolist():  # every skipped list really is out of reach
        members = search.order[int(search.offsets[j]) : int(search.offsets[j + 1])]
        if len(members) == 0:  # k-means may leave a list empty: nothing to check
            continue
        assert float(torch.cdist(query.double(), shields[members].double()).min()) >= 6.0


# -- files: memory map, fp16, index beside the set -----------------------------------------------------
def test_load_memory_maps_the_latents_and_fp16_storage_is_the_shield(tmp_path):
    latents = torch.randn(64, 4, 8, 8)
    shields = from_latents(latents, "SD15")
    path = tmp_path / "big.safetensors"
    shield_files.save_shield_set(shields, path, storage="float16")
    loaded = shield_files.load_shield_set(path)
    assert loaded.latents.dtype == torch.float16 and torch.equal(loaded.latents, latents.half())
    pointer = loaded.latents.data_ptr()
    assert any(low <= pointer < high for low, high in _mapped_ranges(path.resolve()))  # backed by the file, not RAM
    assert loaded.source_path == str(path) and loaded.content_hash != shields.content_hash
    with pytest.raises(Exception, match="float16 range"):
        shield_files.save_shield_set(
            from_latents(latents * 1e5, "SD15"), tmp_path / "huge.safetensors", storage="float16"
        )
    rows = range_search.ShieldRows(loaded.latents)
    picked = torch.tensor([5, 1, 63, 1])
    assert torch.equal(rows[picked], latents.half().float().flatten(1)[picked])  # unsorted, repeated indices


def _spell_run(items, shield_set):
    """The memorizer sampled with Sparse Repellency from `shield_set` (auto search, 4 samples, 8 steps)."""
    model = repellency_model(build_memorizer(items), shield_set, None, RADIUS, "absolute", 1.6, False, 0.0, 1.0, "auto")
    conditioning = subset_conditioning(len(items))
    latent = {"samples": torch.zeros(4, *items.shape[1:])}
    (out,) = comfy_nodes.common_ksampler(model, 3, 8, 1.0, "euler", "normal", conditioning, conditioning, latent)
    return out["samples"]


def _min_distance(samples, shield_set):
    shields = shield_set.latents.float().flatten(1).double()
    return float(torch.cdist(samples.flatten(1).double(), shields).min())


@pytest.fixture
def index_builds(monkeypatch):
    """Index builds counted (the real build runs); auto picks the clustered index from 4 shields; an empty
    RAM cache; a set file counts as settled at once (the settle rule has its own test)."""
    monkeypatch.setattr(range_search, "AUTO_PROJECTION_MIN_SHIELDS", 4)
    monkeypatch.setattr(shield_index, "INDEX_STATES", BoundedCache(4))
    monkeypatch.setattr(shield_files, "SETTLED_SECONDS", 0.0)
    builds, real_build = [], shield_index.ClusteredProjectionSearch.build_state
    monkeypatch.setattr(
        shield_index.ClusteredProjectionSearch,
        "build_state",
        staticmethod(lambda *a, **k: builds.append(1) or real_build(*a, **k)),
    )
    return builds


def test_guarantee_with_a_memory_mapped_fp16_set_and_a_saved_index(
    tmp_path, memorizer_items, index_builds, monkeypatch
):
    items = memorizer_items
    path = tmp_path / "protected.safetensors"
    shield_files.save_shield_set(from_latents(items, "LatentFormat"), path, storage="float16")
    stored = shield_files.load_shield_set(path)
    out = _spell_run(items, stored)
    assert _min_distance(out, stored) >= RADIUS - 1e-4 and index_builds == [1]
    index_file = shield_files.index_path_for(str(path))
    assert index_file.is_file()
    # a fresh process (empty RAM cache) reads the saved index instead of rebuilding it
    monkeypatch.setattr(shield_index, "INDEX_STATES", BoundedCache(4))
    assert torch.equal(_spell_run(items, shield_files.load_shield_set(path)), out) and index_builds == [1]
    # the set changes under the same name: the stale index is not used, it is rebuilt and replaced
    shield_files.save_shield_set(from_latents(items.flip(0) * 1.01, "LatentFormat"), path, storage="float16")
    changed = shield_files.load_shield_set(path)
    moved = _spell_run(items, changed)
    assert index_builds == [1, 1] and _min_distance(moved, changed) >= RADIUS - 1e-4
    assert shield_files.load_index(index_file, "stale key") is None


def test_a_set_edited_in_place_gets_a_new_index(tmp_path, memorizer_items, index_builds, monkeypatch):
    """Same names and hashes, so the same content hash: the file's identity (ctime) keys the index too. A
    stale index would bound the edited shield's distance by its old place and prune it."""
    items = memorizer_items
    path = tmp_path / "edited.safetensors"
    shield_files.save_shield_set(from_latents(items[:5], "LatentFormat"), path, storage="float16")
    before = shield_files.load_shield_set(path)
    out = _spell_run(items, before)  # item 5 is not shielded: a sample ends on it
    assert float(torch.cdist(out.flatten(1), items[5:].flatten(1)).min()) < 0.1
    row_written_in_place(path, 4, items[5])  # shield 4 is now item 5
    edited = shield_files.load_shield_set(path)
    assert edited.content_hash == before.content_hash and torch.equal(edited.latents[4], items[5].half())
    moved = _spell_run(items, edited)
    assert index_builds == [1, 1]
    assert _min_distance(moved, edited) >= RADIUS - 1e-4
    # a later process (empty RAM cache) uses the index saved for the edited file
    monkeypatch.setattr(shield_index, "INDEX_STATES", BoundedCache(4))
    assert torch.equal(_spell_run(items, shield_files.load_shield_set(path)), moved) and index_builds == [1, 1]


def test_a_set_file_changed_seconds_ago_is_indexed_without_caching(
    tmp_path, memorizer_items, index_builds, monkeypatch
):
    """A write in the same clock tick as the file's last change may keep its identity: a fresh file's index
    is neither kept in RAM nor saved beside it until the file has been unchanged for SETTLED_SECONDS, unless
    it is the file Save Shield Set wrote."""
    items = memorizer_items
    path = tmp_path / "fresh.safetensors"
    monkeypatch.setattr(shield_files, "SETTLED_SECONDS", 60.0)  # written a moment ago: not settled
    shield_files.save_shield_set(from_latents(items, "LatentFormat"), path, storage="float16")
    shield_files.verified_path_for(path).unlink()  # as a set written by another program (Save records its file)
    monkeypatch.setattr(shield_files, "_VERIFIED", {})
    stored = shield_files.load_shield_set(path)
    first = _spell_run(items, stored)
    assert torch.equal(_spell_run(items, stored), first) and index_builds == [1, 1]
    assert not shield_files.index_path_for(str(path)).exists()
    monkeypatch.setattr(shield_files, "SETTLED_SECONDS", 0.5)
    time.sleep(max(0.0, path.stat().st_ctime_ns / 1e9 + 0.55 - time.time()))  # unchanged for 0.5 s now
    assert torch.equal(_spell_run(items, stored), first) and index_builds == [1, 1, 1]
    assert torch.equal(_spell_run(items, stored), first) and index_builds == [1, 1, 1]
    assert shield_files.index_path_for(str(path)).is_file()
    # a file Save Shield Set has just written (and recorded) is cached at once
    monkeypatch.setattr(shield_files, "SETTLED_SECONDS", 60.0)
    shield_files.save_shield_set(from_latents(items.flip(0), "LatentFormat"), path, storage="float16")
    saved = shield_files.load_shield_set(path)
    again = _spell_run(items, saved)
    assert torch.equal(_spell_run(items, saved), again) and index_builds == [1, 1, 1, 1]


def test_scan_in_small_chunks_gathered_or_sliced_equals_brute_force(monkeypatch):
    monkeypatch.setattr(shield_index, "SCAN_CHUNK", 7)  # many chunks in both the gather and the slice path
    generator = torch.Generator().manual_seed(8)
    centres = torch.randn(10, 40, generator=generator) * 8
    shields = centres[torch.randint(0, 10, (600,), generator=generator)] + torch.randn(600, 40, generator=generator)
    search = _clustered_search(shields, dims=5, lists=30)
    queries = torch.cat([shields[[3, 99, 250]] + 0.3, torch.randn(1, 40, generator=generator) * 8])
    for radius in (2.0, 6.0, 1e4):  # few lists survive (gathered codes) ... all survive (sliced in place)
        found = search.search(queries, radius)
        assert _pairs(found) == _brute_force(queries, shields, radius)
        true = torch.cdist(queries.double(), shields.double())[found.query, found.shield]
        assert torch.allclose(found.distance, true, rtol=1e-5)
    assert search.last_scanned == len(shields)


# -- reading rows from the set file: range reads, read-ahead of the rows a search gathers ----------------
def _disk_read_bytes():
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("read_bytes:"))


def _evict(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # written pages must be clean to be dropped
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)


def test_file_rows_read_the_file_as_loaded_even_after_it_is_replaced(tmp_path):
    latents = torch.randn(40, 4, 8, 8)
    path = tmp_path / "rows.safetensors"
    shield_files.save_shield_set(from_latents(latents, "SD15"), path, storage="float16")
    loaded = shield_files.load_shield_set(path)
    rows = range_search.ShieldRows(loaded.latents, file_rows=loaded.file_rows)
    expected = latents.half().float().flatten(1)
    picked = torch.tensor([30, 2, 3, 4, 30, 39])
    assert torch.equal(rows[3:17], expected[3:17]) and torch.equal(rows[35:99], expected[35:])
    assert torch.equal(rows[picked], expected[picked]) and torch.equal(rows[torch.tensor([5])], expected[5:6])
    shield_files.save_shield_set(from_latents(latents + 5, "SD15"), path, storage="float16")  # same name, new file
    assert torch.equal(rows[0:40], expected) and torch.equal(rows[picked], expected[picked])


def test_a_cold_gather_reads_only_the_rows_asked_for_and_load_does_not_map_the_file(tmp_path):
    latents = torch.randn(512, 4, 64, 64)  # 32 KB per fp16 row, a 16 MB file: larger than a read-ahead window
    path = tmp_path / "cold.safetensors"
    shield_files.save_shield_set(from_latents(latents, "SD15"), path, storage="float16")
    rss_file = _status_kb("RssFile")
    loaded = shield_files.load_shield_set(path)  # its finite check reads every row, by pread
    assert _status_kb("RssFile") - rss_file < 4096  # ... without mapping the 16 MB into this process
    rows = range_search.ShieldRows(loaded.latents, file_rows=loaded.file_rows)
    _evict(path)
    picked = torch.tensor([7, 300, 301, 500])
    before = _disk_read_bytes()
    gathered = rows[picked]
    read = _disk_read_bytes() - before
    assert torch.equal(gathered, latents.half().float().flatten(1)[picked])
    # a fault on a cold mapping alone reads the whole read-ahead window around it (128 KB to 8 MB)
    assert read <= 4 * 32768 + 8 * 4096, f"read {read} bytes from disk for 4 rows of 32 KB"


def _status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def test_index_build_reads_bounded_chunks_at_real_latent_sizes():
    for dims in (4 * 64 * 64, 4 * 128 * 128, 16 * 128 * 128):  # SD1.5-512, SDXL-1024, Flux-1024
        assert range_search.rows_per_chunk(dims, 16384) * dims * 4 <= range_search.BUILD_CHUNK_BYTES
    assert range_search.rows_per_chunk(64, 16384) == 16384
    rows = torch.randn(300, 5000)
    monkeypatched = range_search.PCA_SAMPLE_BYTES
    try:
        range_search.PCA_SAMPLE_BYTES = 100 * 5000 * 4  # a sample of 100 rows: still an orthonormal basis
        basis, _ = range_search.pca_basis(rows, 8)
    finally:
        range_search.PCA_SAMPLE_BYTES = monkeypatched
    assert torch.allclose(basis.T @ basis, torch.eye(8), atol=1e-5)


# -- the pooled sketch: an orthonormal projection, so its codes bound the distance from below -------------
def test_pool_factor_at_real_latent_sizes():
    assert pooled_sketch.pool_factor((4, 64, 64)) == 4  # SD1.5-512: 4x16x16 = 1024 pooled values
    assert pooled_sketch.pool_factor((4, 128, 128)) == 8  # SDXL-1024: 4x16x16
    assert pooled_sketch.pool_factor((16, 128, 128)) == 8  # Flux-1024: 16x16x16
    assert pooled_sketch.pool_factor((16, 21, 60, 104)) == 4  # Wan video [C, T, H, W]: frames kept
    assert pooled_sketch.pool_factor((4, 8, 8)) == 1 and pooled_sketch.pool_factor((4096,)) == 1  # plain PCA codes


@pytest.mark.parametrize("shape", [(4, 32, 32), (2, 3, 16, 24)])
def test_pooled_codes_are_a_lower_bound_even_for_what_pooling_cannot_see(shape, monkeypatch):
    monkeypatch.setattr(pooled_sketch, "POOL_TARGET_DIMS", 16)  # pool 8x8 (4x4 for the 5-D shape) on small items
    generator = torch.Generator().manual_seed(9)
    rows = torch.randn(300, *shape, generator=generator).cumsum(-1).cumsum(-2)  # smooth, like latents
    sketch = pooled_sketch.PooledSketch.fit(rows.flatten(1), 6, shape)
    assert sketch.factor > 1
    checker = (torch.arange(shape[-2])[:, None] + torch.arange(shape[-1])[None, :]) % 2 * 2.0 - 1.0
    high = checker.expand(shape).flatten()  # sums to 0 in every block: invisible to the pooling
    x = rows[:40].flatten(1)
    pairs = [x[1:] - 0.0, x[:1] + 0.3 * high, x[:1] + 5.0, x[:1] * 0.0, x[:1] + 1e-3 * high]
    for z in pairs:
        bound = torch.cdist(sketch.codes(x[:1]).double(), sketch.codes(z).double())
        true = torch.cdist(x[:1].double(), z.double())
        assert bool((bound <= true * (1 + 1e-6) + 1e-6).all())
    pooled, squared, outside = sketch.split(x)
    assert torch.allclose(pooled.pow(2).sum(1) + outside.pow(2), squared, rtol=1e-9)  # U is orthonormal
    codes = sketch.codes(x).double()  # ‖code‖ = ‖x − μ‖ (Pythagoras), μ the lifted pooled mean
    lifted = sketch.mean.reshape(-1, 1).repeat_interleave(sketch.factor**2, 1)
    lifted = lifted.reshape(-1, shape[-2] // sketch.factor, shape[-1] // sketch.factor, sketch.factor, sketch.factor)
    mu = lifted.permute(0, 1, 3, 2, 4).reshape(-1) / sketch.factor
    assert torch.allclose(codes.norm(dim=1), (x.double() - mu).norm(dim=1), rtol=1e-5)


def test_clustered_search_on_pooled_latents_equals_brute_force_at_the_boundary(monkeypatch):
    monkeypatch.setattr(pooled_sketch, "POOL_TARGET_DIMS", 16)
    generator = torch.Generator().manual_seed(10)
    centres = torch.randn(6, 4, 32, 32, generator=generator).cumsum(-1).cumsum(-2) * 0.2
    shields = centres[torch.randint(0, 6, (400,), generator=generator)]
    shields = shields + torch.randn(400, 4, 32, 32, generator=generator)
    search = _clustered_search(shields, dims=8, lists=20)
    assert search.sketch.factor == 8
    flat = shields.flatten(1)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1.0).expand(4, 32, 32).flatten()
    radius = 20.0
    queries = []
    for t in (0.5, 0.99, 1.01, 1.5):  # moved by t·r along a direction pooling cannot see, and along one it can
        queries += [flat[7] + t * radius * checker / checker.norm(), flat[50] + t * radius / flat.shape[1] ** 0.5]
    queries = torch.stack(queries + [torch.full_like(flat[0], 30.0)])
    found = search.search(queries, radius)
    assert _pairs(found) == _brute_force(queries, flat, radius)
    assert {(0, 7), (1, 50), (2, 7), (3, 50)} <= _pairs(found) and not {(4, 7), (5, 50)} & _pairs(found)
