"""The Shield Memory: named shield sets that grow with every finished generation (SPELL §4.2: repel from
previous batches; ProCreate §4: a growing reference set), in one of three stores.

- "server": in this ComfyUI process, until it restarts (the default; nothing to set up).
- "file": an append-only log in models/shield_sets/memories/<id>.shield-memory that survives restarts
  (core/memory_file.py: a kill during a write loses at most that write, never earlier entries).
- "redis": a Redis server shared by a farm of ComfyUI servers (core/memory_redis.py: each append is one
  atomic script, so concurrent appends from several servers are safe).

Every store behaves the same: an append adds the latents not already remembered (same sha256 as an
entry), then applies the cap — drop the oldest entries, or refuse the whole append — and changes the
memory's version, which the Shield Memory node fingerprints. A memory is named by a key: the plain
memory id for the server store, "file:<id>" and "redis:<id>" for the others, so the key that travels
in a shield set's settings ("shield_memory_id") says where to append. Plain torch; no ComfyUI import.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import threading
import time
import urllib.parse
from typing import Mapping, Optional, Sequence

import torch

from .shield_set import ShieldSet, ShieldSetError, hash_tensor

STORES = ("server", "file", "redis")
WHEN_FULL = ("drop oldest", "refuse")
DEFAULT_CAP = 4096
MAX_CAP = 10_000_000
# Ids of stored memories become file names and Redis keys: plain, portable characters only.
STORED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SETTINGS_KEY = "shield_memory_id"


# Crash tests only (tests/test_memory_server.py): SHIELD_TEST_FAILPOINT names a point where a store
# stops, touches the file SHIELD_TEST_FAILPOINT_MARKER and waits while it exists (at most 10 minutes),
# so a test can kill a process or a store at that exact moment. Never set them anywhere else.
FAILPOINT_VARIABLE = "SHIELD_TEST_FAILPOINT"
FAILPOINT_MARKER_VARIABLE = "SHIELD_TEST_FAILPOINT_MARKER"


def failpoint(name: str) -> None:
    if os.environ.get(FAILPOINT_VARIABLE) != name or not os.environ.get(FAILPOINT_MARKER_VARIABLE):
        return
    marker = pathlib.Path(os.environ[FAILPOINT_MARKER_VARIABLE])
    marker.touch()
    deadline = time.monotonic() + 600
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


class ShieldMemoryError(ShieldSetError):
    """A memory that cannot be read or written as asked; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class MemorySpec:
    """Where a memory lives and how it is capped, as the Shield Memory node's inputs say."""

    memory_id: str
    store: str = "server"
    cap: int = DEFAULT_CAP
    when_full: str = "drop oldest"
    redis_url: str = ""

    def __post_init__(self):
        where = f"Shield Memory '{self.memory_id}'"
        if not self.memory_id.strip():
            raise ShieldMemoryError("Shield Memory: memory_id is empty; give the memory a name")
        if self.store not in STORES:
            raise ShieldMemoryError(f"{where}: store must be one of {', '.join(STORES)}, got {self.store!r}")
        if self.store != "server" and not STORED_ID.fullmatch(self.memory_id):
            raise ShieldMemoryError(
                f"{where}: a memory kept in a {self.store} store needs an id of letters, digits, '_', '-' and "
                f"'.' (up to 100, starting with a letter or digit): it names a file or a Redis key. Rename it"
            )
        if self.store == "redis" and self.redis_url and redis_url_problem(self.redis_url):
            raise ShieldMemoryError(
                f"{where}: redis_url {self.redis_url!r} {redis_url_problem(self.redis_url)}; write it as "
                f"redis://host:port/db (e.g. redis://10.0.0.5:6379/0), rediss:// for TLS, or leave it empty"
            )
        if self.store == "server" and self.memory_id.startswith(("file:", "redis:")):
            raise ShieldMemoryError(f"{where}: ids starting with 'file:' or 'redis:' are reserved; rename it")
        if not isinstance(self.cap, int) or isinstance(self.cap, bool) or not 1 <= self.cap <= MAX_CAP:
            raise ShieldMemoryError(f"{where}: max_items must be a whole number from 1 to {MAX_CAP}, got {self.cap!r}")
        if self.when_full not in WHEN_FULL:
            raise ShieldMemoryError(f"{where}: when_full must be one of {', '.join(WHEN_FULL)}, got {self.when_full!r}")

    @property
    def key(self) -> str:
        return self.memory_id if self.store == "server" else f"{self.store}:{self.memory_id}"

    def describe(self) -> str:
        where = {"server": "this server", "file": "file", "redis": "redis"}[self.store]
        return f"memory '{self.memory_id}' ({where})"


def redis_url_problem(url: str) -> Optional[str]:
    """What makes `url` unusable as a Redis URL (the redis client's own rules), or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must start with redis://, rediss:// or unix://"
    try:
        _ = parts.port  # urllib raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        return "has a port that is not a number from 0 to 65535"
    if parts.scheme == "unix":
        return None if parts.path else "names no socket path"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return f"has database {database!r}, which is not a number"
    return None


@dataclasses.dataclass(frozen=True)
class MemoryEntry:
    """One remembered output, for code that asks what a memory holds (reports, certificates, risk)."""

    name: str
    hash: str
    added: float  # unix time of the append
    info: Mapping[str, object]  # what the writer said about the run (may be empty)


@dataclasses.dataclass(frozen=True)
class MemoryContents:
    """A memory as stored: rows in append order, oldest first."""

    latent_format: str
    latents: torch.Tensor  # [N, ...] float32; [0, 0, 0, 0] when empty
    entries: tuple[MemoryEntry, ...]

    @staticmethod
    def empty() -> "MemoryContents":
        return MemoryContents("", torch.zeros(0, 0, 0, 0), ())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def hashes(self) -> set[str]:
        return {entry.hash for entry in self.entries}

    def as_shield_set(self, key: str) -> ShieldSet:
        return ShieldSet(
            latents=self.latents,
            latent_format=self.latent_format,
            names=tuple(entry.name for entry in self.entries),
            hashes=tuple(entry.hash for entry in self.entries),
            settings={SETTINGS_KEY: key},
        )

    def extended(self, latent_format: str, latents: torch.Tensor, entries: Sequence[MemoryEntry]) -> "MemoryContents":
        if not len(self):
            return MemoryContents(latent_format, latents, tuple(entries))
        return MemoryContents(self.latent_format, torch.cat([self.latents, latents]), self.entries + tuple(entries))

    def without_oldest(self, count: int) -> "MemoryContents":
        if count <= 0:
            return self
        if count >= len(self):
            return MemoryContents.empty()
        return MemoryContents(self.latent_format, self.latents[count:].clone(), self.entries[count:])


@dataclasses.dataclass(frozen=True)
class AppendPlan:
    """What an append does: which of the new latents are fresh, and how many old entries it drops."""

    fresh: list[int]
    hashes: list[str]
    drop_oldest: int


def plan_append(spec: MemorySpec, contents: MemoryContents, latent_format: str, latents: torch.Tensor) -> AppendPlan:
    """Deduplicate against the memory and within the batch, check compatibility, apply the cap."""
    check_compatible(spec, contents, latent_format, tuple(latents.shape[1:]))
    known = contents.hashes
    fresh, hashes = [], []
    for index, latent in enumerate(latents):
        item_hash = hash_tensor(latent)
        if item_hash not in known:
            known.add(item_hash)
            fresh.append(index)
            hashes.append(item_hash)
    size = len(contents) + len(fresh)
    if fresh and size > spec.cap and spec.when_full == "refuse":
        raise full_error(spec, len(contents), len(fresh))
    return AppendPlan(fresh, hashes, max(0, size - spec.cap))


def check_compatible(spec: MemorySpec, contents: MemoryContents, latent_format: str, item_shape: tuple) -> None:
    if not len(contents):
        return
    if latent_format != contents.latent_format or item_shape != tuple(contents.latents.shape[1:]):
        raise ShieldMemoryError(
            f"Shield Memory: {spec.describe()} holds {contents.latent_format} latents "
            f"{list(contents.latents.shape[1:])}, but this run made {latent_format} latents {list(item_shape)}. "
            f"Use another memory_id for this model or size, or reset the memory"
        )


def full_error(spec: MemorySpec, size: int, adding: int) -> ShieldMemoryError:
    return ShieldMemoryError(
        f"Shield Memory: {spec.describe()} is full ({size} of max_items {spec.cap}; this run adds {adding}) and "
        f"when_full is 'refuse'. Raise max_items, reset the memory, or set when_full to 'drop oldest'"
    )


def new_entries(spec: MemorySpec, hashes: Sequence[str], first_number: int, info: Optional[Mapping]) -> list:
    now = time.time()
    return [
        MemoryEntry(f"{spec.memory_id} #{first_number + index}", item_hash, now, dict(info or {}))
        for index, item_hash in enumerate(hashes)
    ]


class ProcessStore:
    """Memories in this process: gone at restart."""

    def __init__(self):
        self._contents: dict[str, MemoryContents] = {}
        self._numbers: dict[str, int] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def version(self, spec: MemorySpec) -> str:
        with self._lock:
            return str(self._versions.get(spec.key, 0))

    def read(self, spec: MemorySpec) -> MemoryContents:
        with self._lock:
            return self._contents.get(spec.key, MemoryContents.empty())

    def reset(self, spec: MemorySpec) -> None:
        with self._lock:
            self._contents.pop(spec.key, None)
            self._numbers.pop(spec.key, None)
            self._versions[spec.key] = self._versions.get(spec.key, 0) + 1

    def append(self, spec: MemorySpec, latent_format: str, latents: torch.Tensor, info: Optional[Mapping]) -> int:
        with self._lock:
            contents = self._contents.get(spec.key, MemoryContents.empty())
            plan = plan_append(spec, contents, latent_format, latents)
            if not plan.fresh:
                return 0
            number = self._numbers.get(spec.key, len(contents))
            entries = new_entries(spec, plan.hashes, number, info)
            contents = contents.extended(latent_format, latents[plan.fresh], entries)
            self._contents[spec.key] = contents.without_oldest(plan.drop_oldest)
            self._numbers[spec.key] = number + len(plan.fresh)
            self._versions[spec.key] = self._versions.get(spec.key, 0) + 1
            return len(plan.fresh)


class ShieldMemory:
    """The memories of this process, whatever their store; `MEMORY` is the one instance.

    The Shield Memory node opens a memory with its spec (`open`) and hands the key on in the shield
    set's settings; patches append their final outputs and read the memory by that key."""

    def __init__(self):
        self._specs: dict[str, MemorySpec] = {}
        self._lock = threading.Lock()
        self.process = ProcessStore()
        self._stores: dict[str, object] = {"server": self.process}

    # -- configuration ----------------------------------------------------------------------------
    def attach_store(self, name: str, store) -> None:
        """Give a store kind its backend (the file store needs ComfyUI's models folder, the Redis store
        the redis package): done by the nodes at import."""
        self._stores[name] = store

    def open(self, spec: MemorySpec) -> str:
        """Register how a memory is kept and capped; returns its key."""
        self._store_for(spec)
        with self._lock:
            self._specs[spec.key] = spec
        return spec.key

    def spec(self, key: str) -> MemorySpec:
        with self._lock:
            spec = self._specs.get(key)
        if spec is not None:
            return spec
        store, _, memory_id = key.partition(":") if key.startswith(("file:", "redis:")) else ("server", "", key)
        if store == "redis":
            raise ShieldMemoryError(
                f"Shield Memory: memory {key!r} has not been opened in this server; run its Shield Memory node"
            )
        return MemorySpec(memory_id or key, store)

    def _store_for(self, spec: MemorySpec):
        store = self._stores.get(spec.store)
        if store is None:
            raise ShieldMemoryError(f"Shield Memory: the {spec.store} store is not available in this server")
        return store

    # -- the memory API (by key) --------------------------------------------------------------------
    def version(self, key: str) -> str:
        spec = self.spec(key)
        return self._store_for(spec).version(spec)

    def contents(self, key: str) -> MemoryContents:
        spec = self.spec(key)
        return self._store_for(spec).read(spec)

    def snapshot(self, key: str) -> ShieldSet:
        """The memory as a shield set now; an empty memory is a set of 0 shields without a shape yet."""
        return self.contents(key).as_shield_set(key)

    def entries(self, key: str) -> tuple[MemoryEntry, ...]:
        return self.contents(key).entries

    def reset(self, key: str) -> None:
        spec = self.spec(key)
        self._store_for(spec).reset(spec)

    def append(self, key: str, latent_format: str, latents: torch.Tensor, info: Optional[Mapping] = None) -> int:
        """Remember a run's final latents (LATENT space); returns how many were new. A latent already
        remembered (same hash) is skipped, so two patches sharing one memory remember each output once."""
        spec = self.spec(key)
        latents = latents.detach().to("cpu", torch.float32).contiguous()
        if latents.shape[0] == 0:
            return 0
        if not torch.isfinite(latents).all():
            raise ShieldMemoryError(f"Shield Memory: {spec.describe()}: the outputs contain NaN or inf; not remembered")
        return self._store_for(spec).append(spec, latent_format, latents, info)


MEMORY = ShieldMemory()
