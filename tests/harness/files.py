"""What the file tests share: damaged shield set files written with the real safetensors package, and a
folder made read-only for real (chmod for a normal user, the immutable attribute for root)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import struct
import subprocess

import pytest
import torch
from safetensors.torch import save_file


def good_set_tensors_and_metadata(count: int = 3) -> tuple[dict, dict]:
    from comfyui_shield.core.shield_set import from_latents, metadata_json

    shields = from_latents(torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(5)), "SD15")
    return {"latents": shields.latents}, metadata_json(shields)


def damaged_set_files(folder: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """name -> (file, a regex the load error must match), one file per kind of damage."""
    tensors, metadata = good_set_tensors_and_metadata()
    cases = {
        "names_not_a_list": ({}, {"names": "5"}, r"'names' should be a list, found int"),
        "settings_a_list": ({}, {"settings": "[1, 2]"}, r"'settings' should be a dict, found list"),
        "names_not_json": ({}, {"names": "[unclosed"}, r"'names' is not valid JSON"),
        "two_d_latents": ({"latents": torch.zeros(3, 16)}, {"latent_shape": "[16]"}, r"shape \[3, 16\]"),
        "fewer_names": ({}, {"names": json.dumps(["a", "b"])}, r"holds 3 latents but its metadata 'names' lists 2"),
        "hash_not_text": ({}, {"hashes": json.dumps([1, 2, 3])}, r"'hashes' lists 3 entries \(not all str\)"),
        "count_mismatch": ({}, {"count": "5"}, r"holds 3 latents but its metadata count says 5"),
        "shape_mismatch": ({}, {"latent_shape": "[4, 8, 9]"}, r"disagree with the metadata latent_shape"),
        "future_version": ({}, {"shield_format_version": "2"}, r"format version '2'.*reads version 1.*Update"),
        "no_latent_format": ({}, {"latent_format": None}, r"has no 'latent_format'"),
        "embedding_rows": ({"embedding.x": torch.zeros(2, 8)}, {}, r"tensor 'embedding.x' is F32 \[2, 8\]"),
        "nan_latents": ({"latents": torch.full((3, 4, 8, 8), float("nan"))}, {}, r"NaN or inf"),
        "no_shield_metadata": ({}, {"shield_format_version": None}, r"not a Shield set file"),
        "legacy_index": ({}, {"shield_format_version": None, "shield_index_key": "v1:x"}, r"search-index cache"),
    }
    written = {}
    for name, (tensor_changes, metadata_changes, pattern) in cases.items():
        file_metadata = {k: v for k, v in {**metadata, **metadata_changes}.items() if v is not None}
        path = folder / f"{name}.safetensors"
        save_file({**tensors, **tensor_changes}, str(path), metadata=file_metadata)
        written[name] = (path, pattern)
    return written


def nan_written_in_place(path: pathlib.Path) -> None:
    """The set file's last latent value overwritten with NaN in place (same inode and size), its mtime put
    back as `touch -r` or `rsync -t` would: only the ctime shows the change. Latents must be the last tensor."""
    with _edited_in_place(path) as (handle, layout):
        nan = {"F16": struct.pack("<H", 0x7E00), "F32": struct.pack("<f", float("nan"))}[layout["dtype"]]
        handle.seek(-len(nan), os.SEEK_END)
        handle.write(nan)


def row_written_in_place(path: pathlib.Path, row: int, values: torch.Tensor) -> None:
    """One latent row of the set file replaced in place by `values` (in the stored dtype), the names, hashes
    and mtime left as they were: only the bytes and the ctime change."""
    with _edited_in_place(path) as (handle, layout):
        dtype = {"F16": torch.float16, "F32": torch.float32}[layout["dtype"]]
        data = values.to(dtype).contiguous().flatten().view(torch.uint8).numpy().tobytes()
        assert len(data) * layout["shape"][0] == layout["data_offsets"][1] - layout["data_offsets"][0]
        handle.seek(layout["payload"] + layout["data_offsets"][0] + row * len(data))
        handle.write(data)


@contextlib.contextmanager
def _edited_in_place(path: pathlib.Path):
    """(open file, the latents' header entry + "payload" offset); afterwards the mtime is put back."""
    before = path.stat()
    with open(path, "r+b") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        layout = {**json.loads(handle.read(header_size))["latents"], "payload": 8 + header_size}
        yield handle, layout
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns and path.stat().st_size == before.st_size


@contextlib.contextmanager
def read_only_folder(folder: pathlib.Path):
    """`folder` made unwritable for this process; skips only where the OS offers no way to do so."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    else:  # root ignores permission bits; the immutable attribute stops it (ext4, xfs, btrfs, tmpfs)
        result = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot make a folder read-only as root here: {result.stderr.decode().strip()}")
        undo = ["chattr", "-i", str(folder)]
    try:
        probe = folder / ".write-probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("the folder is still writable (file system without read-only support)")
        except OSError:
            pass
        yield folder
    finally:
        subprocess.run(undo, check=False)
