"""Shield set nodes: from images (real pixel_space VAE), save/load files, bad files, memory store."""

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.core.shield_files import load_shield_set, resolve_inside, save_shield_set
from comfyui_shield.core.shield_memory import MemoryContents
from comfyui_shield.core.shield_set import ShieldSetError, from_latents
from comfyui_shield.nodes import shield_sets as nodes_module
from comfyui_shield.nodes.shield_sets import (
    LoadShieldSet,
    SaveShieldSet,
    ShieldRadiusCalibration,
    ShieldSetFromImages,
    cover_and_centre_crop,
)
from comfyui_shield.reference_models.memorizer import build_memorizer


def test_cover_and_centre_crop_keeps_the_centre():
    image = torch.zeros(1, 10, 20, 3)
    image[:, :, 5:15, :] = 1.0  # a bright square in the middle of a wide image
    out = cover_and_centre_crop(image, 10, 10)
    assert out.shape == (1, 10, 10, 3)
    assert float(out.mean()) > 0.95  # the crop kept the centre, not stretched the whole image


def test_from_images_encodes_with_a_real_vae_and_caches(monkeypatch):
    (vae,) = comfy_nodes.VAELoader().load_vae("pixel_space")
    model = build_memorizer(torch.randn(2, 3, 16, 16))
    images = torch.rand(3, 24, 16, 3)
    first = ShieldSetFromImages.execute(images, vae, model, 16, 16).result[0]
    assert first.latents.shape == (3, 3, 16, 16) and first.latent_format == "LatentFormat"
    assert first.settings["resize"].startswith("cover")
    calls = []
    monkeypatch.setattr(nodes_module, "encode_images", lambda *a: calls.append(a))
    again = ShieldSetFromImages.execute(images.clone(), vae, model, 16, 16).result[0]
    assert again is first and calls == []  # same pixels, same VAE: no second encode
    with pytest.raises(ShieldSetError, match="empty"):
        ShieldSetFromImages.execute(images[:0], vae, model, 16, 16)


def test_save_and_load_round_trip_through_the_nodes(shield_folder):
    shields = from_latents(torch.randn(4, 4, 8, 8), "SD15", settings={"width": 64})
    path = SaveShieldSet.execute(shields, "sub/mine", False).result[0]
    assert path.endswith("sub/mine.safetensors")
    second = SaveShieldSet.execute(shields, "sub/mine", False).result[0]
    assert second.endswith("sub/mine_1.safetensors")  # never overwrites unless asked
    assert not list(shield_folder.rglob("*.tmp"))  # atomic write left no temp file
    loaded = LoadShieldSet.execute("sub/mine.safetensors").result[0]
    assert torch.equal(loaded.latents, shields.latents)
    assert loaded.names == shields.names and loaded.hashes == shields.hashes
    assert loaded.latent_format == "SD15" and loaded.settings == {"width": 64}
    assert LoadShieldSet.fingerprint_inputs("sub/mine.safetensors") != LoadShieldSet.fingerprint_inputs(
        "sub/mine_1.safetensors"
    )


def test_file_names_cannot_escape_the_folder(shield_folder):
    for name in ("../evil", "/etc/passwd", "a/../../evil", ""):
        with pytest.raises(ShieldSetError):
            resolve_inside(str(shield_folder), name, "Save Shield Set: filename")
        assert isinstance(SaveShieldSet.validate_inputs(filename=name), str)
    assert SaveShieldSet.validate_inputs(filename="ok/name") is True


def test_corrupt_truncated_foreign_and_empty_files_fail_clearly(tmp_path):
    good = tmp_path / "good.safetensors"
    save_shield_set(from_latents(torch.randn(2, 4, 8, 8), "SD15"), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a safetensors file")
    for path in (truncated, garbage):
        with pytest.raises(ShieldSetError, match="corrupt or truncated"):
            load_shield_set(path)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ShieldSetError, match="not a Shield set"):
        load_shield_set(foreign)
    empty_memory = MemoryContents.empty().as_shield_set("x")
    with pytest.raises(ShieldSetError, match="empty"):
        save_shield_set(empty_memory, tmp_path / "empty.safetensors")


def test_radius_calibration_reports_the_median_distance():
    model = build_memorizer(torch.randn(2, 4, 8, 8))
    batch = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    relative, text = ShieldRadiusCalibration.execute({"samples": batch}, model).result
    assert relative == pytest.approx(2**0.5, rel=0.15) and "median pairwise distance" in text
    with pytest.raises(ValueError, match="at least 2"):
        ShieldRadiusCalibration.execute({"samples": batch[:1]}, model)


def test_set_from_images_shows_thumbnails_and_memory_reports_its_size():
    import comfy.sd

    from comfyui_shield.nodes.shield_sets import PREVIEW_CELL, ShieldMemory, ShieldSetFromImages, preview_grid
    from comfyui_shield.reference_models.memorizer import build_memorizer

    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    model = build_memorizer(torch.zeros(2, 3, 8, 8), "eps")
    images = torch.rand(5, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    output = ShieldSetFromImages.execute(images, vae, model, 16, 16)
    (preview,) = output.ui.as_dict()["images"]
    assert preview["type"] == "temp" and preview["filename"].endswith(".png")
    grid = preview_grid(images)
    assert grid.shape == (1, 2 * PREVIEW_CELL, 4 * PREVIEW_CELL, 3)
    assert torch.equal(grid[0, :PREVIEW_CELL:12, :PREVIEW_CELL:12], images[0])  # nearest-neighbour tiles
    memory = ShieldMemory.execute("thumbnails-test", True)
    assert memory.ui["text"] == [
        "memory 'thumbnails-test' (this server): 0 earlier outputs remembered (max_items 4096, drop oldest)"
    ]


# -- Shield Set from Images: folder input ------------------------------------------------------------
def _write_images(folder):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 20), (255, 0, 0)).save(folder / "a_red.png")  # wide
    (folder / "b").mkdir(exist_ok=True)
    Image.new("RGB", (12, 40), (0, 0, 255)).save(folder / "b" / "blue.jpg", quality=95)  # tall, other size
    (folder / "notes.txt").write_text("not an image")


def test_folder_input_reads_mixed_sizes_and_skips_non_images(input_folder, caplog):
    _write_images(input_folder / "protected")
    (vae,) = comfy_nodes.VAELoader().load_vae("pixel_space")
    model = build_memorizer(torch.randn(2, 3, 16, 16))
    with caplog.at_level("WARNING"):
        shields = ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="protected").result[0]
    assert "notes.txt" in caplog.text  # the skipped file is listed
    assert shields.names == ("a_red.png", "b/blue.jpg") and shields.latents.shape == (2, 3, 16, 16)
    red, blue = shields.images
    assert float(red[..., 0].min()) > 0.99 and float(red[..., 2].max()) < 0.01
    assert float(blue[..., 2].mean()) > 0.9 and float(blue[..., 0].mean()) < 0.1  # JPEG: close, not exact
    assert shields.settings["source"] == "folder:protected"
    assert ShieldSetFromImages.fingerprint_inputs(folder="protected") == ShieldSetFromImages.fingerprint_inputs(
        folder="protected"
    )
    before = ShieldSetFromImages.fingerprint_inputs(folder="protected")
    (input_folder / "protected" / "a_red.png").write_bytes((input_folder / "protected" / "b" / "blue.jpg").read_bytes())
    assert ShieldSetFromImages.fingerprint_inputs(folder="protected") != before  # a rewritten file re-runs the node


def test_folder_input_refuses_corrupt_empty_and_escaping_folders(input_folder):
    from PIL import Image

    (vae,) = comfy_nodes.VAELoader().load_vae("pixel_space")
    model = build_memorizer(torch.randn(2, 3, 16, 16))
    broken = input_folder / "broken"
    _write_images(broken)
    Image.new("RGB", (64, 64), (10, 200, 30)).save(broken / "c_cut.png")
    data = (broken / "c_cut.png").read_bytes()
    (broken / "c_cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ShieldSetError, match="c_cut.png.*corrupt or truncated"):
        ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="broken")
    (input_folder / "empty").mkdir()
    with pytest.raises(ShieldSetError, match="empty"):
        ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="empty")
    (input_folder / "texts").mkdir()
    (input_folder / "texts" / "a.txt").write_text("x")
    with pytest.raises(ShieldSetError, match="no image files"):
        ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="texts")
    for name in ("../outside", "/etc", "empty/../../outside"):
        assert "outside ComfyUI's input directory" in ShieldSetFromImages.validate_inputs(folder=name)
        with pytest.raises(ShieldSetError, match="outside"):
            ShieldSetFromImages.execute(None, vae, model, 16, 16, folder=name)
    assert ShieldSetFromImages.validate_inputs(folder="empty") is True
    with pytest.raises(ShieldSetError, match="exactly one"):
        ShieldSetFromImages.execute(torch.rand(1, 16, 16, 3), vae, model, 16, 16, folder="empty")
    with pytest.raises(ShieldSetError, match="exactly one"):
        ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="")


def test_folder_input_respects_interrupts(input_folder):
    import comfy.model_management

    _write_images(input_folder / "protected")
    (vae,) = comfy_nodes.VAELoader().load_vae("pixel_space")
    model = build_memorizer(torch.randn(2, 3, 16, 16))
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            ShieldSetFromImages.execute(None, vae, model, 16, 16, folder="protected")
    finally:
        comfy.model_management.interrupt_current_processing(False)
