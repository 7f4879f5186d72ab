"""When Early Copy Redraw may probe part of a batch (samplers/sample_subset.py): only when the sub-batch
follows the same trajectories as the whole batch. Real ComfyUI samplers, conds and guider; the behaviour of
the look-ahead with and without sub-batches is in test_redraw.py."""

import comfy.conds
import comfy.samplers
import pytest
import torch

from comfyui_shield.reference_models.memorizer import build_memorizer
from comfyui_shield.samplers import sample_subset as ss
from comfyui_shield.samplers.method_patch import MIXES_SAMPLES_KEY, MODEL_GATES_KEY
from harness.procreate_parts import rgb_items

BATCH = 4


@pytest.fixture(scope="module")
def guider():
    return comfy.samplers.CFGGuider(build_memorizer(rgb_items(3)))


def conds(cross_attn_rows=1, **extra):
    entry = {
        "model_conds": {"c_crossattn": comfy.conds.CONDCrossAttn(torch.arange(cross_attn_rows * 3.0).reshape(-1, 1, 3))}
    }
    return {"positive": [{**entry, **extra}], "negative": [entry]}


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "lms", "deis", "ipndm", "uni_pc", "uni_pc_bh2"])
def test_samplers_that_draw_no_noise_are_known_by_name(name):
    assert ss.draws_no_noise(comfy.samplers.sampler_object(name))


@pytest.mark.parametrize(
    "name", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "lcm", "ddpm", "ddim"]
)
def test_samplers_that_draw_noise_or_may_are_not(name):
    assert not ss.draws_no_noise(comfy.samplers.sampler_object(name))  # ddim: inpainting with random noise


def test_euler_with_churn_draws_noise():
    assert not ss.draws_no_noise(comfy.samplers.ksampler("euler", {"s_churn": 1.0}))


def test_a_sub_batch_is_allowed_with_shared_or_per_sample_conditioning_and_takes_its_own_rows(guider):
    euler = comfy.samplers.sampler_object("euler")
    for rows in (1, BATCH):
        guider.conds = conds(rows)
        assert ss.subset_sampling(euler, guider, {}, BATCH, torch.zeros(BATCH, 3, 8, 8), None)
    whole = guider.conds
    with ss.rows_of(guider, torch.tensor([1, 3]), BATCH):
        taken = guider.conds["positive"][0]["model_conds"]["c_crossattn"].cond
        assert taken[:, 0].tolist() == [[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]
    assert guider.conds is whole
    assert ss.take_rows(torch.arange(BATCH), torch.tensor([0, 2])).tolist() == [0, 2]
    assert ss.take_rows(torch.zeros(1, 3), torch.tensor([0, 2])).shape == (1, 3)


@pytest.mark.parametrize(
    "why",
    ["noise", "gate", "mixes samples", "controlnet", "gligen", "conditioning rows", "latent rows", "mask rows"],
)
def test_a_sub_batch_is_refused_when_it_could_change_a_trajectory(guider, why):
    sampler = comfy.samplers.sampler_object("euler_ancestral" if why == "noise" else "euler")
    options = (
        {MODEL_GATES_KEY: [print]} if why == "gate" else {MIXES_SAMPLES_KEY: True} if why == "mixes samples" else {}
    )
    extra = (
        {"control": object()} if why == "controlnet" else {"gligen": ("position", None, [])} if why == "gligen" else {}
    )
    if why == "mask rows":
        extra = {"mask": torch.ones(2, 8, 8)}
    guider.conds = conds(2 if why == "conditioning rows" else 1, **extra)
    latent = torch.zeros(2 if why == "latent rows" else BATCH, 3, 8, 8)
    assert not ss.subset_sampling(sampler, guider, options, BATCH, latent, None)
