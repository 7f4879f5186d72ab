"""The tiny real UNets (EPS, V-prediction, flow) sample through ComfyUI: finite, seeded, deterministic."""

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning


def sample(model, seed):
    positive, negative = random_text_conditioning(1), random_text_conditioning(2)
    (out,) = comfy_nodes.common_ksampler(
        model, seed, 3, 4.0, "euler", "normal", positive, negative, {"samples": torch.zeros(2, 4, 8, 8)}
    )
    return out["samples"]


@pytest.mark.parametrize("prediction", ["eps", "v_prediction", "flow"])
def test_tiny_unet_samples_deterministically(prediction):
    model = build_tiny_unet(prediction, seed=3)
    first, again, other_seed = sample(model, 5), sample(model, 5), sample(model, 6)
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed)


def test_weights_are_seeded():
    a = build_tiny_unet(seed=1).model.diffusion_model.state_dict()
    b = build_tiny_unet(seed=1).model.diffusion_model.state_dict()
    c = build_tiny_unet(seed=2).model.diffusion_model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert any(not torch.equal(a[key], c[key]) for key in a)
