"""The Redis store of the Shield Memory: one memory shared by a farm of ComfyUI servers.

Keys of memory <id> (prefix "shield:memory:<id>:"):
- "order": a list of entry hashes, oldest first;
- "items": a hash, entry hash -> "<number>|<payload>", the payload being safetensors bytes of the latent
  with the append time and the writer's info as metadata (nothing is pickled);
- "meta": a hash with latent_format, item_shape, the next entry number and the version.

An append is one Lua script, which Redis runs atomically: deduplication against what every server
wrote, the format check, the cap (drop the oldest or refuse the whole append) and the version bump
happen together, so appends from several servers at once neither lose nor duplicate entries. Durability
is the Redis server's: run it with `appendonly yes` and `appendfsync always` (README) and an entry
acknowledged to a server survives a kill of Redis. A server reads only the entries it does not hold yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import threading
import time
from typing import Mapping, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ..optional_deps import require
from .shield_memory import MemoryContents, MemoryEntry, MemorySpec, ShieldMemoryError, failpoint, full_error
from .shield_set import hash_tensor

URL_VARIABLE = "SHIELD_MEMORY_REDIS_URL"
DEFAULT_URL = "redis://127.0.0.1:6379/0"
KEY_PREFIX = "shield:memory:"
FETCH_CHUNK = 256

# KEYS: order, items, meta. ARGV: latent_format, item_shape, cap, when_full, count, then count pairs of
# (entry hash, payload). Returns {"ok", added, version, size}, {"full", size} or {"mismatch", format, shape}.
APPEND_SCRIPT = """
local size = redis.call('LLEN', KEYS[1])
local stored_format = redis.call('HGET', KEYS[3], 'latent_format')
local stored_shape = redis.call('HGET', KEYS[3], 'item_shape')
if size > 0 and stored_format and (stored_format ~= ARGV[1] or stored_shape ~= ARGV[2]) then
  return {'mismatch', stored_format, stored_shape}
end
local cap = tonumber(ARGV[3])
local count = tonumber(ARGV[5])
local fresh, seen = {}, {}
for i = 0, count - 1 do
  local item = ARGV[6 + 2 * i]
  if not seen[item] and redis.call('HEXISTS', KEYS[2], item) == 0 then
    seen[item] = true
    table.insert(fresh, i)
  end
end
if #fresh == 0 then
  return {'ok', 0, redis.call('HGET', KEYS[3], 'version') or '0', size}
end
if ARGV[4] == 'refuse' and size + #fresh > cap then
  return {'full', size}
end
for _, i in ipairs(fresh) do
  local number = redis.call('HINCRBY', KEYS[3], 'next', 1) - 1
  redis.call('HSET', KEYS[2], ARGV[6 + 2 * i], number .. '|' .. ARGV[7 + 2 * i])
  redis.call('RPUSH', KEYS[1], ARGV[6 + 2 * i])
end
redis.call('HSET', KEYS[3], 'latent_format', ARGV[1], 'item_shape', ARGV[2])
while redis.call('LLEN', KEYS[1]) > cap do
  redis.call('HDEL', KEYS[2], redis.call('LPOP', KEYS[1]))
end
local version = redis.call('HINCRBY', KEYS[3], 'version', 1)
return {'ok', #fresh, tostring(version), redis.call('LLEN', KEYS[1])}
"""


def default_url() -> str:
    return os.environ.get(URL_VARIABLE, "").strip() or DEFAULT_URL


@dataclasses.dataclass
class _Cached:
    version: Optional[str] = None
    contents: MemoryContents = dataclasses.field(default_factory=MemoryContents.empty)
    rows: dict = dataclasses.field(default_factory=dict)  # entry hash -> (latent, MemoryEntry)


class RedisStore:
    def __init__(self):
        self._clients: dict[str, object] = {}
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._lock = threading.Lock()

    # -- the store API ------------------------------------------------------------------------------
    def version(self, spec: MemorySpec) -> str:
        with self._errors(spec):
            return (self._client(spec).hget(self._key(spec, "meta"), "version") or b"0").decode()

    def read(self, spec: MemorySpec) -> MemoryContents:
        keys = [self._key(spec, name) for name in ("order", "items", "meta")]
        with self._errors(spec):
            client = self._client(spec)
            pipe = client.pipeline(transaction=True)
            pipe.hget(keys[2], "version")
            pipe.lrange(keys[0], 0, -1)
            pipe.hget(keys[2], "latent_format")
            version, order, latent_format = pipe.execute()
            version = (version or b"0").decode()
            with self._lock:
                cached = self._cache.setdefault((spec.redis_url, spec.memory_id), _Cached())
                if cached.version == version:
                    return cached.contents
                missing = [item for item in order if item.decode() not in cached.rows]
            fetched = {}
            for start in range(0, len(missing), FETCH_CHUNK):
                chunk = missing[start : start + FETCH_CHUNK]
                fetched.update(zip(chunk, client.hmget(keys[1], chunk), strict=True))
        rows = {}
        with self._lock:
            for item in order:
                name = item.decode()
                if name in cached.rows:
                    rows[name] = cached.rows[name]
                elif fetched.get(item) is not None:  # None: dropped by another server since the listing
                    rows[name] = decode_item(spec, name, fetched[item])
            contents = MemoryContents.empty()
            if rows:
                latents = torch.stack([latent for latent, _ in rows.values()])
                entries = tuple(entry for _, entry in rows.values())
                contents = MemoryContents(latent_format.decode(), latents, entries)
            self._cache[(spec.redis_url, spec.memory_id)] = _Cached(version, contents, rows)
            return contents

    def append(self, spec: MemorySpec, latent_format: str, latents: torch.Tensor, info: Optional[Mapping]) -> int:
        now = time.time()
        arguments = [latent_format, json.dumps(list(latents.shape[1:])), spec.cap, spec.when_full, latents.shape[0]]
        for latent in latents:
            arguments += [hash_tensor(latent), encode_item(latent, now, info)]
        keys = [self._key(spec, name) for name in ("order", "items", "meta")]
        failpoint(f"memory-redis-before-append:{spec.memory_id}")
        with self._errors(spec):
            client = self._client(spec)
            result = client.register_script(APPEND_SCRIPT)(keys=keys, args=arguments, client=client)
        status = result[0].decode()
        if status == "full":
            raise full_error(spec, int(result[1]), latents.shape[0])
        if status == "mismatch":
            raise ShieldMemoryError(
                f"Shield Memory: {spec.describe()} holds {result[1].decode()} latents {result[2].decode()}, but this "
                f"run made {latent_format} latents {list(latents.shape[1:])}. Use another memory_id for this model "
                f"or size, or reset the memory"
            )
        return int(result[1])

    def reset(self, spec: MemorySpec) -> None:
        with self._errors(spec):
            pipe = self._client(spec).pipeline(transaction=True)
            pipe.delete(self._key(spec, "order"), self._key(spec, "items"))
            pipe.hdel(self._key(spec, "meta"), "latent_format", "item_shape", "next")
            pipe.hincrby(self._key(spec, "meta"), "version", 1)
            pipe.execute()

    # -- plumbing -----------------------------------------------------------------------------------
    @staticmethod
    def _key(spec: MemorySpec, name: str) -> str:
        return f"{KEY_PREFIX}{spec.memory_id}:{name}"

    def _client(self, spec: MemorySpec):
        redis = require("redis", "Shield Memory with store 'redis'")
        with self._lock:
            client = self._clients.get(spec.redis_url)
            if client is None:
                try:
                    client = redis.Redis.from_url(spec.redis_url, socket_connect_timeout=3, socket_timeout=10)
                except ValueError as error:  # the client's own URL rules, beyond redis_url_problem's
                    raise ShieldMemoryError(
                        f"Shield Memory: redis_url {spec.redis_url!r} of {spec.describe()} cannot be used ({error}); "
                        f"write it as redis://host:port/db, e.g. redis://10.0.0.5:6379/0"
                    ) from error
                self._clients[spec.redis_url] = client
            return client

    def _errors(self, spec: MemorySpec):
        return _RedisErrors(spec)


class _RedisErrors:
    """Turns the redis client's errors into one message: which store, which memory, what to do."""

    def __init__(self, spec: MemorySpec):
        self.spec = spec

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is None or not _is_redis_error(error):
            return False
        raise ShieldMemoryError(
            f"Shield Memory: the shared store {self.spec.redis_url} of {self.spec.describe()} failed or is "
            f"unreachable ({type(error).__name__}: {error}). Entries it already acknowledged are kept there. Start "
            f"or restart that Redis server, or fix the memory's redis_url (or {URL_VARIABLE}), then queue again"
        ) from error


def _is_redis_error(error: BaseException) -> bool:
    return any(cls.__module__.startswith("redis") and cls.__name__ == "RedisError" for cls in type(error).__mro__)


def encode_item(latent: torch.Tensor, added: float, info: Optional[Mapping]) -> bytes:
    metadata = {"added": repr(added), "info": json.dumps(dict(info or {}), default=str)}
    return save_safetensors({"latent": latent.contiguous().float()}, metadata=metadata)


def decode_item(spec: MemorySpec, item_hash: str, stored: bytes) -> tuple[torch.Tensor, MemoryEntry]:
    try:
        number, payload = stored.split(b"|", 1)
        (header_size,) = struct.unpack("<Q", payload[:8])
        metadata = json.loads(payload[8 : 8 + header_size]).get("__metadata__", {})
        latent = load_safetensors(payload)["latent"].float()
        entry = MemoryEntry(
            f"{spec.memory_id} #{int(number)}", item_hash, float(metadata["added"]), json.loads(metadata["info"])
        )
    except Exception as error:  # damaged bytes: json, struct, int() and safetensors raise many types
        raise ShieldMemoryError(
            f"Shield Memory: entry {item_hash[:12]} of {spec.describe()} in the shared store is damaged "
            f"({type(error).__name__}: {error}); reset the memory (Shield Memory node, reset on)"
        ) from error
    return latent, entry
