"""Early Copy Redraw in-process on the closed-form memorizer (it copies a prompted item from any start):
samples heading into a shield start again from a new noise and end on an item that is not a shield; samples
that never head into one are bit-identical to plain sampling on every sampler kind; the look-ahead is
bounded; other Shield methods act in the look-ahead as in a fresh run and record only the real run."""

import dataclasses

import comfy.model_management
import comfy.sd
import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.core.records import RECORDS
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes.redraw import ShieldEarlyCopyRedraw
from comfyui_shield.nodes.transition_cfg import TransitionPointCFG
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers.embedders import PixelEmbedder
from comfyui_shield.samplers.method_patch import add_model_gate
from comfyui_shield.samplers.risk_probe import KSamplerSettings, RiskGate, probe
from harness.procreate_parts import pixel_cosine, rgb_items, to_images

SIMILARITY = 0.7  # heading into a shield at the check (x̂0 of the memorizer at 30 %: a blend of items)
COPY = 0.99  # an output this similar to an item is that item


@pytest.fixture(scope="module")
def setup():
    items = rgb_items(6)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    return items, build_memorizer(items), vae


def sample(model, items, sampler="euler", subset=(0, 1, 2, 3), seed=3, batch=4, steps=8, cfg=2.0, positive=None):
    negative = subset_conditioning(len(items))
    positive = positive or subset_conditioning(len(items), list(subset))
    latent = {"samples": torch.zeros(batch, *items.shape[1:])}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, sampler, "karras", positive, negative, latent)
    return out["samples"]


def nearest(outputs, items):
    """[B] cosine of each output to its nearest item (the Pixel Embedder at 16 px sees these latents)."""
    return pixel_cosine(outputs, items).max(dim=1).values


def redraw(model, vae, shields, similarity=SIMILARITY, check=0.3, attempts=16):
    return ShieldEarlyCopyRedraw.execute(model, vae, PixelEmbedder(16), shields, similarity, check, attempts).result[0]


def shield_set(items, indices):
    chosen = items[list(indices)]
    return from_latents(chosen, "LatentFormat", images=to_images(chosen))


def test_samples_heading_into_a_shield_are_redrawn_and_end_on_another_item(setup):
    items, model, vae = setup
    shields = shield_set(items, [0, 1])
    plain = sample(model, items)
    assert (nearest(plain, items[:2]) > COPY).any()  # plain sampling copies protected items
    RECORDS.clear()
    outputs = sample(redraw(model, vae, shields), items)
    record = RECORDS.latest("early_copy_redraw")
    summary = record.summary
    assert summary["exhausted_samples"] == [] and summary["redrawn_samples"]
    assert (nearest(outputs, items[:2]) < COPY).all()  # no output is a protected item
    assert (nearest(outputs, items[2:4]) > COPY).all()  # each is an unprotected prompted item, drawn clean
    unchanged = [b for b in range(4) if b not in summary["redrawn_samples"]]
    assert torch.equal(outputs[unchanged], plain[unchanged])
    checks = [step for step in record.steps if step["attempt"] > 0]
    assert len(checks) == max(summary["attempts"]) and len(record.steps) == len(checks) + 8
    assert torch.equal(outputs, sample(redraw(model, vae, shields), items))  # reproducible from the seed


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "uni_pc"])
def test_no_sample_near_a_shield_leaves_sampling_bit_identical(setup, sampler):
    items, model, vae = setup
    shields = shield_set(items, [4, 5])  # the prompt never draws items 4 and 5
    plain = sample(model, items, sampler)
    RECORDS.clear()
    assert torch.equal(sample(redraw(model, vae, shields), items, sampler), plain)
    summary = RECORDS.latest("early_copy_redraw").summary
    assert summary["attempts"] == [1] * 4 and summary["redrawn_samples"] == []


def test_the_look_ahead_is_bounded_and_keeps_the_least_similar_start(setup):
    items, model, vae = setup
    shields = shield_set(items, range(6))  # every item is protected: every check heads into a shield
    RECORDS.clear()
    outputs = sample(redraw(model, vae, shields, attempts=5), items)
    summary = RECORDS.latest("early_copy_redraw").summary
    assert summary["attempts"] == [5] * 4 and summary["exhausted_samples"] == [0, 1, 2, 3]
    assert summary["probe_steps"] == 5 * 3  # 5 checks of 3 steps (karras, 8 steps, check at 30 %)
    assert torch.isfinite(outputs).all()


def test_the_stop_button_ends_the_look_ahead(setup):
    items, model, vae = setup
    patched = redraw(model, vae, shield_set(items, range(6)), similarity=-1.0, attempts=1000)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            sample(patched, items, steps=10000)
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_other_methods_act_in_the_look_ahead_as_in_a_fresh_run_and_record_only_the_real_run(setup):
    """Transition-Point CFG with unconditional guidance before a static point changes which item a sample
    becomes (the check must come after the point); the look-ahead must see that (so accepted starts stay accepted) and must not leave its steps or
    its state in Transition-Point CFG's record."""
    items, model, vae = setup
    (guided,) = TransitionPointCFG.execute(model, "static", 0.5, 0.0, "unconditional", 2.0, 1.0).result
    shields = shield_set(items, [0, 1])
    RECORDS.clear()
    plain_tpcfg = sample(guided, items)
    plain_record = RECORDS.latest("transition_cfg")
    outputs = sample(redraw(guided, vae, shields, check=0.8), items)  # the check after the switch (step 5 of 8)
    transition = RECORDS.latest("transition_cfg")
    assert transition is not plain_record and len(transition.steps) == len(plain_record.steps) == 8
    assert transition.summary["switch_step"] == plain_record.summary["switch_step"]
    summary = RECORDS.latest("early_copy_redraw").summary
    assert (nearest(outputs, items[:2]) < COPY).all()
    kept = [b for b in range(4) if b not in summary["redrawn_samples"]]
    assert torch.equal(outputs[kept], plain_tpcfg[kept])


def test_a_memorization_risk_gate_limits_the_redraw_to_flagged_samples_and_accepts_their_new_starts(setup):
    """The gate checks that the sampler starts from the noise the risk was measured on; a redrawn sample starts
    from another by design, and only a flagged sample may be redrawn."""
    items, model, vae = setup
    negative, positive = subset_conditioning(len(items)), subset_conditioning(len(items), [0, 1, 2, 3])
    latent = {"samples": torch.zeros(4, *items.shape[1:])}
    risk = probe(model, positive, negative, latent, KSamplerSettings(3, 8, 2.0, "euler", "karras"), 1, 0.0)
    flagged = (True, True, False, False)
    patched = redraw(model, vae, shield_set(items, [0, 1]))
    add_model_gate(patched, RiskGate(dataclasses.replace(risk, flagged=flagged)))
    plain = sample(model, items)
    RECORDS.clear()
    outputs = sample(patched, items)
    summary = RECORDS.latest("early_copy_redraw").summary
    heading = nearest(plain, items[:2]) > COPY
    assert set(summary["redrawn_samples"]) == {b for b in range(4) if flagged[b] and heading[b]}
    assert summary["redrawn_samples"] and heading[2:].any(), "pick a seed where both kinds head into a shield"
    assert torch.equal(outputs[2:], plain[2:])  # not flagged: never redrawn


def _allow_all(args):
    return None  # a Shield gate that holds nothing back: its presence alone makes the look-ahead probe whole batches


def per_sample_prompts(n_items: int, subsets: list) -> list:
    """One CONDITIONING row per sample (sample b prompts `subsets[b]`): a sub-batch must take its own rows."""
    rows = [subset_conditioning(n_items, subset)[0][0] for subset in subsets]
    return [[torch.cat(rows), {}]]


@pytest.mark.parametrize("sampler, per_sample", [("euler", False), ("dpmpp_2m", False), ("uni_pc", True)])
def test_on_a_sampler_that_draws_no_noise_only_the_samples_still_heading_into_a_shield_are_probed_again(
    setup, sampler, per_sample
):
    items, model, vae = setup
    shields = shield_set(items, [0, 1])
    positive = per_sample_prompts(len(items), [[0, 1, 2], [0, 1, 3], [0, 1, 4]] * 2) if per_sample else None
    RECORDS.clear()
    by_rows = sample(redraw(model, vae, shields), items, sampler, batch=6, positive=positive)
    by_rows_summary = RECORDS.latest("early_copy_redraw").summary
    whole = redraw(model, vae, shields)
    add_model_gate(whole, _allow_all)
    whole_batches = sample(whole, items, sampler, batch=6, positive=positive)
    whole_summary = RECORDS.latest("early_copy_redraw").summary
    assert by_rows_summary["attempts"] == whole_summary["attempts"] and max(whole_summary["attempts"]) > 2
    assert by_rows_summary["redrawn_samples"] == whole_summary["redrawn_samples"]
    assert torch.allclose(by_rows, whole_batches, atol=1e-5)
    steps = whole_summary["probe_steps"] / max(whole_summary["attempts"])  # probe steps of one check
    assert by_rows_summary["probe_steps"] == pytest.approx(steps * sum(by_rows_summary["attempts"]) / 6)
    assert by_rows_summary["probe_steps"] < whole_summary["probe_steps"]
    if per_sample:  # each sample ends on the unprotected item of its own prompt
        own = items[[2, 3, 4] * 2].flatten(1).double()
        assert (torch.cosine_similarity(by_rows.clamp(-1, 1).flatten(1).double(), own) > COPY).all()


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde"])
def test_a_sampler_that_draws_noise_probes_whole_batches(setup, sampler):
    items, model, vae = setup
    RECORDS.clear()
    sample(redraw(model, vae, shield_set(items, [0, 1])), items, sampler, batch=6)
    summary = RECORDS.latest("early_copy_redraw").summary
    assert max(summary["attempts"]) > min(summary["attempts"])
    assert summary["probe_steps"] == 3 * max(summary["attempts"])  # 3 steps per check (karras, 8 steps, 30 %)
