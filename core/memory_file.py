"""The file store of the Shield Memory: one append-only log per memory, <folder>/<id>.shield-memory.

Layout: a 17-byte file header, then records. A record is a 44-byte header (b"SMR1", the payload length
as 8-byte little-endian, the payload's sha256) and the payload: safetensors bytes holding the appended
latents and, as metadata, their hashes, numbers, times and the writer's info, plus how many of the
oldest entries the append dropped (the cap). Nothing is pickled.

Crash safety: an append is one record, written with one write() at the end of the file and fsynced
before the append returns. A kill during that write leaves a shorter last record (its length runs past
the end of the file): it is the run in progress, and the next reader ignores it and the next writer cuts
it off. A record that is complete but fails its checksum, or a bad header, is damage: reading the memory
is then an error naming the file, and a reset moves the file aside (kept, never deleted) and starts
again. Appends lock the file (fcntl.flock, where the OS has it), so two processes can share one file.
When the dropped entries outnumber the kept ones, the file is rewritten with the kept entries only
(a temp file renamed over it: a crash leaves the old file). Plain torch + safetensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import struct
import tempfile
import threading
import time
from typing import Callable, Mapping, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .shield_memory import (
    FAILPOINT_VARIABLE,
    MemoryContents,
    MemoryEntry,
    MemorySpec,
    ShieldMemoryError,
    failpoint,
    plan_append,
)

try:
    import fcntl
except ImportError:  # Windows: one process per memory file
    fcntl = None

logger = logging.getLogger(__name__)

SUFFIX = ".shield-memory"
FILE_HEADER = b"SHIELD-MEMORY v1\n"
RECORD_MAGIC = b"SMR1"
RECORD_HEADER = struct.Struct("<4sQ32s")
MIN_ENTRIES_TO_COMPACT = 256


@dataclasses.dataclass(frozen=True)
class _FileState:
    """What this process has read of one memory file."""

    inode: int
    good_end: int  # the byte after the last complete record
    size: int  # the file size when read (> good_end: a torn last record)
    contents: MemoryContents
    next_number: int
    dropped: int  # entries in the file that a later record dropped (compaction when many)


class FileStore:
    def __init__(self, folder: Callable[[], pathlib.Path]):
        self._folder = folder
        self._states: dict[pathlib.Path, _FileState] = {}
        self._lock = threading.RLock()

    def path(self, spec: MemorySpec) -> pathlib.Path:
        return self._folder() / f"{spec.memory_id}{SUFFIX}"

    # -- the store API ------------------------------------------------------------------------------
    def version(self, spec: MemorySpec) -> str:
        try:
            stat = self.path(spec).stat()
        except FileNotFoundError:
            return "absent"
        return f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"

    def read(self, spec: MemorySpec) -> MemoryContents:
        path = self.path(spec)
        with self._lock:
            if not path.exists():
                self._states.pop(path, None)
                return MemoryContents.empty()
            with open(path, "rb") as handle:
                return self._refresh(spec, path, handle).contents

    def append(self, spec: MemorySpec, latent_format: str, latents: torch.Tensor, info: Optional[Mapping]) -> int:
        path = self.path(spec)
        with self._lock, self._locked_file(spec, path) as handle:
            state = self._refresh(spec, path, handle)
            if state.size > state.good_end:  # a write that was killed: drop its partial record
                handle.truncate(state.good_end)
                os.fsync(handle.fileno())
            plan = plan_append(spec, state.contents, latent_format, latents)
            if not plan.fresh:
                return 0
            now = time.time()
            entries = [
                MemoryEntry(f"{spec.memory_id} #{state.next_number + i}", item_hash, now, dict(info or {}))
                for i, item_hash in enumerate(plan.hashes)
            ]
            next_number = state.next_number + len(entries)
            record = encode_record(latent_format, latents[plan.fresh], entries, next_number, plan.drop_oldest)
            try:
                self._write_record(handle, path, record)
            except OSError as error:  # e.g. a full disk: cut the partial record off again
                with contextlib.suppress(OSError):
                    handle.truncate(state.good_end)
                raise write_error(spec, path, error) from error
            contents = state.contents.extended(latent_format, latents[plan.fresh], entries)
            state = _FileState(
                inode=os.fstat(handle.fileno()).st_ino,
                good_end=state.good_end + len(record),
                size=state.good_end + len(record),
                contents=contents.without_oldest(plan.drop_oldest),
                next_number=next_number,
                dropped=state.dropped + plan.drop_oldest,
            )
            self._states[path] = state
            if state.dropped > max(len(state.contents), MIN_ENTRIES_TO_COMPACT):
                self._compact(path, state)
            return len(entries)

    def reset(self, spec: MemorySpec) -> None:
        """Empty the memory. A damaged file is moved aside (<file>.damaged-<time>), never deleted."""
        path = self.path(spec)
        with self._lock:
            if not path.exists():
                return
            with self._locked_file(spec, path) as handle:
                try:
                    self._refresh(spec, path, handle)
                except ShieldMemoryError:
                    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                    os.replace(path, aside)
                    logger.warning("Shield Memory: moved the damaged %s aside to %s", path, aside)
                else:
                    self._replace_with(path, FILE_HEADER)
            self._states.pop(path, None)

    # -- startup ------------------------------------------------------------------------------------
    def stored_specs(self) -> list[MemorySpec]:
        folder = self._folder()
        if not folder.is_dir():
            return []
        names = sorted(p.name[: -len(SUFFIX)] for p in folder.iterdir() if p.name.endswith(SUFFIX))
        specs = []
        for name in names:
            try:
                specs.append(MemorySpec(name, "file"))
            except ShieldMemoryError:
                logger.warning("Shield Memory: ignoring %s%s in %s (not a valid memory id)", name, SUFFIX, folder)
        return specs

    # -- reading records ----------------------------------------------------------------------------
    def _refresh(self, spec: MemorySpec, path: pathlib.Path, handle) -> _FileState:
        """The state of the file behind `handle`, reading only the records added since the last read."""
        stat = os.fstat(handle.fileno())
        state = self._states.get(path)
        if state is None or state.inode != stat.st_ino or stat.st_size < state.good_end:
            state = _FileState(stat.st_ino, 0, 0, MemoryContents.empty(), 0, 0)
        if stat.st_size == state.size:
            return state
        state = self._read_records(spec, path, handle, state, stat.st_size)
        self._states[path] = state
        return state

    def _read_records(self, spec: MemorySpec, path, handle, state: _FileState, size: int) -> _FileState:
        offset = state.good_end
        if offset == 0:
            header = _read_exactly(handle, 0, len(FILE_HEADER))
            if len(header) < len(FILE_HEADER) and FILE_HEADER.startswith(header):
                return dataclasses.replace(state, size=size)  # created, header not yet complete: empty
            if header != FILE_HEADER:
                raise damaged(spec, path, 0, "it does not start with the Shield Memory file header")
            offset = len(FILE_HEADER)
        chunks, entries, drops, next_number = [], [], 0, state.next_number
        latent_format = state.contents.latent_format
        while offset < size:
            header = _read_exactly(handle, offset, RECORD_HEADER.size)
            if len(header) < RECORD_HEADER.size:
                break  # torn: the record header itself was cut
            magic, length, checksum = RECORD_HEADER.unpack(header)
            if magic != RECORD_MAGIC:
                raise damaged(spec, path, offset, "a record header is not where the previous record ends")
            if offset + RECORD_HEADER.size + length > size:
                break  # torn: the last write was cut short (a kill during the append)
            payload = _read_exactly(handle, offset + RECORD_HEADER.size, length)
            if hashlib.sha256(payload).digest() != checksum:
                raise damaged(spec, path, offset, "a record fails its checksum")
            record_format, latents, record_entries, drop, record_next = decode_record(spec, path, offset, payload)
            if latent_format and chunks and latents.shape[1:] != chunks[0].shape[1:]:
                raise damaged(spec, path, offset, "a record's latents have another shape than the earlier ones")
            latent_format = record_format
            chunks.append(latents)
            entries.extend(record_entries)
            drops += drop
            next_number = max(next_number, record_next)
            offset += RECORD_HEADER.size + length
        contents = state.contents
        if chunks:
            contents = contents.extended(latent_format, torch.cat(chunks), entries).without_oldest(drops)
        return _FileState(state.inode, offset, size, contents, next_number, state.dropped + drops)

    # -- writing ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked_file(self, spec: MemorySpec, path: pathlib.Path):
        """The memory file opened for appending, created if missing, locked against other processes; if
        another process compacted or reset it meanwhile (a new file at the path), the new one is used."""
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            while True:
                handle = open(path, "a+b")
                try:
                    if fcntl is not None:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                    if _same_file(handle, path):
                        break
                except BaseException:
                    handle.close()
                    raise
                handle.close()
        except OSError as error:
            raise write_error(spec, path, error) from error
        try:
            if os.fstat(handle.fileno()).st_size == 0:
                self._write_all(handle, FILE_HEADER)
            yield handle
        finally:
            handle.close()  # closing releases the flock

    def _write_record(self, handle, path: pathlib.Path, record: bytes) -> None:
        name = f"memory-file-mid-write:{path.name}"
        half = len(record) // 2 if os.environ.get(FAILPOINT_VARIABLE) == name else 0
        if half:
            self._write_all(handle, record[:half])
            failpoint(name)  # the crash test kills the server here
        self._write_all(handle, record[half:])

    @staticmethod
    def _write_all(handle, data: bytes) -> None:
        handle.seek(0, os.SEEK_END)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())

    def _compact(self, path: pathlib.Path, state: _FileState) -> None:
        """Rewrite the file with the kept entries only (under the caller's lock); a crash keeps the old one."""
        contents = state.contents
        record = encode_record(contents.latent_format, contents.latents, contents.entries, state.next_number, 0)
        inode = self._replace_with(path, FILE_HEADER + record)
        size = len(FILE_HEADER) + len(record)
        self._states[path] = _FileState(inode, size, size, contents, state.next_number, 0)
        logger.info("Shield Memory: compacted %s to its %d kept entries", path, len(contents))

    @staticmethod
    def _replace_with(path: pathlib.Path, data: bytes) -> int:
        handle, temp_name = tempfile.mkstemp(prefix=".shield-memory-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as temp:
                temp.write(data)
                temp.flush()
                os.fsync(temp.fileno())
            os.replace(temp_name, path)
        finally:
            pathlib.Path(temp_name).unlink(missing_ok=True)
        return path.stat().st_ino


def _same_file(handle, path: pathlib.Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_exactly(handle, offset: int, count: int) -> bytes:
    handle.seek(offset)
    return handle.read(count)


def encode_record(latent_format: str, latents: torch.Tensor, entries, next_number: int, drop_oldest: int) -> bytes:
    metadata = {
        "latent_format": latent_format,
        "hashes": json.dumps([entry.hash for entry in entries]),
        "names": json.dumps([entry.name for entry in entries]),
        "added": json.dumps([entry.added for entry in entries]),
        "infos": json.dumps([dict(entry.info) for entry in entries], default=str),
        "next_number": str(next_number),
        "drop_oldest": str(drop_oldest),
    }
    payload = save_safetensors({"latents": latents.contiguous().float()}, metadata=metadata)
    return RECORD_HEADER.pack(RECORD_MAGIC, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_record(spec: MemorySpec, path, offset: int, payload: bytes):
    """(latent_format, latents, entries, drop_oldest, next entry number) of one record's payload."""
    try:
        (header_size,) = struct.unpack("<Q", payload[:8])
        metadata = json.loads(payload[8 : 8 + header_size]).get("__metadata__", {})
        latents = load_safetensors(payload)["latents"].float()
        hashes, names = json.loads(metadata["hashes"]), json.loads(metadata["names"])
        added, infos = json.loads(metadata["added"]), json.loads(metadata["infos"])
        next_number, drop = int(metadata["next_number"]), int(metadata["drop_oldest"])
        latent_format = metadata["latent_format"]
    except Exception as error:  # json, struct, int() and safetensors raise many types for damaged bytes
        raise damaged(spec, path, offset, f"a record cannot be decoded ({type(error).__name__}: {error})") from error
    if not (len(hashes) == len(names) == len(added) == len(infos) == latents.shape[0]) or latents.ndim < 4:
        raise damaged(spec, path, offset, "a record's entry lists disagree with its latents")
    entries = [MemoryEntry(n, h, float(t), i) for n, h, t, i in zip(names, hashes, added, infos, strict=True)]
    return latent_format, latents, entries, drop, next_number


def damaged(spec: MemorySpec, path: pathlib.Path, offset: int, why: str) -> ShieldMemoryError:
    return ShieldMemoryError(
        f"Shield Memory: the memory file {path} is damaged at byte {offset}: {why}. Nothing was changed. To "
        f"start {spec.describe()} again empty, run its Shield Memory node once with reset on (or press "
        f"'Reset memory now'): the damaged file is kept as {path.name}.damaged-<time>; other memories are not "
        f"affected"
    )


def write_error(spec: MemorySpec, path: pathlib.Path, error: OSError) -> ShieldMemoryError:
    return ShieldMemoryError(
        f"Shield Memory: cannot write {spec.describe()} to {path} ({os.strerror(error.errno) if error.errno else error}). "
        f"Make {path.parent} writable, or use store 'server'"
    )
