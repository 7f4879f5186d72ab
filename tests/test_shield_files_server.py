"""Issue #11 file defects 1, 5-9, each as a regression test in the real ComfyUI server."""

import json
import pathlib
import re
import shutil
import time
import urllib.request

import pytest

from comfyui_shield.core.shield_files import SETTLED_SECONDS, load_shield_set, verified_path_for
from harness.files import damaged_set_files, nan_written_in_place, read_only_folder
from harness.memorizer_graphs import sparse_repellency
from harness.procreate_parts import rgb_items, write_random_dreamsim
from harness.server import ServerError

ITEMS = "files_items"


@pytest.fixture
def sets_dir(server, memorizer_items):
    server.write_input_latent(ITEMS, memorizer_items)
    return server.base_dir / "models" / "shield_sets"


def save_graph(filename: str, overwrite: bool = False) -> dict:
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": f"{ITEMS}.latent"}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["1", 0], "model": ["2", 0]}},
        "4": {
            "class_type": "ShieldSaveShieldSet",
            "inputs": {"shield_set": ["3", 0], "filename": filename, "overwrite": overwrite},
        },
    }


def load_graph(filename: str, save_as: str) -> dict:
    return {
        "1": {"class_type": "ShieldLoadShieldSet", "inputs": {"filename": filename}},
        "2": {
            "class_type": "ShieldSaveShieldSet",
            "inputs": {"shield_set": ["1", 0], "filename": save_as, "overwrite": True},
        },
    }


def saved_path(outputs: dict, node: str = "4") -> str:
    return re.search(r" to (.+)$", outputs[node]["text"][0]).group(1)


def load_options(server) -> list[str]:
    return server.object_info()["ShieldLoadShieldSet"]["input"]["required"]["filename"][1]["options"]


def assert_queue_idle(server):
    queue = server.get("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []


# -- defect 1 ---------------------------------------------------------------------------------------
def test_dotted_names_finish_without_interrupt_and_the_numbering_is_bounded(server, sets_dir):
    folder = sets_dir / "dotted"
    folder.mkdir(parents=True, exist_ok=True)
    for stem in ("v1.5", "v1", "clash.index", "clash"):
        (folder / f"{stem}.safetensors").write_bytes(b"another set")
    for name in ("v1.5", "clash.index"):
        path = saved_path(server.run(save_graph(f"dotted/{name}"), timeout=60))
        assert path == str(folder / f"{name}_1.safetensors")
        assert len(load_shield_set(folder / f"{name}_1.safetensors")) == 6
    assert {p.read_bytes() for p in folder.iterdir() if "_1" not in p.name} == {b"another set"}
    assert_queue_idle(server)  # nothing left running: /interrupt was never needed

    full = sets_dir / "bounded"
    full.mkdir(exist_ok=True)
    try:
        for name in ["taken"] + [f"taken_{n}" for n in range(1, 10_000)]:
            (full / f"{name}.safetensors").touch()
        with pytest.raises(ServerError, match=r"taken.safetensors and its numbered names up to _9999 all exist"):
            server.run(save_graph("bounded/taken"), timeout=60)
        assert_queue_idle(server)
    finally:
        shutil.rmtree(full)


# -- defect 6 ---------------------------------------------------------------------------------------
def spell_on(set_file: str) -> dict:
    graph = {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": f"{ITEMS}.latent"}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": {"class_type": "ShieldLoadShieldSet", "inputs": {"filename": set_file}},
        "4": sparse_repellency(["2", 0], ["3", 0], 4.0, intra_batch=False, search="clustered"),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": 1,
                "steps": 3,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "karras",
                "denoise": 1.0,
                "positive": ["2", 1],
                "negative": ["2", 1],
                "latent_image": ["5", 0],
            },
        },
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "index_clash/out"}},
    }
    return graph


def test_index_caches_and_set_names_never_collide(server, sets_dir):
    server.run(save_graph("collide/clash", overwrite=True))
    server.run(save_graph("collide/clash.index", overwrite=True))
    look_alike = sets_dir / "collide" / "clash.index.safetensors"
    before = look_alike.read_bytes()
    server.run(spell_on("collide/clash.safetensors"))  # builds and saves the clustered index of "clash"
    index = sets_dir / "collide" / "clash.safetensors.shield-index"
    assert index.is_file() and look_alike.read_bytes() == before
    # the other direction: a set named like the index file is saved beside it, not over it
    index_bytes = index.read_bytes()
    server.run(save_graph("collide/clash.safetensors.shield-index", overwrite=True))
    assert index.read_bytes() == index_bytes
    options = [name for name in load_options(server) if name.startswith("collide/")]
    assert sorted(options) == [
        "collide/clash.index.safetensors",
        "collide/clash.safetensors",
        "collide/clash.safetensors.shield-index.safetensors",
    ]
    for name in options:
        server.run(spell_on(name))  # every set loads and shields
    assert index.read_bytes() == index_bytes and look_alike.read_bytes() == before


# -- defect 7 ---------------------------------------------------------------------------------------
def test_damaged_set_files_fail_at_load_naming_the_file_and_the_fix(server, sets_dir):
    folder = sets_dir / "damaged"
    folder.mkdir(exist_ok=True)
    for name, (path, pattern) in damaged_set_files(folder).items():
        with pytest.raises(ServerError) as error:
            server.run(load_graph(f"damaged/{path.name}", "damaged_copy"), timeout=60)
        message = str(error.value)
        assert re.search(pattern, message), (name, message)
        assert f"Load Shield Set: {path.name}" in message
    assert not (sets_dir / "damaged_copy.safetensors").exists()


def test_a_checked_set_is_remembered_beside_it_and_a_change_in_place_is_caught(server, sets_dir):
    """Issue #13 item 5: Load Shield Set reads a set in full once per file content (a 13 GB set took 5
    minutes at every load); Save Shield Set records the file it wrote, Load a file from elsewhere once it
    checked it; the record beside the set is never listed, and a NaN written in place with the mtime put
    back is still refused."""
    path = pathlib.Path(saved_path(server.run(save_graph("checked/once", overwrite=True), timeout=60)))
    record = json.loads(verified_path_for(path).read_text())  # Save checked the latents: it records its file
    assert record["inode"] == path.stat().st_ino and record["size"] == path.stat().st_size
    server.run(load_graph("checked/once.safetensors", "checked/copy"), timeout=60)
    assert json.loads(verified_path_for(path).read_text()) == record
    outside = path.with_name("outside.safetensors")
    shutil.copyfile(path, outside)  # a set from elsewhere: a new inode, no record
    time.sleep(SETTLED_SECONDS + 0.5)  # only a settled file is remembered
    server.run(load_graph("checked/outside.safetensors", "checked/copy"), timeout=60)
    assert json.loads(verified_path_for(outside).read_text())["inode"] == outside.stat().st_ino
    assert sorted(name for name in load_options(server) if name.startswith("checked/")) == [
        "checked/copy.safetensors",
        "checked/once.safetensors",
        "checked/outside.safetensors",
    ]
    nan_written_in_place(path)
    with pytest.raises(ServerError, match=r"Load Shield Set: once.safetensors: the latents contain NaN or inf"):
        server.run(load_graph("checked/once.safetensors", "checked/copy"), timeout=60)


# -- defect 8 ---------------------------------------------------------------------------------------
def test_write_errors_name_the_input_to_change(server, sets_dir):
    with pytest.raises(ServerError, match=r"Save Shield Set: filename: the name 'xxx.*is 312 bytes long.*Shorten it"):
        server.queue(save_graph("x" * 300))
    with read_only_folder(sets_dir / "locked"):
        with pytest.raises(ServerError) as error:
            server.run(save_graph("locked/mine"), timeout=60)
    message = str(error.value)
    assert "is not writable" in message and "choose the filename input in a writable folder" in message
    assert "Errno" not in message and not list((sets_dir / "locked").iterdir())


# -- defect 9 ---------------------------------------------------------------------------------------
def from_folder_graph(folder: str, save_as: str) -> dict:
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "files_rgb.latent"}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "4": {
            "class_type": "ShieldSetFromImages",
            "inputs": {"vae": ["3", 0], "model": ["2", 0], "width": 16, "height": 16, "folder": folder},
        },
        "5": {
            "class_type": "ShieldSaveShieldSet",
            "inputs": {"shield_set": ["4", 0], "filename": save_as, "overwrite": True},
        },
    }


def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path)


def test_one_symlink_rule_for_folders_files_sub_folders_and_load(server, sets_dir, tmp_path):
    server.write_input_latent("files_rgb", rgb_items(2))
    input_dir = server.base_dir / "input"
    outside = tmp_path / "outside"
    _png(outside / "secret.png", (0, 0, 255))
    _png(input_dir / "links_other" / "green.png", (0, 255, 0))
    _png(input_dir / "links" / "red.png", (255, 0, 0))
    (input_dir / "links" / "inside_file.png").symlink_to(input_dir / "links_other" / "green.png")
    (input_dir / "links" / "inside_folder").symlink_to(input_dir / "links_other")
    server.run(from_folder_graph("links", "links_set"))
    assert load_shield_set(sets_dir / "links_set.safetensors").names == (
        "inside_file.png",
        "inside_folder/green.png",
        "red.png",
    )
    (input_dir / "links" / "secret.png").symlink_to(outside / "secret.png")
    with pytest.raises(ServerError, match=r"secret.png is a symlink to .*outside.*Copy the file into the folder"):
        server.run(from_folder_graph("links", "links_set_2"))
    (input_dir / "links" / "secret.png").unlink()
    (input_dir / "links" / "outside_folder").symlink_to(outside)
    with pytest.raises(ServerError, match=r"outside_folder is a symlink to .*outside"):
        server.run(from_folder_graph("links", "links_set_3"))
    (input_dir / "linked_away").symlink_to(outside)
    with pytest.raises(ServerError, match=r"points outside ComfyUI's input directory"):
        server.queue(from_folder_graph("linked_away", "links_set_4"))
    # a symlink loop, inside the folder or as the folder itself: a message, not "Symlink loop from" (RuntimeError)
    (input_dir / "links" / "loop_a").symlink_to(input_dir / "links" / "loop_b")
    (input_dir / "links" / "loop_b").symlink_to(input_dir / "links" / "loop_a")
    with pytest.raises(ServerError, match=r"Shield Set from Images: folder: .*loop_a is part of a symlink loop"):
        server.run(from_folder_graph("links", "links_set_5"))
    with pytest.raises(ServerError, match=r"folder - Shield Set from Images: folder: .*is part of a symlink loop"):
        server.queue(from_folder_graph("links/loop_a", "links_set_6"))
    with pytest.raises(ServerError, match=r"folder: the name 'xxx.*is 300 bytes long"):
        server.queue(from_folder_graph("x" * 300, "links_set_7"))

    (sets_dir / "alias.safetensors").symlink_to(sets_dir / "links_set.safetensors")
    server.run(load_graph("alias.safetensors", "alias_copy"))
    assert load_shield_set(sets_dir / "alias_copy.safetensors").names[0] == "inside_file.png"
    shutil.copy(sets_dir / "links_set.safetensors", outside / "theirs.safetensors")
    (sets_dir / "escape.safetensors").symlink_to(outside / "theirs.safetensors")
    (sets_dir / "escape_folder").symlink_to(outside)
    for name in ("escape.safetensors", "escape_folder/theirs.safetensors"):
        with pytest.raises(ServerError, match=r"points outside the shield set folder"):
            server.run(load_graph(name, "escaped_copy"))
    assert not (sets_dir / "escaped_copy.safetensors").exists()


# -- defect 5 ---------------------------------------------------------------------------------------
def embedder_graph(variant: str) -> dict:
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "files_rgb.latent"}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "4": {"class_type": "ShieldDreamSimLoader", "inputs": {"variant": variant}},
        "5": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "6": {
            "class_type": "ShieldReferenceSetFromImages",
            "inputs": {"images": ["5", 0], "vae": ["3", 0], "embedder": ["4", 0], "model": ["2", 0]},
        },
        "7": {
            "class_type": "ShieldSaveShieldSet",
            "inputs": {"shield_set": ["6", 0], "filename": "refs", "overwrite": True},
        },
    }


def test_the_outbound_recorder_sees_a_request_through_its_proxy(outbound):
    proxy = outbound.env()["HTTP_PROXY"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy}))
    with pytest.raises(OSError):
        opener.open("http://github.com/", timeout=5)
    assert any(b"github.com" in attempt for attempt in outbound.attempts)
    outbound.attempts.clear()


def test_dreamsim_with_damaged_files_never_reaches_the_network(server, outbound):
    from comfyui_shield.nodes.procreate import DREAMSIM_FILES, NEEDS_TORCH_HUB

    server.write_input_latent("files_rgb", rgb_items(2))
    folder = server.base_dir / "models" / "dreamsim"
    write_random_dreamsim(folder)
    made = []
    for name in sorted({name for variant in NEEDS_TORCH_HUB for name in DREAMSIM_FILES[variant]}):
        path = folder / name
        if not path.exists():
            path.mkdir() if name.endswith("_lora") else path.write_bytes(b"corrupt")
            made.append(path)
    checkpoint = folder / "open_clip_vitb32_pretrain.pth.tar"
    good = checkpoint.read_bytes()
    attempts_before = len(outbound.attempts)
    try:
        for variant in NEEDS_TORCH_HUB:
            with pytest.raises(ServerError, match=r"'variant' must be one of .*through torch.hub"):
                server.queue(embedder_graph(variant))
        checkpoint.write_bytes(b"not a checkpoint")
        with pytest.raises(ServerError, match=r"open_clip_vitb32_pretrain.pth.tar is damaged or not a weights file"):
            server.run(embedder_graph("open_clip_vitb32"), timeout=120)
    finally:
        checkpoint.write_bytes(good)
        for path in made:
            path.rmdir() if path.is_dir() else path.unlink()
    assert outbound.attempts[attempts_before:] == []
    assert not list(server.base_dir.rglob("trusted_list"))
    assert "Downloading" not in server.log()


def test_the_session_server_made_no_network_attempt(server, outbound):
    """Whatever ran before this in the session, the server never tried to reach the network."""
    assert outbound.attempts == [], [attempt[:80] for attempt in outbound.attempts]
