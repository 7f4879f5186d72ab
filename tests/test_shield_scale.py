"""Large shield sets: memory-mapped fp16 files, the clustered index (built lazily, cached, saved beside
the set), and the exactness of list pruning on adversarial cases."""

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.core import shield_files
from comfyui_shield.core.bounded_cache import BoundedCache
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes.spell import repellency_model
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers import range_search, shield_index

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
    codes = range_search.encode_codes(query, search.basis, search.mean)
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


def test_guarantee_with_a_memory_mapped_fp16_set_and_a_saved_index(tmp_path, memorizer_items, monkeypatch):
    items = memorizer_items
    monkeypatch.setattr(range_search, "AUTO_PROJECTION_MIN_SHIELDS", 4)  # auto -> clustered index on 6 shields
    monkeypatch.setattr(shield_index, "INDEX_STATES", BoundedCache(4))
    path = tmp_path / "protected.safetensors"
    shield_files.save_shield_set(from_latents(items, "LatentFormat"), path, storage="float16")
    stored = shield_files.load_shield_set(path)
    conditioning = subset_conditioning(len(items))

    def run(shield_set):
        model = repellency_model(
            build_memorizer(items), shield_set, None, RADIUS, "absolute", 1.6, False, 0.0, 1.0, "auto"
        )
        latent = {"samples": torch.zeros(4, *items.shape[1:])}
        (out,) = comfy_nodes.common_ksampler(model, 3, 8, 1.0, "euler", "normal", conditioning, conditioning, latent)
        return out["samples"]

    out = run(stored)
    fp16_shields = stored.latents.float().flatten(1).double()
    assert float(torch.cdist(out.flatten(1).double(), fp16_shields).min()) >= RADIUS - 1e-4
    index_file = shield_files.index_path_for(str(path))
    assert index_file.is_file()
    # a fresh process (empty RAM cache) reads the saved index instead of rebuilding it
    monkeypatch.setattr(shield_index, "INDEX_STATES", BoundedCache(4))
    builds = []
    real_build = shield_index.ClusteredProjectionSearch.build_state
    monkeypatch.setattr(
        shield_index.ClusteredProjectionSearch,
        "build_state",
        staticmethod(lambda *a, **k: builds.append(1) or real_build(*a, **k)),
    )
    assert torch.equal(run(shield_files.load_shield_set(path)), out) and builds == []
    # the set changes under the same name: the stale index is not used, it is rebuilt and replaced
    shield_files.save_shield_set(from_latents(items.flip(0) * 1.01, "LatentFormat"), path, storage="float16")
    changed = shield_files.load_shield_set(path)
    moved = run(changed)
    assert builds == [1]
    assert (
        float(torch.cdist(moved.flatten(1).double(), changed.latents.float().flatten(1).double()).min())
        >= RADIUS - 1e-4
    )
    assert shield_files.load_index(index_file, "stale key") is None
