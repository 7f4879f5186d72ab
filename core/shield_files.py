"""Shield sets on disk (safetensors, no pickle): names, atomic writes, whole-file checks, index caches.

Plain torch + safetensors; nothing here imports ComfyUI. The nodes pass in the folder to use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import pathlib
import struct
import tempfile
import time
import warnings
import weakref
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import paths
from .shield_set import FORMAT_VERSION, ShieldSet, ShieldSetError, metadata_json

logger = logging.getLogger(__name__)

EXTENSION = ".safetensors"
# The search-index cache beside a set file: "<set>.safetensors" + this suffix. No set name can reach it
# (every set file name ends in .safetensors) and the folder listing never shows it.
INDEX_SUFFIX = ".shield-index"
LEGACY_INDEX_EXTENSION = ".index.safetensors"  # before 0.2: collided with a set named "x.index"
# Beside a set whose latents were checked finite: "<set>.safetensors" + this suffix, the file's identity
# at that check (JSON). Like the index, never a set name and never listed.
VERIFIED_SUFFIX = ".shield-verified"
VERIFIED_VERSION = 1
VERIFIED_MAX_BYTES = 4096
# A write in the same clock tick as the file's last change can leave mtime and ctime as they were (file
# system clocks are coarse: a few ms on ext4, 2 s on FAT). So only a file unchanged for this long before
# its check is remembered as checked (git's "racily clean" rule); a fresher one is checked at every load.
SETTLED_SECONDS = 3.0
EMBEDDING_PREFIX = "embedding."
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
# bytes per element of every safetensors dtype (a header naming another one is refused)
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
# an IEEE float is NaN or inf exactly when its exponent bits are all ones: (unsigned view, exponent mask)
_EXPONENT_BITS = {np.dtype(np.float16): (np.uint16, 0x7C00), np.dtype(np.float32): (np.uint32, 0x7F800000)}
FINITE_CHECK_ROWS = 8192
FINITE_CHECK_BYTES = 64 * 2**20
MAX_NUMBERED_NAMES = 10_000  # Save Shield Set with overwrite off tries name, name_1 ... name_9999
SET_NAME_EXAMPLES = "a plain name such as 'my_shields' (sub-folders allowed)"
DAMAGED_FIX = "rebuild the set (Shield Set from Images or from Latents) and save it again with Save Shield Set"


# -- file names ------------------------------------------------------------------------------------
def resolve_inside(folder: str, filename: str, where: str) -> pathlib.Path:
    """folder/filename(.safetensors), its real path required inside the folder (paths.real_path_inside)."""
    paths.check_relative_name(filename, where, SET_NAME_EXAMPLES)
    name = filename if filename.endswith(EXTENSION) else filename + EXTENSION
    return paths.real_path_inside(pathlib.Path(folder), name, where, SET_NAME_EXAMPLES, "the shield set folder")


def numbered_names(path: pathlib.Path) -> Iterator[pathlib.Path]:
    """path, then name_1.safetensors, name_2... (bounded). The number goes before the extension, never
    through `with_suffix`: a stem such as "v1.5" or "clash.index" has dots of its own."""
    stem = path.name[: -len(EXTENSION)] if path.name.endswith(EXTENSION) else path.name
    yield path
    for number in range(1, MAX_NUMBERED_NAMES):
        yield path.with_name(f"{stem}_{number}{EXTENSION}")


# -- writing ---------------------------------------------------------------------------------------
class AllNamesTaken(Exception):
    """Every candidate name of a no-overwrite write exists."""


def save_shield_set(
    shield_set: ShieldSet,
    path: pathlib.Path,
    storage: str = "float32",
    overwrite: bool = True,
    where: str = "Save Shield Set",
) -> pathlib.Path:
    """Write atomically (a temp file in the same folder, then a rename: a crash never leaves half a file)
    and return the path written. overwrite off never replaces a file: the first free numbered name is
    taken, even when another process creates files meanwhile.

    storage "float16" halves the file (and the disk reads of the exact re-check); the fp16 values ARE
    the shields from then on (rounding ~5e-4 relative), and every distance is exact on them."""
    if len(shield_set) == 0:
        raise ShieldSetError(f"{where}: the shield set is empty (an empty Shield Memory?); nothing to save")
    if storage not in STORAGE_DTYPES:
        raise ShieldSetError(f"{where}: storage must be one of {sorted(STORAGE_DTYPES)}, got {storage!r}")
    latents = shield_set.latents.contiguous().to(STORAGE_DTYPES[storage])
    if not torch.isfinite(latents).all():
        raise ShieldSetError(f"{where}: the latents exceed the float16 range (|x| > 65504); save with storage float32")
    tensors = {"latents": latents}
    if shield_set.images is not None:
        tensors["images"] = shield_set.images.contiguous().float()
    for key, value in shield_set.embeddings.items():
        tensors[EMBEDDING_PREFIX + key] = value.contiguous().float()
    candidates = [path] if overwrite else numbered_names(path)
    try:
        return write_safetensors_atomically(
            tensors, candidates, metadata_json(shield_set), replace=overwrite, on_placed=_remember_saved
        )
    except AllNamesTaken as error:
        raise ShieldSetError(
            f"{where}: filename: {path.name} and its numbered names up to _{MAX_NUMBERED_NAMES - 1} all exist; "
            f"choose another filename, or turn overwrite on"
        ) from error
    except OSError as error:
        raise ShieldSetError(paths.explain_write_error(error, where, path, "the filename input")) from error


def write_safetensors_atomically(
    tensors: dict,
    candidates: Iterable[pathlib.Path],
    metadata: dict,
    replace: bool = True,
    on_placed: Optional[Callable[[int, pathlib.Path], None]] = None,
) -> pathlib.Path:
    """Write to a temp file beside the target, then move it into place; return the path used.

    replace: the first candidate is replaced if it exists. Otherwise the temp file is hard-linked to the
    first candidate that does not exist (a link never replaces, so a file made meanwhile is kept) and a
    AllNamesTaken means every candidate exists. on_placed(descriptor, path): called once the file is in
    place, with a descriptor of the file written here (not of whatever the name may point to by then)."""
    candidates = iter(candidates)
    first = next(candidates)
    first.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".shield-", suffix=".tmp", dir=first.parent)
    os.close(handle)
    written = None
    try:
        save_file(tensors, temp_name, metadata=metadata)
        written = os.open(temp_name, os.O_RDONLY)  # the file save_file made (it may replace the temp file)
        placed = _place(temp_name, first, candidates, replace)
        pathlib.Path(temp_name).unlink(missing_ok=True)  # a hard link leaves it; its removal changes the ctime
        if on_placed is not None:
            on_placed(written, placed)
        return placed
    finally:
        if written is not None:
            os.close(written)
        pathlib.Path(temp_name).unlink(missing_ok=True)


def _place(temp_name: str, first: pathlib.Path, others: Iterator[pathlib.Path], replace: bool) -> pathlib.Path:
    if replace:
        os.replace(temp_name, first)
        return first
    for candidate in itertools.chain([first], others):
        try:
            _link_without_replacing(temp_name, candidate)
            return candidate
        except FileExistsError:
            continue
    raise AllNamesTaken(first)


def _link_without_replacing(source: str, target: pathlib.Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: reserve the name exclusively, then move in
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        os.replace(source, target)


# -- reading ---------------------------------------------------------------------------------------
def memory_map_tensor(handle, contents: "_FileContents", key: str) -> torch.Tensor:
    """A read-only view of one tensor of the open safetensors file `handle` (its header parsed into
    `contents`), backed by the page cache (np.memmap on the payload): nothing is read until rows are indexed.

    The mapping is read-only (shared), not copy-on-write: Linux's default overcommit refuses a writable
    private mapping larger than RAM + swap, so a 33 GB set could not load on a 23 GB machine. A ShieldSet
    never writes its latents (every consumer converts or copies them first); a write would fault."""
    offset, dtype, shape = contents.layout(key)
    if math.prod(shape) == 0:
        return torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, dtype)).dtype)
    mapped = np.memmap(handle, dtype=dtype, mode="r", offset=offset, shape=tuple(shape))
    with warnings.catch_warnings():  # torch warns that the array is not writable: that is the point
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(mapped)


class FileRows:
    """The rows of a memory-mapped tensor, read from the file it was mapped from without going through the
    mapping: whole ranges by `pread` (a scan does not map the file into the process, so its RSS stays
    small) and `prefetch` of the rows a search is about to gather. Without the hint, each page fault on a
    cold mapping reads the device's read-ahead window around it (8 MB here: 64 rows of an SDXL-1024
    shield to get one); with it the kernel reads those rows only, all at once.

    Holds its own descriptor of the file as it was when loaded: replacing the file under the same name
    never changes what these rows are (they stay those of the mapping)."""

    def __init__(self, handle, contents: "_FileContents", key: str = "latents"):
        self.offset, self.dtype, shape = contents.layout(key)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        self.count = shape[0]
        self.descriptor = os.dup(handle.fileno())
        weakref.finalize(self, os.close, self.descriptor)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) as a tensor [n, *row_shape] in the stored dtype."""
        return torch.from_numpy(self.read_array(start, stop))

    def read_array(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a C-contiguous numpy array [n, *row_shape] in the stored dtype."""
        start, stop = max(0, start), min(self.count, stop)
        rows = np.empty((max(0, stop - start), *self.row_shape), dtype=self.dtype)
        view, position = memoryview(rows.reshape(-1).view(np.uint8)), self.offset + start * self.row_bytes
        while len(view):
            done = os.preadv(self.descriptor, [view], position)
            if done == 0:
                raise ShieldSetError(f"the shield set file ended early (truncated while in use?); {DAMAGED_FIX}")
            view, position = view[done:], position + done
        return rows

    def prefetch(self, rows: torch.Tensor) -> None:
        """Ask the kernel to read these rows now (POSIX_FADV_WILLNEED; asynchronous, a hint only). Adjacent
        rows are asked for as one range."""
        rows = torch.unique(rows.flatten())  # sorted
        if rows.numel() == 0:
            return
        breaks = torch.nonzero(rows[1:] - rows[:-1] > 1).flatten() + 1
        starts = torch.cat([rows[:1], rows[breaks]]).tolist()
        stops = torch.cat([rows[breaks - 1], rows[-1:]]).tolist()
        for first, last in zip(starts, stops, strict=True):
            position = self.offset + first * self.row_bytes
            os.posix_fadvise(self.descriptor, position, (last + 1 - first) * self.row_bytes, os.POSIX_FADV_WILLNEED)


@dataclasses.dataclass(frozen=True)
class _FileContents:
    metadata: dict
    dtypes: dict  # tensor name -> safetensors dtype name ("F32", ...)
    shapes: dict  # tensor name -> list of sizes
    spans: dict  # tensor name -> (first byte, end byte) in the file

    def layout(self, key: str) -> tuple[int, np.dtype, list]:
        """(byte offset of the tensor in the file, numpy dtype, shape) of a float32/float16 tensor."""
        return self.spans[key][0], np.dtype(_NUMPY_DTYPES[self.dtypes[key]]), self.shapes[key]


def _parse_header(handle) -> _FileContents:
    """The safetensors header of an open file, checked as safetensors checks it (8-byte length, a JSON
    object, known dtypes, sizes that match the shapes, tensors that tile the payload exactly: no gap, no
    overlap, nothing cut off), without mapping the file: safetensors' safe_open maps it copy-on-write,
    which Linux's default overcommit refuses for a file larger than RAM + swap."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ValueError(f"the file has {size} bytes, fewer than the 8 of the header length")
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > min(MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"its header length {header_size} does not fit the file ({size} bytes)")
    header = json.loads(handle.read(header_size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its __metadata__ is not a map of strings")
    dtypes, shapes, spans = {}, {}, {}
    for key, entry in header.items():
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None for k in _ENTRY_KEYS)
        if dtype not in _DTYPE_BYTES or not _sizes(shape) or not _sizes(offsets) or len(offsets) != 2:
            raise ValueError(f"tensor {key!r} has a malformed entry {entry!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise ValueError(f"tensor {key!r}: offsets {offsets} do not hold {dtype} {shape}")
        dtypes[key], shapes[key], spans[key] = dtype, list(shape), tuple(8 + header_size + o for o in offsets)
    end = 8 + header_size
    for first, stop in sorted(spans.values()):
        if first != end:
            raise ValueError(f"its tensors overlap or leave a gap at byte {end}")
        end = stop
    if end != size:
        raise ValueError(f"its tensors end at byte {end} of a {size}-byte file")
    return _FileContents(metadata, dtypes, shapes, spans)


_ENTRY_KEYS = ("dtype", "shape", "data_offsets")


def _sizes(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


@contextlib.contextmanager
def _opened_set(path: pathlib.Path, where: str):
    """The set file open for reading and its parsed, checked header: (handle, contents). Everything a load
    reads comes through this one descriptor, so a file replaced meanwhile cannot mix two versions."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise _unreadable(where, error) from error
    with handle:
        try:
            contents = _parse_header(handle)
        except (OSError, ValueError, OverflowError) as error:  # json's errors are ValueErrors
            raise _unreadable(where, error) from error
        yield handle, contents


def _unreadable(where: str, error: Exception) -> ShieldSetError:
    return ShieldSetError(
        f"{where} is not a readable safetensors file (corrupt or truncated?): {error}. Replace it with a good "
        f"copy, or {DAMAGED_FIX}"
    )


def _read_tensor(handle, contents: _FileContents, key: str) -> torch.Tensor:
    """One (small) float tensor of the file, read at its offsets, as float32."""
    first, stop = contents.spans[key]
    shape = contents.shapes[key]
    if stop == first:
        return torch.zeros(shape)
    data = bytearray(stop - first)
    handle.seek(first)
    if handle.readinto(data) != len(data):
        raise ShieldSetError(f"the shield set file ended early (truncated while in use?); {DAMAGED_FIX}")
    return torch.frombuffer(data, dtype=_TORCH_DTYPES[contents.dtypes[key]]).reshape(shape).float()


def _check_format(contents: _FileContents, where: str) -> None:
    version = contents.metadata.get("shield_format_version")
    if version is None and "shield_index_key" in contents.metadata:
        raise ShieldSetError(
            f"{where} is a search-index cache written by an older Shield version, not a shield set; delete it "
            f"(the index is rebuilt beside its set as needed)"
        )
    if version is None:
        raise ShieldSetError(
            f"{where} is not a Shield set file (no shield metadata); make one with Shield Set from Images or from "
            f"Latents and Save Shield Set"
        )
    if version != str(FORMAT_VERSION):
        raise ShieldSetError(
            f"{where} has shield format version {version!r}; this Shield version reads version {FORMAT_VERSION}. "
            f"Update the Shield pack if the file comes from a newer one; otherwise {DAMAGED_FIX}"
        )
    if "latents" not in contents.dtypes:
        raise ShieldSetError(f"{where} has shield metadata but no 'latents' tensor; {DAMAGED_FIX}")
    if contents.dtypes["latents"] not in _NUMPY_DTYPES:
        raise ShieldSetError(
            f"{where}: latents stored as {contents.dtypes['latents']}; only F32 and F16 are supported. {DAMAGED_FIX}"
        )
    shape = contents.shapes["latents"]
    if len(shape) < 4:
        raise ShieldSetError(
            f"{where}: the latents have shape {shape}; a shield set holds [count, channels, height, width] "
            f"(or 5-D video latents). {DAMAGED_FIX}"
        )
    if shape[0] == 0:
        raise ShieldSetError(f"{where} holds no shields; {DAMAGED_FIX}")


def _metadata_value(contents: _FileContents, key: str, expected: type, where: str, required: bool = True):
    """One metadata entry parsed from JSON (or the plain string for expected=str), type-checked."""
    if key not in contents.metadata:
        if required:
            raise ShieldSetError(f"{where}: its metadata has no {key!r}; {DAMAGED_FIX}")
        return expected()
    raw = contents.metadata[key]
    try:
        value = raw if expected is str else json.loads(raw)
    except ValueError as error:
        raise ShieldSetError(f"{where}: its metadata {key!r} is not valid JSON ({error}); {DAMAGED_FIX}") from error
    if not isinstance(value, expected) or isinstance(value, bool) and expected is int:
        raise ShieldSetError(
            f"{where}: its metadata {key!r} should be a {expected.__name__}, found {type(value).__name__} "
            f"{str(value)[:60]!r}; {DAMAGED_FIX}"
        )
    return value


def _check_listing(values: list, count: int, key: str, item_type: type, where: str) -> tuple:
    if len(values) != count or not all(isinstance(value, item_type) for value in values):
        raise ShieldSetError(
            f"{where}: the file holds {count} latents but its metadata {key!r} lists {len(values)} entries"
            + ("" if all(isinstance(v, item_type) for v in values) else f" (not all {item_type.__name__})")
            + f"; {DAMAGED_FIX}"
        )
    return tuple(values)


def _check_side_tensors(contents: _FileContents, count: int, where: str) -> None:
    for key, shape in contents.shapes.items():
        if key == "latents":
            continue
        expected_rank = 4 if key == "images" else 2 if key.startswith(EMBEDDING_PREFIX) else None
        if expected_rank is None:
            continue  # a tensor this version does not know about: ignored
        if contents.dtypes[key] not in _FLOAT_DTYPES or len(shape) != expected_rank or shape[0] != count:
            layout = "[count, height, width, 3]" if key == "images" else "[count, dimensions]"
            raise ShieldSetError(
                f"{where}: tensor {key!r} is {contents.dtypes[key]} {shape}; it must be float {layout} with "
                f"count {count}. {DAMAGED_FIX}"
            )


def load_shield_set(path: pathlib.Path, on_chunk: Optional[Callable[[int, int], None]] = None) -> ShieldSet:
    """Read a file written by `save_shield_set`, checking the whole file first: every problem becomes a
    ShieldSetError that names the file and says what to do.

    The latents are memory-mapped read-only (float32 or float16 as stored) and the header is parsed
    without mapping the file, so a set larger than RAM + swap loads: the range search reads its compact
    index per step and full rows only for the candidates. The finite check reads every row once per file
    content (see `check_latents_finite`); `on_chunk(done, total)` runs after each chunk of that read
    (progress, interrupts)."""
    where = f"Load Shield Set: {path.name}"
    with _opened_set(path, where) as (handle, contents):
        return _shield_set_from(path, handle, contents, where, on_chunk)


def _shield_set_from(path: pathlib.Path, handle, contents: _FileContents, where: str, on_chunk) -> ShieldSet:
    _check_format(contents, where)
    count, *item_shape = contents.shapes["latents"]
    latent_format = _metadata_value(contents, "latent_format", str, where)
    if not latent_format:
        raise ShieldSetError(f"{where}: its metadata 'latent_format' is empty; {DAMAGED_FIX}")
    names = _check_listing(_metadata_value(contents, "names", list, where), count, "names", str, where)
    hashes = _check_listing(_metadata_value(contents, "hashes", list, where), count, "hashes", str, where)
    settings = _metadata_value(contents, "settings", dict, where, required=False)
    if _metadata_value(contents, "latent_shape", list, where) != item_shape:
        raise ShieldSetError(
            f"{where}: latents {[count, *item_shape]} disagree with the metadata latent_shape "
            f"{contents.metadata['latent_shape']}; {DAMAGED_FIX}"
        )
    if "count" in contents.metadata and _metadata_value(contents, "count", int, where) != count:
        raise ShieldSetError(
            f"{where}: the file holds {count} latents but its metadata count says {contents.metadata['count']}; "
            f"{DAMAGED_FIX}"
        )
    _check_side_tensors(contents, count, where)
    latents = memory_map_tensor(handle, contents, "latents")
    file_rows = FileRows(handle, contents)
    check_latents_finite(path, file_rows, where, on_chunk)
    images = _read_tensor(handle, contents, "images") if "images" in contents.shapes else None
    embeddings = {
        key[len(EMBEDDING_PREFIX) :]: _read_tensor(handle, contents, key)
        for key in contents.shapes
        if key.startswith(EMBEDDING_PREFIX)
    }
    return ShieldSet(
        latents=latents,
        latent_format=latent_format,
        names=names,
        hashes=hashes,
        images=images,
        embeddings=embeddings,
        settings=settings,
        source_path=str(path),
        file_rows=file_rows,
    )


# -- the finite check, once per file content -------------------------------------------------------
def has_nonfinite(rows: np.ndarray) -> bool:
    """NaN or inf among float16/float32 values, by a test of the exponent bits on the raw words (about ten
    times faster than isfinite on float16, so the check runs at disk speed)."""
    unsigned, mask = _EXPONENT_BITS[rows.dtype]
    return rows.size > 0 and int(np.bitwise_and(rows.reshape(-1).view(unsigned), mask).max()) == mask


def check_latents_finite(
    path: pathlib.Path, file_rows: FileRows, where: str, on_chunk: Optional[Callable[[int, int], None]] = None
) -> None:
    """Refuse latents with NaN or inf, reading every row (by pread, 64 MB at a time) unless this very file
    content was checked before: its identity then (`file_identity`) is remembered in this process and in
    the small file `verified_path_for(path)` beside the set, so a 13 GB set is read once, not at every load.
    The identity is taken before reading: a change during the check makes it stale; a file changed less
    than SETTLED_SECONDS before is not remembered."""
    checked_at, identity = time.time_ns(), file_identity(file_rows.descriptor)
    if _VERIFIED.get(str(path)) == identity or _read_verified(path) == identity:
        return
    check_rows = max(1, min(FINITE_CHECK_ROWS, FINITE_CHECK_BYTES // max(1, file_rows.row_bytes)))
    for start in range(0, file_rows.count, check_rows):  # sequential, bounded memory, not mapped into the process
        if has_nonfinite(file_rows.read_array(start, start + check_rows)):
            raise ShieldSetError(f"{where}: the latents contain NaN or inf; {DAMAGED_FIX}")
        if on_chunk is not None:
            on_chunk(min(file_rows.count, start + check_rows), file_rows.count)
    if checked_at - max(identity["mtime_ns"], identity["ctime_ns"]) >= SETTLED_SECONDS * 1e9:
        _VERIFIED[str(path)] = identity
        _write_verified(path, identity)


_VERIFIED: dict = {}  # set path -> identity checked in this process (also when the folder is read-only)


def _remember_saved(descriptor: int, path: pathlib.Path) -> None:
    """Save Shield Set checked the latents finite before writing them: record the file it wrote (by its
    descriptor), so the first load reads no row. Not when the name already points to another file, nor on
    a file system whose time stamps tick in whole milliseconds or coarser (FAT, exFAT, HFS+): a write by
    another program in the same tick as the save could not be told apart there."""
    try:
        identity = file_identity(descriptor)
        if identity["inode"] != path.stat().st_ino:
            return
    except OSError:  # the name was removed meanwhile: nothing to record
        return
    if identity["mtime_ns"] % 1_000_000 == 0 and identity["ctime_ns"] % 1_000_000 == 0:
        return
    _VERIFIED[str(path)] = identity
    _write_verified(path, identity)


def trusted_file_key(set_path: str, descriptor: int) -> Optional[str]:
    """A short digest of the file's identity (`file_identity`) to key caches derived from its bytes (the
    search index), so a set edited in place under the same names and hashes never reuses them. None while
    that identity cannot be trusted to change at the next write: the file changed less than SETTLED_SECONDS
    ago (a write in the same clock tick could keep it) and is not the file Save Shield Set wrote (recorded
    by `_remember_saved`) — build without caching then."""
    now, identity = time.time_ns(), file_identity(descriptor)
    settled = now - max(identity["mtime_ns"], identity["ctime_ns"]) >= SETTLED_SECONDS * 1e9
    if not settled and identity != _VERIFIED.get(set_path) and identity != _read_verified(pathlib.Path(set_path)):
        return None
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def verified_path_for(set_path) -> pathlib.Path:
    path = pathlib.Path(set_path)
    return path.with_name(path.name + VERIFIED_SUFFIX)


def file_identity(descriptor: int) -> dict:
    """What changes whenever the file's bytes may have: size, inode, mtime and ctime (the kernel sets ctime
    at every write, truncate, rename or utime, and no call can set it back), and a digest of the header."""
    status = os.fstat(descriptor)
    (header_size,) = struct.unpack("<Q", os.pread(descriptor, 8, 0))
    header = os.pread(descriptor, min(header_size, status.st_size), 8)
    return {
        "version": VERIFIED_VERSION,
        "size": status.st_size,
        "inode": status.st_ino,
        "mtime_ns": status.st_mtime_ns,
        "ctime_ns": status.st_ctime_ns,
        "header_sha256": hashlib.sha256(header).hexdigest(),
    }


def _read_verified(path: pathlib.Path) -> Optional[dict]:
    """The identity recorded beside the set, or None (missing, not a plain file, too large, not JSON)."""
    verified = verified_path_for(path)
    try:
        if not verified.is_file() or verified.is_symlink() or verified.stat().st_size > VERIFIED_MAX_BYTES:
            return None
        return json.loads(verified.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_verified(path: pathlib.Path, identity: dict) -> None:
    """Record the identity beside the set (atomically); a read-only folder only costs the check next time."""
    verified, temp_name = verified_path_for(path), None
    try:
        handle, temp_name = tempfile.mkstemp(prefix=".shield-", suffix=".tmp", dir=verified.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as output:
            json.dump(identity, output)
        os.replace(temp_name, verified)
    except OSError as error:
        logger.warning(
            "Shield: could not write %s (%s); the set will be checked again after a restart", verified, error
        )
    finally:
        if temp_name is not None:
            pathlib.Path(temp_name).unlink(missing_ok=True)


# -- the search index beside a set file -------------------------------------------------------------
def index_path_for(set_path: str) -> pathlib.Path:
    path = pathlib.Path(set_path)
    return path.with_name(path.name + INDEX_SUFFIX)


def save_index(path: pathlib.Path, key: str, state: dict) -> None:
    tensors = {name: t.contiguous() for name, t in state.items()}
    write_safetensors_atomically(tensors, [path], {"shield_index_key": key})


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
