"""One bounded, thread-safe cache for every process-wide store of the pack (no ComfyUI import).

A ComfyUI server lives for days and runs many prompts, so every cache it keeps across prompts (index
states, reference embeddings, the patch -> graph node map, encoded image sets) must stay bounded.
Least recently used entries go first.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Hashable, Optional, TypeVar

Key = TypeVar("Key", bound=Hashable)
Value = TypeVar("Value")


class BoundedCache(Generic[Key, Value]):
    """At most `max_entries` entries; reading or writing an entry makes it the newest."""

    def __init__(self, max_entries: int):
        if max_entries < 1:
            raise ValueError(f"a bounded cache needs room for at least one entry, got {max_entries}")
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Key, Value] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Key) -> Optional[Value]:
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Key, value: Value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def get_or_build(self, key: Key, build: Callable[[], Value]) -> Value:
        """The cached value, else `build()` stored under `key`. `build` runs outside the lock (it may be
        slow), so two threads may both build a missing entry; the second result is kept."""
        value = self.get(key)
        if value is None:
            value = build()
            self.put(key, value)
        return value

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
