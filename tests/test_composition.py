"""Our patches stacked on one model, with core patches (PAG) and through every kind of sampler node.

Real ComfyUI models: the closed-form memorizer (pixel-space items, so the stock pixel_space VAE decodes
them for ProCreate) and the tiny UNet (which has the self-attention PAG perturbs).
"""

import comfy.samplers
import comfy.sd
import nodes as comfy_nodes
import pytest
import torch
from comfy_extras.nodes_custom_sampler import (
    BasicGuider,
    BasicScheduler,
    CFGGuider,
    KSamplerSelect,
    RandomNoise,
    SamplerCustomAdvanced,
)
from comfy_extras.nodes_pag import PerturbedAttentionGuidance

from comfyui_shield.core.records import RECORDS
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes.spell import repellency_model
from comfyui_shield.nodes.transition_cfg import TransitionPointCFG
from comfyui_shield.reference_models.memorizer import build_memorizer, minimum_item_spacing, subset_conditioning
from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning
from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings
from harness.procreate_parts import pooled_projection_embedder, rgb_items, to_images

FORMAT = "LatentFormat"  # the memorizer's latent format class name
CFG = 3.0
PROTECTED = 3


@pytest.fixture(scope="module")
def items():
    return rgb_items(6)


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


def ksample(model, conds, batch=3, shape=(3, 16, 16), seed=4, steps=8, sampler="euler", scheduler="karras", cfg=CFG):
    positive, negative = conds
    latent = {"samples": torch.zeros(batch, *shape)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, scheduler, positive, negative, latent)
    return out["samples"]


# -- SPELL + Transition-Point CFG + ProCreate on one memorizer --------------------------------------------
def add_spell(model, items, **_):
    return repellency_model(
        model, from_latents(items[:PROTECTED], FORMAT), None, 6.0, "absolute", 1.6, True, 0.0, 1.0, "auto"
    )


def add_transition(model, items, **_):
    return TransitionPointCFG.execute(model, "static", 0.5, 0.0, "unconditional", 2.0, 1.0).result[0]


def add_procreate(model, items, vae=None):
    reference = from_latents(items[:PROTECTED], FORMAT, images=to_images(items[:PROTECTED]))
    clone = model.clone()
    settings = ProCreateSettings(gamma=60.0, gradient_mode="fast")
    ProCreateGuidance(vae, pooled_projection_embedder(), reference, settings, patch_id="compose").attach(clone)
    return clone


PATCHES = {"spell": add_spell, "transition": add_transition, "procreate": add_procreate}


def stacked(items, vae, order):
    model = build_memorizer(items, "eps")
    for name in order:
        model = PATCHES[name](model, items, vae=vae)
    return model


def activity(cfg=CFG) -> dict:
    """What each patch's newest run record says it did."""
    spell = RECORDS.latest("sparse_repellency")
    transition = RECORDS.latest("transition_cfg")
    procreate = RECORDS.latest("procreate", "compose")
    return {
        "spell": spell.summary["active_steps"],
        "transition": sum(g != cfg for step in transition.steps for g in step["guidance"]),
        "procreate": procreate.summary["guided_steps"],
    }


@pytest.mark.parametrize("order", [("transition", "spell", "procreate"), ("procreate", "spell", "transition")])
def test_spell_transition_and_procreate_all_act_on_one_model(items, vae, order):
    conds = (subset_conditioning(len(items), [0, 1, 2, 3]), subset_conditioning(len(items)))
    RECORDS.clear()
    full = ksample(stacked(items, vae, order), conds)
    done = activity()
    assert all(count > 0 for count in done.values()), done
    for left_out in order:
        pair = tuple(name for name in order if name != left_out)
        without = ksample(stacked(items, vae, pair), conds)
        assert (full - without).abs().max() > 1e-3, f"{left_out} made no difference on top of {pair}"
    assert torch.isfinite(full).all()


# -- with core PAG on the tiny UNet ---------------------------------------------------------------------
def pag(model, scale=3.0):
    return PerturbedAttentionGuidance.execute(model, scale).result[0]


def tiny_conds():
    return random_text_conditioning(1), random_text_conditioning(2)


def test_spell_and_pag_both_act():
    base = build_tiny_unet("eps", seed=2)
    shape = (4, 8, 8)

    # intra-batch only; the random-weight UNet's outputs lie ~1850 apart, so r = 3000 reaches them
    def spell(model):
        return repellency_model(model, None, None, 3000.0, "absolute", 1.6, True, 0.0, 1.0, "auto")

    pag_only = ksample(pag(base), tiny_conds(), shape=shape)
    spell_only = ksample(spell(base), tiny_conds(), shape=shape)
    for stack in (spell(pag(base)), pag(spell(base))):
        out = ksample(stack, tiny_conds(), shape=shape)
        assert RECORDS.latest("sparse_repellency").summary["active_steps"] > 0
        assert (out - pag_only).abs().max() > 1e-3 and (out - spell_only).abs().max() > 1e-3


def test_transition_cfg_and_pag_both_act():
    base = build_tiny_unet("eps", seed=2)
    shape = (4, 8, 8)

    def transition(model):
        return TransitionPointCFG.execute(model, "static", 0.5, 0.0, "opposite", 2.0, 1.0).result[0]

    pag_only = ksample(pag(base), tiny_conds(), shape=shape)
    transition_only = ksample(transition(base), tiny_conds(), shape=shape)
    for stack in (transition(pag(base)), pag(transition(base))):
        out = ksample(stack, tiny_conds(), shape=shape)
        guidance = [g for step in RECORDS.latest("transition_cfg").steps for g in step["guidance"]]
        assert -2.0 in guidance and CFG in guidance  # opposite before the switch, the sampler's cfg after
        assert (out - pag_only).abs().max() > 1e-3 and (out - transition_only).abs().max() > 1e-3


# -- SPELL through SamplerCustomAdvanced (CFGGuider, BasicGuider) and KSamplerAdvanced ---------------------
RADIUS = 4.0


def min_distance(samples, shields):
    return float(torch.cdist(samples.flatten(1).double(), shields.flatten(1).double()).min())


@pytest.fixture(scope="module")
def latent_items(memorizer_items):
    assert minimum_item_spacing(memorizer_items) > (1 + 1.6) * RADIUS
    return memorizer_items


def shielded_memorizer(latent_items):
    model = build_memorizer(latent_items, "eps")
    shields = from_latents(latent_items, FORMAT)
    return model, repellency_model(model, shields, None, RADIUS, "absolute", 1.6, False, 0.0, 1.0, "auto")


def custom_advanced(model, guider, sampler_name, items, batch=3, seed=6, steps=8):
    (sigmas,) = BasicScheduler.execute(model, "karras", steps, 1.0).result
    (sampler,) = KSamplerSelect.execute(sampler_name).result
    (noise,) = RandomNoise.execute(seed).result
    latent = {"samples": torch.zeros(batch, *items.shape[1:])}
    out, _ = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).result
    return out["samples"]


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "heun"])
@pytest.mark.parametrize("guider_kind", ["cfg", "basic"])
def test_guarantee_through_sampler_custom_advanced(latent_items, guider_kind, sampler_name):
    whole = subset_conditioning(len(latent_items))

    def guider(model):
        if guider_kind == "cfg":
            return CFGGuider.execute(model, subset_conditioning(len(latent_items), [0, 2, 4]), whole, 2.0).result[0]
        return BasicGuider.execute(model, whole).result[0]

    plain_model, shielded = shielded_memorizer(latent_items)
    plain = custom_advanced(plain_model, guider(plain_model), sampler_name, latent_items)
    assert min_distance(plain, latent_items) < 1e-3  # the memorizer copies without the shield
    out = custom_advanced(shielded, guider(shielded), sampler_name, latent_items)
    assert min_distance(out, latent_items) >= RADIUS - 1e-4
    assert RECORDS.latest("sparse_repellency").summary["touched_samples"] == [0, 1, 2]


def ksampler_advanced(model, items, start, end, add_noise, leftover, latent=None, seed=8, steps=8):
    conditioning = subset_conditioning(len(items))
    latent = latent or {"samples": torch.zeros(3, *items.shape[1:])}
    (out,) = comfy_nodes.KSamplerAdvanced().sample(
        model,
        add_noise,
        seed,
        steps,
        1.5,
        "dpmpp_2m",
        "karras",
        conditioning,
        conditioning,
        latent,
        start,
        end,
        leftover,
    )
    return out


def test_guarantee_through_ksampler_advanced_steps(latent_items):
    plain_model, shielded = shielded_memorizer(latent_items)
    whole = ksampler_advanced(shielded, latent_items, 0, 10000, "enable", "disable")
    assert min_distance(whole["samples"], latent_items) >= RADIUS - 1e-4
    # two stages: plain for steps 0-4 (with leftover noise), shielded for 4-8: the shield still holds
    first = ksampler_advanced(plain_model, latent_items, 0, 4, "enable", "enable")
    second = ksampler_advanced(shielded, latent_items, 4, 10000, "disable", "disable", latent=first)
    assert min_distance(second["samples"], latent_items) >= RADIUS - 1e-4
    record = RECORDS.latest("sparse_repellency")
    assert len(record.steps) == 4 and record.summary["active_steps"] > 0
    plain_second = ksampler_advanced(plain_model, latent_items, 4, 10000, "disable", "disable", latent=first)
    assert min_distance(plain_second["samples"], latent_items) < 1e-3
