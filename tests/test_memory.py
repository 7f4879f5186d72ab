"""The Shield Memory stores in-process (issue #12 items 4 and 5): the same behaviour from every store
(deduplication, cap with drop-oldest or refuse, format checks, reset, what a memory holds), the file
store's crash safety and damage reports, and concurrent appends from several processes to one file and
to one real redis-server. The servers' side is in test_memory_server.py."""

import multiprocessing
import uuid

import pytest
import torch

from comfyui_shield.core.memory_file import FileStore, encode_record
from comfyui_shield.core.memory_redis import RedisStore
from comfyui_shield.core.shield_memory import MemorySpec, ShieldMemory, ShieldMemoryError


def latents(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def memory(tmp_path):
    """A fresh set of memories of every store kind (the file store in the test's folder)."""
    instance = ShieldMemory()
    instance.attach_store("file", FileStore(lambda: tmp_path / "memories"))
    instance.attach_store("redis", RedisStore())
    return instance


@pytest.fixture(params=["server", "file", "redis"])
def open_memory(request, memory):
    """open_memory(cap=..., when_full=...) -> key of a new memory in the parametrized store."""

    def opener(**fields) -> str:
        url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
        return memory.open(MemorySpec(f"m-{uuid.uuid4().hex[:10]}", request.param, redis_url=url, **fields))

    return opener


def test_every_store_remembers_each_output_once(memory, open_memory):
    key = open_memory()
    empty_version = memory.version(key)
    assert len(memory.snapshot(key)) == 0
    batch = latents(3, 0)
    assert memory.append(key, "SD15", batch, info={"prompt": "p1"}) == 3
    assert memory.version(key) != empty_version
    version = memory.version(key)
    assert memory.append(key, "SD15", torch.cat([batch[:2], batch[:1]])) == 0  # already remembered
    assert memory.version(key) == version
    snapshot = memory.snapshot(key)
    assert torch.equal(snapshot.latents, batch) and snapshot.settings["shield_memory_id"] == key
    entries = memory.entries(key)
    assert [entry.name.rsplit(" ", 1)[1] for entry in entries] == ["#0", "#1", "#2"]
    assert entries[0].info == {"prompt": "p1"} and entries[0].added > 0
    with pytest.raises(ShieldMemoryError, match=r"holds SD15 latents \[4, 8, 8\].*SDXL latents"):
        memory.append(key, "SDXL", latents(1, 1))
    memory.reset(key)
    assert len(memory.snapshot(key)) == 0
    assert memory.append(key, "SDXL", latents(1, 1)) == 1  # after a reset, any format


def test_the_cap_drops_the_oldest_or_refuses(memory, open_memory):
    dropping = open_memory(cap=3)
    first, second = latents(2, 1), latents(2, 2)
    memory.append(dropping, "SD15", first)
    memory.append(dropping, "SD15", second)
    assert torch.equal(memory.snapshot(dropping).latents, torch.cat([first[1:], second]))
    assert [entry.name.rsplit("#", 1)[1] for entry in memory.entries(dropping)] == ["1", "2", "3"]

    refusing = open_memory(cap=3, when_full="refuse")
    memory.append(refusing, "SD15", first)
    with pytest.raises(ShieldMemoryError, match=r"is full \(2 of max_items 3; this run adds 2\).*drop oldest"):
        memory.append(refusing, "SD15", second)
    assert torch.equal(memory.snapshot(refusing).latents, first)  # nothing of the refused run was kept
    assert memory.append(refusing, "SD15", second[:1]) == 1


def test_ids_of_stored_memories_must_be_file_and_key_safe():
    for bad in ("../x", "a/b", "", " x", "x" * 101):
        with pytest.raises(ShieldMemoryError):
            MemorySpec(bad, "file")
    assert MemorySpec("any text, even spaces", "server").key == "any text, even spaces"
    assert MemorySpec("night-run_2.v1", "redis").key == "redis:night-run_2.v1"
    with pytest.raises(ShieldMemoryError, match="max_items"):
        MemorySpec("x", "file", cap=0)


# -- the file store ---------------------------------------------------------------------------------
def test_a_write_cut_short_loses_only_that_write(memory, tmp_path):
    key = memory.open(MemorySpec("torn", "file"))
    kept = latents(4, 3)
    memory.append(key, "SD15", kept)
    path = tmp_path / "memories" / "torn.shield-memory"
    good_size = path.stat().st_size
    from comfyui_shield.core.shield_memory import MemoryEntry

    record = encode_record("SD15", latents(2, 4), [MemoryEntry(f"torn #{i}", f"h{i}", 0.0, {}) for i in (4, 5)], 6, 0)
    for cut in (10, len(record) // 2, len(record) - 1):  # inside the record header, the payload, the last byte
        with open(path, "r+b") as handle:
            handle.truncate(good_size)
            handle.seek(good_size)
            handle.write(record[:cut])
        fresh = ShieldMemory()  # a new process reading the file
        fresh.attach_store("file", FileStore(lambda: tmp_path / "memories"))
        assert torch.equal(fresh.snapshot(key).latents, kept)
    assert fresh.append(key, "SD15", latents(1, 5)) == 1  # the next writer cuts the partial record off
    assert path.stat().st_size > good_size and len(fresh.snapshot(key)) == 5
    reread = ShieldMemory()
    reread.attach_store("file", FileStore(lambda: tmp_path / "memories"))
    assert torch.equal(reread.snapshot(key).latents[:4], kept) and len(reread.snapshot(key)) == 5


@pytest.mark.parametrize("damage", ["checksum", "header", "record magic"])
def test_a_damaged_file_names_itself_offers_the_reset_and_touches_nothing_else(memory, tmp_path, damage):
    key = memory.open(MemorySpec("bad", "file"))
    other = memory.open(MemorySpec("other", "file"))
    memory.append(key, "SD15", latents(2, 6))
    memory.append(key, "SD15", latents(2, 7))
    memory.append(other, "SD15", latents(2, 8))
    path = tmp_path / "memories" / "bad.shield-memory"
    data = bytearray(path.read_bytes())
    position = {"checksum": 100, "header": 3, "record magic": 17}[damage]
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = ShieldMemory()
    fresh.attach_store("file", FileStore(lambda: tmp_path / "memories"))
    with pytest.raises(ShieldMemoryError, match=r"the memory file .*bad.shield-memory is damaged.*reset on") as error:
        fresh.snapshot(key)
    assert "Nothing was changed" in str(error.value) and path.read_bytes() == bytes(data)
    with pytest.raises(ShieldMemoryError, match="damaged"):
        fresh.append(key, "SD15", latents(1, 9))  # a write never builds on a damaged file
    assert len(fresh.snapshot(other)) == 2  # other memories are not affected
    fresh.reset(key)
    assert len(fresh.snapshot(key)) == 0
    aside = [p for p in path.parent.iterdir() if p.name.startswith("bad.shield-memory.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bytes(data)  # kept, not deleted
    assert fresh.append(key, "SD15", latents(1, 9)) == 1


def test_the_file_is_compacted_when_dropped_entries_dominate(memory, tmp_path):
    key = memory.open(MemorySpec("compact", "file", cap=4))
    path = tmp_path / "memories" / "compact.shield-memory"
    sizes = []
    for seed in range(600):
        memory.append(key, "SD15", latents(1, 100 + seed))
        sizes.append(path.stat().st_size)
    assert max(sizes) < 300 * 1500  # one latent record is ~1.3 kB: the file never held all 600
    fresh = ShieldMemory()
    fresh.attach_store("file", FileStore(lambda: tmp_path / "memories"))
    expected = torch.cat([latents(1, 100 + seed) for seed in range(596, 600)])
    assert torch.equal(fresh.snapshot(key).latents, expected)
    assert [entry.name for entry in fresh.entries(key)] == [f"compact #{n}" for n in range(596, 600)]


def _append_many(store_kind: str, folder: str, url: str, memory_id: str, seed: int, count: int) -> None:
    import pathlib

    memory = ShieldMemory()
    memory.attach_store("file", FileStore(lambda: pathlib.Path(folder)))
    memory.attach_store("redis", RedisStore())
    key = memory.open(MemorySpec(memory_id, store_kind, redis_url=url))
    for index in range(count):
        memory.append(key, "SD15", latents(1, seed * 1000 + index), info={"writer": seed})


@pytest.mark.parametrize("store_kind", ["file", "redis"])
def test_concurrent_appends_from_several_processes_lose_nothing(tmp_path, request, store_kind):
    url = request.getfixturevalue("redis_server").url if store_kind == "redis" else ""
    memory_id = f"shared-{uuid.uuid4().hex[:8]}"
    context = multiprocessing.get_context("fork")
    writers = [
        context.Process(target=_append_many, args=(store_kind, str(tmp_path / "memories"), url, memory_id, seed, 25))
        for seed in range(4)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=120)
        assert writer.exitcode == 0
    memory = ShieldMemory()
    memory.attach_store("file", FileStore(lambda: tmp_path / "memories"))
    memory.attach_store("redis", RedisStore())
    key = memory.open(MemorySpec(memory_id, store_kind, redis_url=url))
    entries = memory.entries(key)
    assert len(entries) == 100 and len({entry.hash for entry in entries}) == 100
    assert sorted(entry.name for entry in entries) == sorted(f"{memory_id} #{n}" for n in range(100))
    for writer_seed in range(4):  # each writer's entries are in its own order
        mine = [entry for entry in entries if entry.info == {"writer": writer_seed}]
        snapshot = memory.snapshot(key)
        rows = [snapshot.hashes.index(entry.hash) for entry in mine]
        assert rows == sorted(rows) and len(mine) == 25
