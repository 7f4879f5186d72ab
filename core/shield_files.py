"""Shield sets on disk (safetensors, no pickle) and the in-process Shield Memory store.

Plain torch + safetensors; nothing here imports ComfyUI. The nodes pass in the folder to use.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
import tempfile
import threading
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .shield_set import FORMAT_VERSION, ShieldSet, ShieldSetError, from_latents, hash_tensor, metadata_json

EXTENSION = ".safetensors"
INDEX_EXTENSION = ".index.safetensors"
EMBEDDING_PREFIX = "embedding."
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16}
FINITE_CHECK_ROWS = 8192


# -- files -----------------------------------------------------------------------------------------
def resolve_inside(folder: str, filename: str, where: str) -> pathlib.Path:
    """folder/filename(.safetensors), refusing names that would leave the folder."""
    if not filename or filename.strip() != filename or "\x00" in filename:
        raise ShieldSetError(f"{where}: the file name {filename!r} is empty or has leading/trailing spaces")
    name = filename if filename.endswith(EXTENSION) else filename + EXTENSION
    root = pathlib.Path(folder).resolve()
    path = (root / name).resolve()
    if pathlib.PurePath(name).is_absolute() or root not in path.parents:
        raise ShieldSetError(
            f"{where}: {filename!r} points outside {root}; use a plain name (sub-folders allowed), without '..' or an absolute path"
        )
    return path


def save_shield_set(shield_set: ShieldSet, path: pathlib.Path, storage: str = "float32") -> None:
    """Write atomically: a temp file in the same folder, then rename, so a crash never leaves half a file.

    storage "float16" halves the file (and the disk reads of the exact re-check); the fp16 values ARE
    the shields from then on (rounding ~5e-4 relative), and every distance is exact on them."""
    if len(shield_set) == 0:
        raise ShieldSetError("Save Shield Set: the shield set is empty (an empty Shield Memory?); nothing to save")
    if storage not in STORAGE_DTYPES:
        raise ShieldSetError(f"Save Shield Set: storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
    latents = shield_set.latents.contiguous().to(STORAGE_DTYPES[storage])
    if not torch.isfinite(latents).all():
        raise ShieldSetError(
            "Save Shield Set: the latents exceed the float16 range (|x| > 65504); save with storage float32"
        )
    tensors = {"latents": latents}
    if shield_set.images is not None:
        tensors["images"] = shield_set.images.contiguous().float()
    for key, value in shield_set.embeddings.items():
        tensors[EMBEDDING_PREFIX + key] = value.contiguous().float()
    write_safetensors_atomically(tensors, path, metadata_json(shield_set))


def write_safetensors_atomically(tensors: dict, path: pathlib.Path, metadata: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".shield-", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp_name, metadata=metadata)
        os.replace(temp_name, path)
    except BaseException:
        pathlib.Path(temp_name).unlink(missing_ok=True)
        raise


def memory_map_tensor(path: pathlib.Path, key: str) -> torch.Tensor:
    """A read-only view of one tensor of a safetensors file, backed by the page cache (np.memmap on the
    payload): nothing is read until rows are indexed. The header is parsed as the format defines it
    (8-byte little-endian length, JSON, then the payload); safe_open has validated it already."""
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    entry = header[key]
    begin, end = entry["data_offsets"]
    dtype = _NUMPY_DTYPES[entry["dtype"]]
    count = (end - begin) // np.dtype(dtype).itemsize
    if count == 0:
        return torch.zeros(entry["shape"], dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    # mode "c" (copy-on-write) gives a writable-looking array without ever writing the file
    array = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_size + begin, shape=tuple(entry["shape"]))
    return torch.from_numpy(array)


def load_shield_set(path: pathlib.Path) -> ShieldSet:
    """Read a file written by `save_shield_set`; every problem becomes a ShieldSetError naming the file.

    The latents are memory-mapped (float32 or float16 as stored), so a set larger than RAM loads: the
    range search reads its compact index per step and full rows only for the candidates."""
    where = f"Load Shield Set: {path.name}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            tensors = {key: handle.get_tensor(key) for key in keys if key != "latents"}
            if "latents" in keys:
                dtype_name = handle.get_slice("latents").get_dtype()
    except Exception as error:  # safetensors raises its own error types for bad headers/truncation
        raise ShieldSetError(f"{where} is not a readable safetensors file (corrupt or truncated?): {error}") from error
    if metadata.get("shield_format_version") != str(FORMAT_VERSION) or "latents" not in keys:
        raise ShieldSetError(
            f"{where} is not a Shield set file (no shield metadata or latents); save it with Save Shield Set"
        )
    if dtype_name not in _NUMPY_DTYPES:
        raise ShieldSetError(
            f"{where}: latents stored as {dtype_name}; only F32 and F16 are supported. Re-save the set"
        )
    try:
        names = json.loads(metadata["names"])
        hashes = json.loads(metadata["hashes"])
        settings = json.loads(metadata.get("settings", "{}"))
        latent_format = metadata["latent_format"]
        shape = json.loads(metadata["latent_shape"])
    except (KeyError, ValueError) as error:
        raise ShieldSetError(f"{where}: its metadata is damaged ({error}); re-save the set") from error
    latents = memory_map_tensor(path, "latents")
    if latents.shape[0] == 0:
        raise ShieldSetError(f"{where} holds no shields")
    if list(latents.shape[1:]) != shape:
        raise ShieldSetError(f"{where}: latents {tuple(latents.shape)} disagree with the metadata shape {shape}")
    for start in range(0, latents.shape[0], FINITE_CHECK_ROWS):  # one sequential pass, bounded memory
        if not torch.isfinite(latents[start : start + FINITE_CHECK_ROWS]).all():
            raise ShieldSetError(f"{where}: the latents contain NaN or inf; rebuild the set")
    embeddings = {k[len(EMBEDDING_PREFIX) :]: v.float() for k, v in tensors.items() if k.startswith(EMBEDDING_PREFIX)}
    return ShieldSet(
        latents=latents,
        latent_format=latent_format,
        names=tuple(names),
        hashes=tuple(hashes),
        images=tensors.get("images"),
        embeddings=embeddings,
        settings=settings,
        source_path=str(path),
    )


# -- the search index beside a set file -------------------------------------------------------------
def index_path_for(set_path: str) -> pathlib.Path:
    path = pathlib.Path(set_path)
    return path.with_name(
        path.name[: -len(EXTENSION)] + INDEX_EXTENSION if path.name.endswith(EXTENSION) else path.name + INDEX_EXTENSION
    )


def save_index(path: pathlib.Path, key: str, state: dict) -> None:
    write_safetensors_atomically({name: t.contiguous() for name, t in state.items()}, path, {"shield_index_key": key})


def load_index(path: pathlib.Path, key: str) -> Optional[dict]:
    """The saved index if it exists and was built for exactly this set content and settings; else None
    (the caller rebuilds and overwrites it, so a changed set never uses a stale index)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("shield_index_key") != key:
                return None
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception:  # a damaged index is only a cache: rebuild it
        return None


# -- memory ----------------------------------------------------------------------------------------
class ShieldMemoryStore:
    """Named sets that grow with every finished generation (paper §4.2: repel from previous batches).

    Module-level, so it survives across queue runs in one server process; `version` changes on every
    append or reset, which is what the Shield Memory node fingerprints.
    """

    def __init__(self, max_items: int = 4096):
        self._sets: dict[str, ShieldSet] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()
        self.max_items = max_items

    def version(self, memory_id: str) -> int:
        with self._lock:
            return self._versions.get(memory_id, 0)

    def reset(self, memory_id: str) -> None:
        with self._lock:
            self._sets.pop(memory_id, None)
            self._versions[memory_id] = self._versions.get(memory_id, 0) + 1

    def snapshot(self, memory_id: str) -> ShieldSet:
        """The set as it is now; an empty memory is a set of 0 shields without a shape yet."""
        with self._lock:
            current = self._sets.get(memory_id)
        if current is None:
            return ShieldSet(
                latents=torch.zeros(0, 0, 0, 0),
                latent_format="",
                names=(),
                hashes=(),
                settings={"shield_memory_id": memory_id},
            )
        return current

    def append(self, memory_id: str, latent_format: str, latents: torch.Tensor) -> int:
        """Add generations; a latent already remembered (same hash) is skipped, so two patches that share
        one memory (Sparse Repellency and ProCreate on one model) remember each output once. Returns
        how many were added."""
        with self._lock:
            current = self._sets.get(memory_id)
            known = set(current.hashes) if current is not None else set()
            fresh = [i for i, latent in enumerate(latents) if hash_tensor(latent) not in known]
            if not fresh:
                return 0
            latents = latents[fresh]
            start = len(current) if current is not None else 0
            names = [f"{memory_id} #{start + index}" for index in range(latents.shape[0])]
            added = from_latents(latents, latent_format, names=names, settings={"shield_memory_id": memory_id})
            merged = added if current is None else current.concat(added)
            if len(merged) > self.max_items:  # keep the newest generations
                keep = slice(len(merged) - self.max_items, None)
                merged = ShieldSet(
                    latents=merged.latents[keep],
                    latent_format=latent_format,
                    names=merged.names[keep],
                    hashes=merged.hashes[keep],
                    settings=merged.settings,
                )
            self._sets[memory_id] = merged
            self._versions[memory_id] = self._versions.get(memory_id, 0) + 1
            return len(fresh)


MEMORY = ShieldMemoryStore()
