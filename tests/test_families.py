"""The family fixtures load through ComfyUI's own loaders as the real model classes (in-process).

What the family matrix (test_family_matrix.py) relies on: each random-weight file is detected as its
family's model class, latent format and model_sampling; its VAE has the family's latent channels
and dimensions; the files are reproducible from the seed; and the models predict something
non-trivial that depends on the conditioning (CFG has a real cond/uncond difference to work with).
"""

import hashlib

import comfy.latent_formats
import comfy.sd
import comfy.utils
import nodes as comfy_nodes
import pytest
import torch

from harness import families
from harness.family_graphs import FamilyGraph
from harness.family_nodes.conditioning import fabricated_conditioning

SCALE_FACTORS = {"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611}
SHIFTS = {"sd3": 3.0, "wan21": 8.0}


def load(family_files, name):
    family = family_files.files(name)
    root = family_files.models_dir
    path = root / family.folder / family.file_name
    if family.loader == "checkpoint":
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
        assert clip is None  # no text encoder in the fixture: conditioning is fabricated
    else:
        model = comfy.sd.load_diffusion_model(str(path))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(root / families.VAE_FOLDER / family.vae_file_name)))
    return family, model, vae


def sampling_classes(model) -> set[str]:
    return {cls.__name__ for cls in type(model.get_model_object("model_sampling")).__mro__}


@pytest.mark.parametrize("name", families.FAST_FAMILIES)
def test_family_loads_as_its_real_model_class(family_files, name):
    family, model, vae = load(family_files, name)
    assert type(model.model).__name__ == family.model_class
    latent_format = model.get_model_object("latent_format")
    assert type(latent_format).__name__ == family.latent_format
    assert family.sampling in sampling_classes(model)
    if name in SCALE_FACTORS:
        assert latent_format.scale_factor == pytest.approx(SCALE_FACTORS[name])
    if name in SHIFTS:
        assert model.get_model_object("model_sampling").shift == pytest.approx(SHIFTS[name])
    assert vae.latent_channels == family.channels == latent_format.latent_channels
    assert getattr(vae, "latent_dim", 2) == (3 if family.video else 2)


@pytest.mark.parametrize("name", families.FAST_FAMILIES)
def test_family_predicts_from_its_conditioning(family_files, name):
    family, model, _ = load(family_files, name)
    shape = family.latent_shape(2, 64, 64, frames=5)
    positive, negative = fabricated_conditioning(model, 1), fabricated_conditioning(model, 2)

    def sample(seed, cfg):
        (out,) = comfy_nodes.common_ksampler(
            model, seed, 3, cfg, "euler", "normal", positive, negative, {"samples": torch.zeros(shape)}
        )
        return out["samples"]

    first, again, other_seed, guided = sample(1, 1.0), sample(1, 1.0), sample(2, 1.0), sample(1, 4.0)
    assert first.shape == shape and torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other_seed, atol=1e-3)
    assert not torch.allclose(first, guided, atol=1e-3)  # cond and uncond predictions differ
    assert float(first.std()) > 1e-3


def test_files_are_reproducible_from_the_seed(tmp_path):
    def digest(folder, seed):
        state = families.diffusion_state_dict("sd3", seed)
        path = folder / "sd3.safetensors"
        families.save_state_dict(state, path, torch.float16, "{}")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(tmp_path / "a", 1) == digest(tmp_path / "b", 1)
    assert digest(tmp_path / "c", 1) != digest(tmp_path / "d", 2)


def test_no_weight_is_left_at_zero():
    state = families.diffusion_state_dict("wan21")
    assert all(bool(tensor.abs().min() > 0) or tensor.numel() == 0 for tensor in state.values())


@pytest.mark.parametrize("name", families.FAST_FAMILIES)
def test_family_samples_in_the_server_through_the_stock_loaders(server, family_files, name):
    family = family_files.link_into(server.base_dir / "models", name)
    graph = FamilyGraph(family)
    saved = graph.save_latent(graph.sample(graph.model), f"families/{name}")
    latent = server.saved_latent(server.run(graph.nodes), saved)
    assert tuple(latent.shape) == family.latent_shape(2, graph.width, graph.height, graph.frames)
    assert torch.isfinite(latent).all() and float(latent.std()) > 1e-3
