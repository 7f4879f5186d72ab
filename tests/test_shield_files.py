"""Shield set files in-process: numbered names, index caches, whole-file checks at load, write errors,
the one symlink rule, and a DreamSim loader that never reaches the network (issue #11, defects 1, 5-9).
The same defects are exercised in the real server in test_shield_files_server.py."""

import json
import os
import socket
import struct
import time
import urllib.request

import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import pytest
import torch

from comfyui_shield.core import shield_files
from comfyui_shield.core.shield_files import index_path_for, load_shield_set, save_shield_set
from comfyui_shield.core.shield_set import ShieldSetError, from_latents
from comfyui_shield.nodes.procreate import NEEDS_TORCH_HUB, ShieldDreamSimLoader
from comfyui_shield.nodes.shield_sets import LoadShieldSet, SaveShieldSet, ShieldSetFromImages, shield_set_files
from comfyui_shield.reference_models.memorizer import build_memorizer
from harness.files import damaged_set_files, nan_written_in_place, read_only_folder
from harness.procreate_parts import write_random_dreamsim


@pytest.fixture
def shields():
    return from_latents(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), "SD15")


# -- defect 1: numbered names with dotted stems, bounded -------------------------------------------
@pytest.mark.parametrize(("name", "taken"), [("v1.5", ["v1.5", "v1"]), ("clash.index", ["clash.index", "clash"])])
def test_numbered_name_keeps_a_dotted_stem(shield_folder, shields, name, taken):
    for stem in taken:
        (shield_folder / f"{stem}.safetensors").write_bytes(b"someone else's file")
    path = SaveShieldSet.execute(shields, name, False).result[0]
    assert path == str(shield_folder / f"{name}_1.safetensors")
    assert all((shield_folder / f"{stem}.safetensors").read_bytes() == b"someone else's file" for stem in taken)
    assert load_shield_set(shield_folder / f"{name}_1.safetensors").hashes == shields.hashes


def test_numbering_is_bounded_and_says_what_to_do(shield_folder, shields, monkeypatch):
    monkeypatch.setattr(shield_files, "MAX_NUMBERED_NAMES", 4)
    for name in ("full", "full_1", "full_2", "full_3"):
        (shield_folder / f"{name}.safetensors").write_bytes(b"x")
    with pytest.raises(ShieldSetError, match=r"full.safetensors and its numbered names up to _3 all exist.*overwrite"):
        SaveShieldSet.execute(shields, "full", False)
    assert not [p for p in shield_folder.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind


def test_overwrite_off_never_replaces_a_file_made_meanwhile(shield_folder, shields):
    path = shield_folder / "race.safetensors"
    candidates = iter([path, shield_folder / "race_1.safetensors"])

    def created_meanwhile():
        first = next(candidates)
        first.write_bytes(b"made by another process after the name was chosen")
        yield first
        yield from candidates

    written = shield_files.write_safetensors_atomically({"x": torch.zeros(1)}, created_meanwhile(), {}, replace=False)
    assert written.name == "race_1.safetensors"
    assert path.read_bytes() == b"made by another process after the name was chosen"


# -- defect 6: index caches have their own suffix ---------------------------------------------------
def test_index_cache_has_a_suffix_no_set_name_reaches(shield_folder, shields):
    SaveShieldSet.execute(shields, "clash", True)
    index = index_path_for(str(shield_folder / "clash.safetensors"))
    assert index.name == "clash.safetensors.shield-index"
    shield_files.save_index(index, "key", {"codes": torch.zeros(3)})
    # a set whose name looks like an index, in both spellings, is a set like any other
    for name in ("clash.index", "clash.safetensors.shield-index"):
        SaveShieldSet.execute(shields, name, False)
    listed = shield_set_files()
    assert sorted(listed) == [
        "clash.index.safetensors",
        "clash.safetensors",
        "clash.safetensors.shield-index.safetensors",
    ]
    for name in listed:
        assert LoadShieldSet.execute(name).result[0].hashes == shields.hashes
    assert shield_files.load_index(index, "key") is not None  # no save touched the index
    # not one of the listed files: the pack's combo check refuses it before the loader sees it
    with pytest.raises(ValueError, match=r"'filename' must be one of \['clash.index.safetensors'"):
        LoadShieldSet.execute("clash.safetensors.shield-index")


# -- defect 7: the whole file is checked at load ----------------------------------------------------
def test_every_kind_of_damage_names_the_file_and_the_fix(shield_folder):
    for name, (path, pattern) in damaged_set_files(shield_folder).items():
        with pytest.raises(ShieldSetError, match=pattern) as error:
            LoadShieldSet.execute(path.name)
        message = str(error.value)
        assert path.name in message, name
        assert any(fix in message for fix in ("Save Shield Set", "Update the Shield pack", "delete it")), message


# -- issue #13 item 5: a large set is read in full once per file content, not at every load ---------
@pytest.fixture
def rows_read(monkeypatch):
    """Rows each finite-check read returned (a spy on the real FileRows.read_array); nothing remembered
    from other tests, and a file unchanged for 0.2 s counts as settled."""
    monkeypatch.setattr(shield_files, "_VERIFIED", {})
    monkeypatch.setattr(shield_files, "SETTLED_SECONDS", 0.2)
    read, original = [], shield_files.FileRows.read_array

    def spy(self, start, stop):
        rows = original(self, start, stop)
        read.append(len(rows))
        return rows

    monkeypatch.setattr(shield_files.FileRows, "read_array", spy)
    return read


def _settled_set(folder, name, count=20, storage="float16"):
    """A set as another program would leave it: no record beside it (Save Shield Set writes one)."""
    path = folder / f"{name}.safetensors"
    save_shield_set(from_latents(torch.randn(count, 4, 8, 8), "SD15"), path, storage=storage)
    _forget_the_save(path)
    time.sleep(0.3)
    return path


def _forget_the_save(path):
    shield_files.verified_path_for(path).unlink()
    shield_files._VERIFIED.pop(str(path))


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_a_checked_set_is_not_read_again_until_it_changes(shield_folder, rows_read, storage):
    path = _settled_set(shield_folder, "big", storage=storage)
    first = LoadShieldSet.execute("big.safetensors").result[0]
    assert sum(rows_read) == 20  # the first load checks every row
    record = shield_files.verified_path_for(path)
    assert record.name == "big.safetensors.shield-verified" and shield_set_files() == ["big.safetensors"]
    assert json.loads(record.read_text())["inode"] == path.stat().st_ino
    shield_files._VERIFIED.clear()  # as after a restart: only the record beside the set is left
    rows_read.clear()
    again = LoadShieldSet.execute("big.safetensors").result[0]
    assert rows_read == [] and torch.equal(again.latents, first.latents)
    nan_written_in_place(path)  # same inode, size and mtime: the ctime changed
    with pytest.raises(ShieldSetError, match=r"Load Shield Set: big.safetensors: the latents contain NaN or inf"):
        LoadShieldSet.execute("big.safetensors")
    assert rows_read == [20]


def test_a_set_changed_right_after_its_check_is_checked_again(shield_folder, monkeypatch):
    monkeypatch.setattr(shield_files, "_VERIFIED", {})  # the real SETTLED_SECONDS
    path = shield_folder / "fresh.safetensors"
    save_shield_set(from_latents(torch.randn(3, 4, 8, 8), "SD15"), path)
    _forget_the_save(path)
    LoadShieldSet.execute("fresh.safetensors")  # checked, but too fresh to be remembered
    assert not shield_files.verified_path_for(path).exists() and shield_files._VERIFIED == {}
    nan_written_in_place(path)  # possibly in the same clock tick: mtime and ctime may not move
    with pytest.raises(ShieldSetError, match="NaN or inf"):
        LoadShieldSet.execute("fresh.safetensors")


@pytest.mark.parametrize("storage", ["float16", "float32"])
def test_save_records_the_file_it_wrote_so_its_first_load_reads_no_row(shield_folder, rows_read, storage):
    latents = torch.randn(20, 4, 8, 8)
    path = shield_folder / "saved.safetensors"
    save_shield_set(from_latents(latents, "SD15"), path, storage=storage)
    with open(path, "rb") as handle:
        assert json.loads(shield_files.verified_path_for(path).read_text()) == shield_files.file_identity(
            handle.fileno()
        )
    shield_files._VERIFIED.clear()  # as after a restart: only the record beside the set is left
    loaded = LoadShieldSet.execute("saved.safetensors").result[0]
    assert rows_read == [] and torch.equal(loaded.latents.float(), latents.to(loaded.latents.dtype).float())
    nan_written_in_place(path)  # same inode, size and mtime: the ctime changed
    with pytest.raises(ShieldSetError, match="NaN or inf"):
        LoadShieldSet.execute("saved.safetensors")
    assert rows_read == [20]
    save_shield_set(from_latents(latents, "SD15"), path, storage=storage)  # replaced: a new file, a new record
    numbered = save_shield_set(from_latents(latents, "SD15"), path, storage=storage, overwrite=False)
    assert numbered.name == "saved_1.safetensors"
    assert json.loads(shield_files.verified_path_for(numbered).read_text())["inode"] == numbered.stat().st_ino
    shield_files._VERIFIED.clear()
    rows_read.clear()
    LoadShieldSet.execute("saved.safetensors")
    LoadShieldSet.execute("saved_1.safetensors")
    assert rows_read == []


def test_save_records_nothing_where_time_stamps_are_coarse(shield_folder, rows_read, monkeypatch):
    """On FAT, exFAT or HFS+ (times in whole ms or coarser) a write in the same tick as the save would keep
    the file's identity: the first load checks the file."""
    real_identity = shield_files.file_identity

    def coarse(descriptor):
        identity = real_identity(descriptor)
        return {
            **identity,
            "mtime_ns": identity["mtime_ns"] // 10**7 * 10**7,
            "ctime_ns": identity["ctime_ns"] // 10**7 * 10**7,
        }

    monkeypatch.setattr(shield_files, "file_identity", coarse)
    path = shield_folder / "coarse.safetensors"
    save_shield_set(from_latents(torch.randn(20, 4, 8, 8), "SD15"), path)
    assert not shield_files.verified_path_for(path).exists() and shield_files._VERIFIED == {}
    LoadShieldSet.execute("coarse.safetensors")
    assert rows_read == [20]


def test_a_record_of_another_file_or_a_damaged_record_does_not_skip_the_check(shield_folder, rows_read):
    good, bad = _settled_set(shield_folder, "good"), _settled_set(shield_folder, "bad")
    nan_written_in_place(bad)
    time.sleep(0.3)
    LoadShieldSet.execute("good.safetensors")
    good_record, bad_record = shield_files.verified_path_for(good), shield_files.verified_path_for(bad)
    records = {
        "another file's": good_record.read_bytes(),
        "not JSON": b"{not json",
        "too large": b" " * 5000 + good_record.read_bytes(),
    }
    for kind, data in records.items():
        bad_record.write_bytes(data)
        with pytest.raises(ShieldSetError, match="NaN or inf"):
            LoadShieldSet.execute("bad.safetensors")
        assert bad_record.read_bytes() == data, kind  # a refused set gets no record
    bad_record.unlink()
    bad_record.symlink_to(good_record)
    with pytest.raises(ShieldSetError, match="NaN or inf"):
        LoadShieldSet.execute("bad.safetensors")
    good_record.write_bytes(b"{not json")  # a damaged record of a good set: checked again, record rewritten
    shield_files._VERIFIED.clear()
    rows_read.clear()
    LoadShieldSet.execute("good.safetensors")
    assert rows_read == [20] and json.loads(good_record.read_text())["inode"] == good.stat().st_ino


def test_a_read_only_folder_checks_once_per_process(shield_folder, rows_read, caplog):
    path = _settled_set(shield_folder / "locked", "shared")
    with read_only_folder(shield_folder / "locked"):
        LoadShieldSet.execute("locked/shared.safetensors")
        rows_read.clear()
        LoadShieldSet.execute("locked/shared.safetensors")
    assert rows_read == [] and not shield_files.verified_path_for(path).exists()
    assert "will be checked again after a restart" in caplog.text


def test_the_first_check_shows_progress_and_stops_when_asked(shield_folder, rows_read, monkeypatch):
    monkeypatch.setattr(shield_files, "FINITE_CHECK_ROWS", 6)
    _settled_set(shield_folder, "progress")
    updates, hook = [], comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    try:
        LoadShieldSet.execute("progress.safetensors")
    finally:
        comfy.utils.set_progress_bar_global_hook(hook)
    assert updates == [(6, 20), (12, 20), (18, 20), (20, 20)]
    path = _settled_set(shield_folder, "stopped")
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            LoadShieldSet.execute("stopped.safetensors")
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not shield_files.verified_path_for(path).exists()


def test_the_exponent_bit_test_finds_every_nan_and_inf():
    for dtype in (np.float16, np.float32):
        info = np.finfo(dtype)
        values = np.array([0.0, -0.0, info.tiny / 4, -info.max, info.max, 1.0], dtype=dtype)  # subnormal, extremes
        assert not shield_files.has_nonfinite(values)
        for bad in (np.nan, np.inf, -np.inf):
            spoiled = values.copy()
            spoiled[3] = bad
            assert shield_files.has_nonfinite(spoiled), (dtype, bad)
    payloads = np.array([0x7C01, 0xFC01, 0x7FFF, 0xFE00], dtype=np.uint16).view(np.float16)  # NaNs of every sign
    assert all(shield_files.has_nonfinite(payloads[i : i + 1]) for i in range(4))


# -- defect 8: OS errors on save say which input to change ------------------------------------------
def test_too_long_name_is_refused_before_running(shield_folder):
    message = SaveShieldSet.validate_inputs(filename="x" * 300)
    assert "Save Shield Set: filename" in message and "Shorten it" in message and "255 bytes" in message
    assert SaveShieldSet.validate_inputs(filename="sub/" + "y" * 200) is True


def test_read_only_folder_names_the_input(shield_folder, shields):
    with read_only_folder(shield_folder / "locked"):
        with pytest.raises(ShieldSetError) as error:
            SaveShieldSet.execute(shields, "locked/mine", False)
    message = str(error.value)
    assert "is not writable" in message and "choose the filename input in a writable folder" in message
    assert "Errno" not in message and not list((shield_folder / "locked").iterdir())


def test_a_file_where_a_folder_is_named(shield_folder, shields):
    (shield_folder / "plain_file").write_bytes(b"x")
    with pytest.raises(ShieldSetError, match=r"a part of the name is an existing file.*change the filename input"):
        SaveShieldSet.execute(shields, "plain_file/mine", True)


# -- defect 9: one symlink rule ---------------------------------------------------------------------
def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def _from_folder(folder):
    import nodes as comfy_nodes

    (vae,) = comfy_nodes.VAELoader().load_vae("pixel_space")
    model = build_memorizer(torch.randn(2, 3, 16, 16))
    return ShieldSetFromImages.execute(None, vae, model, 16, 16, folder=folder).result[0]


def test_symlinks_inside_the_input_directory_are_followed(input_folder, tmp_path):
    _png(input_folder / "elsewhere_in_input" / "green.png", (0, 255, 0))
    _png(input_folder / "protected" / "red.png", (255, 0, 0))
    (input_folder / "protected" / "linked_file.png").symlink_to(input_folder / "elsewhere_in_input" / "green.png")
    (input_folder / "protected" / "linked_folder").symlink_to(input_folder / "elsewhere_in_input")
    (input_folder / "protected" / "loop").symlink_to(input_folder / "protected")  # a cycle is walked once
    (input_folder / "linked_root").symlink_to(input_folder / "protected")
    for folder in ("protected", "linked_root"):
        shields = _from_folder(folder)
        assert shields.names == ("linked_file.png", "linked_folder/green.png", "red.png")


@pytest.mark.parametrize("kind", ["file", "sub-folder", "folder"])
def test_symlinks_leading_outside_are_refused_with_the_name(input_folder, tmp_path, kind):
    outside = tmp_path / "outside"
    _png(outside / "secret.png", (0, 0, 255))
    _png(input_folder / "protected" / "red.png", (255, 0, 0))
    if kind == "file":
        (input_folder / "protected" / "secret.png").symlink_to(outside / "secret.png")
    elif kind == "sub-folder":
        (input_folder / "protected" / "more").symlink_to(outside)
    else:
        (input_folder / "linked").symlink_to(outside)
    folder = "linked" if kind == "folder" else "protected"
    with pytest.raises(ShieldSetError, match=r"outside|symlink to .*outside") as error:
        _from_folder(folder)
    assert "Shield Set from Images: folder" in str(error.value)
    if kind == "folder":
        assert "points outside ComfyUI's input directory" in ShieldSetFromImages.validate_inputs(folder="linked")
    else:
        assert f"is a symlink to {outside}" in str(error.value) and "Copy the file into the folder" in str(error.value)


def test_load_follows_symlinks_only_inside_the_set_folder(shield_folder, shields, tmp_path):
    save_shield_set(shields, shield_folder / "real" / "mine.safetensors")
    outside = tmp_path / "outside_sets"
    save_shield_set(shields, outside / "theirs.safetensors")
    (shield_folder / "alias.safetensors").symlink_to(shield_folder / "real" / "mine.safetensors")
    (shield_folder / "alias_folder").symlink_to(shield_folder / "real")
    (shield_folder / "escape.safetensors").symlink_to(outside / "theirs.safetensors")
    (shield_folder / "escape_folder").symlink_to(outside)
    outside_files = sorted(p.name for p in outside.iterdir())  # the set and its record (Save wrote both)
    for name in ("alias.safetensors", "alias_folder/mine.safetensors"):
        loaded = LoadShieldSet.execute(name).result[0]
        assert loaded.hashes == shields.hashes and loaded.source_path == str(shield_folder / "real/mine.safetensors")
    for name in ("escape.safetensors", "escape_folder/theirs.safetensors"):
        with pytest.raises(ShieldSetError, match=r"points outside the shield set folder"):
            LoadShieldSet.execute(name)
    with pytest.raises(ShieldSetError, match="points outside"):
        SaveShieldSet.execute(shields, "escape_folder/new", True)
    assert sorted(p.name for p in outside.iterdir()) == outside_files  # nothing written outside


# -- defect 5: DreamSim never reaches the network ---------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """socket.connect raises in this process (loopback too): any network attempt fails loudly."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return attempts


@pytest.fixture
def dreamsim_folder(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "dreamsim"
    folder.mkdir(parents=True)
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "dreamsim", ([str(folder)], set()))
    return folder


def test_the_network_guard_can_fail(no_network):
    with pytest.raises(OSError):
        urllib.request.urlopen("http://192.0.2.1/", timeout=2)  # noqa: S310 (a documentation address)
    assert no_network


def test_torch_hub_variants_are_refused_before_anything_runs(dreamsim_folder, no_network):
    from comfyui_shield.nodes.procreate import DREAMSIM_FILES

    for name in {name for variant in NEEDS_TORCH_HUB for name in DREAMSIM_FILES[variant]}:
        (dreamsim_folder / name).write_bytes(b"corrupt") if "lora" not in name else (dreamsim_folder / name).mkdir()
    for variant in NEEDS_TORCH_HUB:
        assert "through torch.hub" in ShieldDreamSimLoader.validate_inputs(variant=variant)
        with pytest.raises(ValueError, match=r"'variant' must be one of .*open_clip_vitb32.*torch.hub"):
            ShieldDreamSimLoader.execute(variant)  # the pack's combo check, with the tooltip's reason
    assert no_network == [] and not list(dreamsim_folder.rglob("trusted_list"))
    assert not (dreamsim_folder / "hub").exists() and len(list(dreamsim_folder.iterdir())) == 7


def test_damaged_dreamsim_files_name_the_file_without_network(dreamsim_folder, no_network):
    write_random_dreamsim(dreamsim_folder)
    lora = dreamsim_folder / "open_clip_vitb32_single_lora"
    weights = lora / "adapter_model.safetensors"
    good = weights.read_bytes()
    damages = [
        (dreamsim_folder / "open_clip_vitb32_pretrain.pth.tar", b"not a checkpoint", "open_clip_vitb32_pretrain"),
        (weights, good[:1000], "adapter_model.safetensors is damaged"),
        (lora / "adapter_config.json", b"{}", "adapter_config.json lacks r, lora_alpha"),
    ]
    for path, damaged, pattern in damages:
        original = path.read_bytes()
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=pattern) as error:
            ShieldDreamSimLoader.execute("open_clip_vitb32")
        assert "unzipped dreamsim_open_clip_vitb32_checkpoint.zip" in str(error.value)
        path.write_bytes(original)
    os.rename(weights, dreamsim_folder / "moved_away")  # peft would fetch a missing adapter from the HF hub
    with pytest.raises(ValueError, match=r"has no adapter_model.safetensors or adapter_model.bin"):
        ShieldDreamSimLoader.execute("open_clip_vitb32")
    os.rename(dreamsim_folder / "moved_away", weights)
    assert ShieldDreamSimLoader.execute("open_clip_vitb32").result[0].key.startswith("dreamsim/open_clip_vitb32/")
    assert no_network == [] and not list(dreamsim_folder.rglob("trusted_list"))


# -- issue #13 item 5: a set larger than RAM + swap loads (the header is parsed, the latents mapped read-only)
def _header_and_payload(path):
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write_with_header(path, header, payload):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + payload)


def test_the_latents_are_a_shared_read_only_mapping_not_copy_on_write(tmp_path):
    """Linux's default overcommit refuses a writable private (copy-on-write) mapping larger than RAM + swap:
    a 32.8 GB set failed to load on this 23 GB machine with 'Cannot allocate memory' before. The mapping of
    a loaded set must be read-only and shared ('r--s' in /proc/self/maps), and the side tensors read, not mapped."""
    path = tmp_path / "mapped.safetensors"
    images = torch.rand(3, 8, 8, 3)
    save_shield_set(from_latents(torch.randn(3, 4, 8, 8), "SD15", images=images), path, storage="float32")
    loaded = load_shield_set(path)
    maps = [line.split() for line in open("/proc/self/maps") if line.rstrip().endswith(str(path))]
    assert maps and all(fields[1] == "r--s" for fields in maps), maps
    assert torch.allclose(loaded.images, images.float(), atol=1e-3)
    assert loaded.latents.shape == (3, 4, 8, 8)


@pytest.mark.parametrize(
    "damage",
    ["a byte appended", "a gap between tensors", "offsets that do not hold the shape", "an unknown dtype",
     "a header length past the end", "a header that is a list"],
)  # fmt: skip
def test_every_header_defect_safetensors_refuses_is_refused(tmp_path, damage):
    """The pack parses the header itself (safe_open maps the file copy-on-write); it refuses what safetensors
    refuses, with the damaged-file message."""
    good = tmp_path / "good.safetensors"
    save_shield_set(from_latents(torch.randn(2, 4, 8, 8), "SD15", images=torch.rand(2, 8, 8, 3)), good)
    header, payload = _header_and_payload(good)
    bad = tmp_path / "bad.safetensors"
    latents = header["latents"]
    if damage == "a byte appended":
        payload += b"\0"
    elif damage == "a gap between tensors":
        for entry in (v for k, v in header.items() if k != "__metadata__"):
            if entry["data_offsets"][0] > 0:
                entry["data_offsets"] = [o + 2 for o in entry["data_offsets"]]
        payload += b"\0\0"
    elif damage == "offsets that do not hold the shape":
        latents["shape"] = [latents["shape"][0], 4, 8, 7]
    elif damage == "an unknown dtype":
        latents["dtype"] = "F12"
    if damage == "a header length past the end":
        text = json.dumps(header).encode()
        bad.write_bytes(struct.pack("<Q", len(text) + len(payload) + 1) + text + payload)
    elif damage == "a header that is a list":
        _write_with_header(bad, [header], payload)
    else:
        _write_with_header(bad, header, payload)
    with pytest.raises(ShieldSetError, match=r"bad.safetensors is not a readable safetensors file.*Save Shield Set"):
        load_shield_set(bad)
    _write_with_header(bad, *_header_and_payload(good))  # the same bytes re-written load
    assert torch.equal(load_shield_set(bad).latents, load_shield_set(good).latents)


def test_a_set_replaced_while_it_loads_is_read_whole_from_one_version(tmp_path, monkeypatch):
    """The header is parsed once, from the descriptor the latents are then mapped and read from: a file
    replaced under the same name meanwhile (a Save with overwrite, a sync tool) cannot pair one version's
    names and shapes with the other's rows."""
    path, newer = tmp_path / "set.safetensors", tmp_path / "newer.safetensors"
    first = torch.randn(3, 4, 8, 8)
    save_shield_set(from_latents(first, "SD15"), path, storage="float32")
    save_shield_set(from_latents(torch.randn(5, 4, 8, 8), "SD15"), newer, storage="float32")
    parsed, original = [], shield_files._parse_header

    def parse_then_replace(handle):
        contents = original(handle)
        parsed.append(contents)
        os.replace(newer, path)
        return contents

    monkeypatch.setattr(shield_files, "_parse_header", parse_then_replace)
    loaded = load_shield_set(path)
    assert len(parsed) == 1
    assert torch.equal(loaded.latents.float(), first) and len(loaded.names) == 3
    assert torch.equal(loaded.file_rows.read(0, 3).float(), first)
