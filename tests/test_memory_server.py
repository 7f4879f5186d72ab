"""Shield Memory across restarts and across servers, with real ComfyUI servers (issue #12 items 4 and 5).

- file store: a memory written by one server is reloaded by the next; a server killed in the middle of
  writing loses only that run; a damaged memory file does not stop the server, its node names the
  file and offers the reset, and the other memories keep working.
- redis store: two ComfyUI servers share a memory through a real redis-server started here; server B's
  outputs stay >= r from what server A made earlier under the same id; appends from both servers at once
  lose nothing; killing Redis mid-run gives a clear error and loses no entry already written.
"""

import pathlib
import time

import pytest
import torch

from comfyui_shield.core.memory_file import encode_record
from comfyui_shield.core.shield_memory import FAILPOINT_MARKER_VARIABLE, FAILPOINT_VARIABLE, MemoryEntry
from comfyui_shield.core.shield_set import hash_tensor
from harness.memorizer_graphs import sparse_repellency
from harness.redis_server import RedisServer
from harness.server import ComfyServer, ServerError, free_port

RADIUS = 4.0
ITEMS = "memory_items"


def memory_graph(memory: dict, seed: int, prefix: str, steps: int = 6) -> dict:
    """Sparse Repellency shielded by a Shield Memory; the memory grows with the shielded outputs."""
    sampler = {
        "seed": seed,
        "steps": steps,
        "cfg": 1.0,
        "sampler_name": "dpmpp_2m",
        "scheduler": "karras",
        "denoise": 1.0,
        "positive": ["model", 1],
        "negative": ["model", 1],
        "latent_image": ["empty", 0],
    }
    return {
        "items": {"class_type": "LoadLatent", "inputs": {"latent": f"{ITEMS}.latent"}},
        "model": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}},
        "memory": {"class_type": "ShieldMemory", "inputs": {"reset": False, **memory}},
        "spell": sparse_repellency(["model", 0], ["memory", 0], RADIUS, search="exact"),
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "shielded": {"class_type": "KSampler", "inputs": {"model": ["spell", 0], **sampler}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["shielded", 0], "filename_prefix": prefix}},
        "plain": {"class_type": "KSampler", "inputs": {"model": ["model", 0], **sampler}},
        "save_plain": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["plain", 0], "filename_prefix": f"{prefix}_plain"},
        },
    }


def remembered(outputs: dict) -> int:
    """How many earlier outputs the Shield Memory node reported."""
    return int(outputs["memory"]["text"][0].split(": ")[1].split(" ")[0])


def min_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cdist(a.flatten(1).double(), b.flatten(1).double()).min())


def start_server(base: pathlib.Path, items: torch.Tensor, env: dict | None = None) -> ComfyServer:
    server = ComfyServer(base, extra_env=env)
    server.start()
    server.write_input_latent(ITEMS, items)
    return server


def wait_for(path: pathlib.Path, server: ComfyServer, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or server.process.poll() is not None:
            raise AssertionError(f"{path.name} never appeared:\n{server.log_tail()}")
        time.sleep(0.05)


# -- the file store ---------------------------------------------------------------------------------
def damaged_memory_file(path: pathlib.Path) -> bytes:
    entries = [MemoryEntry(f"broken #{i}", f"{i:064x}", 0.0, {}) for i in range(2)]
    record = bytearray(encode_record("LatentFormat", torch.zeros(2, 4, 8, 8), entries, 2, 0))
    record[60] ^= 0xFF  # inside the payload: the checksum fails
    data = b"SHIELD-MEMORY v1\n" + bytes(record)
    path.write_bytes(data)
    return data


def test_file_memory_survives_restarts_and_a_kill_in_the_middle_of_a_write(tmp_path, memorizer_items):
    base = tmp_path / "comfy"
    memories = base / "models" / "shield_sets" / "memories"
    night = {"memory_id": "night", "store": "file"}
    first = start_server(base, memorizer_items)
    try:
        run_1 = first.run(memory_graph(night, seed=1, prefix="night/run1"))
        run_2 = first.run(memory_graph(night, seed=2, prefix="night/run2"))
        assert (remembered(run_1), remembered(run_2)) == (0, 3)
        earlier = torch.cat([first.saved_latent(run_1, "save"), first.saved_latent(run_2, "save")])
        assert min_distance(first.saved_latent(run_2, "save"), earlier[:3]) >= RADIUS - 1e-3
    finally:
        first.kill()  # a crash, not a shutdown: nothing is flushed on the way out
    size_after_two_runs = (memories / "night.shield-memory").stat().st_size

    marker = tmp_path / "mid-write"
    env = {FAILPOINT_VARIABLE: "memory-file-mid-write:night.shield-memory", FAILPOINT_MARKER_VARIABLE: str(marker)}
    second = start_server(base, memorizer_items, env)
    try:
        second.queue(memory_graph(night, seed=3, prefix="night/run3"))
        wait_for(marker, second)  # half of run 3's record is on disk
        second.kill()
    finally:
        second.stop()
    assert (memories / "night.shield-memory").stat().st_size > size_after_two_runs

    damaged = damaged_memory_file(memories / "broken.shield-memory")
    third = start_server(base, memorizer_items)
    try:
        log = third.log()
        assert "restored memory 'night' (file) with 6 entries" in log  # reloaded at startup
        assert "broken.shield-memory is damaged" in log  # reported, and the server started anyway
        run_1_again = third.run(memory_graph(night, seed=1, prefix="night/run1_again"))
        assert remembered(run_1_again) == 6  # runs 1 and 2 kept; the killed run 3 lost, nothing else
        again = third.saved_latent(run_1_again, "save")
        assert torch.equal(third.saved_latent(run_1_again, "save_plain"), first.saved_latent(run_1, "save_plain"))
        assert min_distance(again, earlier[:3]) >= RADIUS - 1e-3  # the restored memory shields

        broken = {"memory_id": "broken", "store": "file"}
        with pytest.raises(ServerError) as error:
            third.run(memory_graph(broken, seed=4, prefix="broken/a"))
        message = str(error.value)
        assert "broken.shield-memory is damaged" in message and "reset on" in message
        assert (memories / "broken.shield-memory").read_bytes() == damaged  # nothing changed
        assert remembered(third.run(memory_graph(night, seed=5, prefix="night/run5"))) == 9  # others work
        reset_graph = memory_graph(broken, seed=4, prefix="broken/b")
        reset_graph["memory"]["inputs"]["reset"] = True
        assert remembered(third.run(reset_graph)) == 0
        aside = [p for p in memories.iterdir() if p.name.startswith("broken.shield-memory.damaged-")]
        assert len(aside) == 1 and aside[0].read_bytes() == damaged  # kept beside, never deleted
    finally:
        third.stop()


def test_refusing_memory_stops_before_sampling_when_full(server, memorizer_items):
    server.write_input_latent(ITEMS, memorizer_items)
    capped = {"memory_id": f"capped-{time.monotonic_ns()}", "store": "file", "max_items": 3, "when_full": "refuse"}
    assert remembered(server.run(memory_graph(capped, seed=1, prefix="capped/a"))) == 0
    with pytest.raises(ServerError, match=r"is full \(3 of max_items 3.*when_full is 'refuse'"):
        server.run(memory_graph(capped, seed=2, prefix="capped/b"))


def test_malformed_and_dead_redis_urls_name_redis_url(server):
    """Malformed URLs are refused at /prompt naming redis_url (they gave the redis client's "Redis URL must
    specify one of the following schemes"); a dead server answers within the client's timeouts."""

    def memory_only(url: str) -> dict:
        inputs = {"memory_id": "urls", "reset": False, "store": "redis", "redis_url": url}
        return {
            "memory": {"class_type": "ShieldMemory", "inputs": inputs},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["memory", 0]}},
        }

    for url, why in [
        ("not a url", "must start with redis://"),
        ("http://127.0.0.1:6379/0", "must start with redis://"),
        ("redis://127.0.0.1:99999/0", "has a port that is not a number from 0 to 65535"),
        ("redis://127.0.0.1:6379/zero", "has database 'zero', which is not a number"),
    ]:
        with pytest.raises(ServerError, match=rf"400.*redis_url '{url}' {why}.*; write it as redis://host:port/db"):
            server.queue(memory_only(url))
    started = time.monotonic()
    with pytest.raises(ServerError, match=r"failed or is unreachable.*fix the memory's redis_url"):
        server.run(memory_only(f"redis://127.0.0.1:{free_port()}/0"), timeout=60)
    assert time.monotonic() - started < 30


# -- the redis store: a farm of two servers ----------------------------------------------------------
def test_two_servers_share_a_memory_through_redis(server, tmp_path, memorizer_items):
    if not RedisServer.available():
        pytest.skip("redis-server is not installed: scripts/bootstrap.sh installs Debian's package when run as root")
    store = RedisServer(tmp_path / "redis")
    kill_marker = tmp_path / "before-append"
    env = {FAILPOINT_VARIABLE: "memory-redis-before-append:farm-kill", FAILPOINT_MARKER_VARIABLE: str(kill_marker)}
    server_b = None
    try:
        store.start()
        server_b = start_server(tmp_path / "comfy-b", memorizer_items, env)
        server.write_input_latent(ITEMS, memorizer_items)
        farm = {"memory_id": "farm", "store": "redis", "redis_url": store.url}
        client = store.client()

        run_a = server.run(memory_graph(farm, seed=1, prefix="farm/a"))
        run_b = server_b.run(memory_graph(farm, seed=1, prefix="farm/b"))  # the same seed: B would copy A
        a_out, b_out = server.saved_latent(run_a, "save"), server_b.saved_latent(run_b, "save")
        assert torch.equal(server.saved_latent(run_a, "save_plain"), server_b.saved_latent(run_b, "save_plain"))
        assert (remembered(run_a), remembered(run_b)) == (0, 3)
        assert min_distance(b_out, a_out) >= RADIUS - 1e-3
        assert client.llen("shield:memory:farm:order") == 6

        queued = [
            (owner, owner.queue(memory_graph(farm, seed=10 + 2 * i + j, prefix=f"farm/c{i}{j}")))
            for i in range(3)
            for j, owner in enumerate((server, server_b))
        ]
        outputs = [a_out, b_out]
        for owner, prompt_id in queued:  # both servers append at the same time
            outputs.append(owner.saved_latent(owner.wait(prompt_id)["outputs"], "save"))
        made = {hash_tensor(latent) for latent in torch.cat(outputs)}  # identical outputs count once
        stored = [item.decode() for item in client.lrange("shield:memory:farm:order", 0, -1)]
        assert len(stored) == len(set(stored)) == client.hlen("shield:memory:farm:items")
        assert set(stored) == made  # every output of every run, from both servers, and nothing else

        doomed = {"memory_id": "farm-kill", "store": "redis", "redis_url": store.url}
        server.run(memory_graph(doomed, seed=1, prefix="farm/kill_a"))  # A writes; B pauses before appending
        written = client.llen("shield:memory:farm-kill:order")
        assert written == 3
        prompt_id = server_b.queue(memory_graph(doomed, seed=2, prefix="farm/kill_b"))
        wait_for(kill_marker, server_b)  # run 2 sampled, its append is next
        store.kill()
        kill_marker.unlink()
        with pytest.raises(ServerError) as error:
            server_b.wait(prompt_id)
        message = str(error.value)
        assert f"the shared store {store.url}" in message and "unreachable" in message and "farm-kill" in message
        store.start()  # the same folder and port: Redis replays its append-only file
        client = store.client()
        assert client.llen("shield:memory:farm-kill:order") == written  # nothing already written was lost
        assert client.llen("shield:memory:farm:order") == len(made)
    finally:
        if server_b is not None:
            server_b.stop()
        store.stop()
