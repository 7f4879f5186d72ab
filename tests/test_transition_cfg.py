"""Transition-Point CFG on real ComfyUI models: exactness, per-sample switching, samplers, composition, state."""

import json
import math

import comfy.samplers
import nodes as comfy_nodes
import pytest
import torch
from comfy_extras.nodes_custom_sampler import Guider_Basic
from comfy_extras.nodes_model_advanced import RescaleCFG

from comfyui_shield.core.records import RECORDS, touched_summary
from comfyui_shield.nodes.transition_cfg import TransitionPointCFG, build_settings, check_settings
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning
from comfyui_shield.samplers.transition_hook import KIND, TransitionCfgPatch, TransitionSettings, transition_step
from comfyui_shield.samplers.transition_math import first_local_minimum_step, guided
from harness.server import ServerError

PREDICTIONS = ["eps", "v_prediction", "flow"]
N_ITEMS = 6


def conditioning():
    """Memorizer conditioning with cond ≠ uncond: a subset against the whole set."""
    return subset_conditioning(N_ITEMS, [1, 4]), subset_conditioning(N_ITEMS)


def ksample(
    model, positive, negative, cfg=3.0, steps=8, sampler="euler", scheduler="karras", seed=7, batch=3, denoise=1.0
):
    latent = torch.zeros(batch, 4, 8, 8)
    (out,) = comfy_nodes.common_ksampler(
        model, seed, steps, cfg, sampler, scheduler, positive, negative, {"samples": latent}, denoise=denoise
    )
    return out["samples"]


def patch(model, mode="static", percent=0.5, sigma=0.0, before="unconditional", opposite_scale=2.0, cap=1.0):
    (patched,) = TransitionPointCFG.execute(model, mode, percent, sigma, before, opposite_scale, cap).result
    return patched


def record_predictions(model):
    """A clone that records, per evaluation, the original (cond, uncond) and the final denoised.

    The pre-CFG recorder sits before the patch's own hook (hooks run in list order), the post-CFG
    recorder after ComfyUI's cfg combination."""
    seen = {"cond": [], "uncond": [], "denoised": []}
    recorder = model.clone()

    def before(args):
        seen["cond"].append(args["conds_out"][0].clone())
        seen["uncond"].append(args["conds_out"][1].clone())
        return args["conds_out"]

    def after(args):
        seen["denoised"].append(args["denoised"].clone())
        return args["denoised"]

    recorder.set_model_sampler_pre_cfg_function(before)
    recorder.set_model_sampler_post_cfg_function(after)
    return recorder, seen


@pytest.mark.parametrize("build", [build_memorizer, None], ids=["memorizer", "tiny_unet"])
def test_static_zero_percent_is_bit_identical_to_plain_cfg(build, memorizer_items):
    model = build_memorizer(memorizer_items) if build else build_tiny_unet("eps", seed=1)
    positive, negative = conditioning() if build else (random_text_conditioning(1), random_text_conditioning(2))
    plain = ksample(model, positive, negative)
    hooked = model.clone()  # the hook itself, not the node's early return, must leave CFG untouched
    settings = TransitionSettings("static", "unconditional", 0.0, transition_sigma=999999999.9)
    TransitionCfgPatch(settings, patch_id="test-static-zero").attach(hooked)
    assert torch.equal(ksample(hooked, positive, negative), plain)
    assert all(all(step["switched"]) for step in RECORDS.latest(KIND, "test-static-zero").steps)
    assert torch.equal(ksample(patch(model, percent=0.0), positive, negative), plain)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_static_hundred_percent_is_unconditional_sampling(prediction, memorizer_items):
    model = build_memorizer(memorizer_items, prediction)
    positive, negative = conditioning()
    unconditional = ksample(model, negative, negative, cfg=3.0)
    patched = ksample(patch(model, percent=1.0), positive, negative, cfg=3.0)
    assert torch.equal(patched, unconditional)
    assert not torch.equal(ksample(model, positive, negative, cfg=3.0), unconditional)  # cond ≠ uncond here
    summary = RECORDS.latest(KIND).summary
    assert summary["never_switched"] == [0, 1, 2]


def test_cfg_one_is_a_recorded_no_op_without_an_extra_uncond_pass(memorizer_items):
    """cfg 1 (Flux dev, BasicGuider): no CFG to transition. The output is plain cfg-1 sampling, ComfyUI
    never evaluates the uncond (the patch does not disable the cfg-1 optimization), and the record and
    the run summary say why (docs/families.md)."""
    model = build_memorizer(memorizer_items)
    positive, negative = conditioning()
    plain = ksample(model, positive, negative, cfg=1.0)
    uncond_evaluated = []
    watched = patch(model, percent=1.0).clone()
    watched.set_model_sampler_pre_cfg_function(
        lambda args: uncond_evaluated.append(args["conds"][1] is not None) or args["conds_out"]
    )
    assert torch.equal(ksample(watched, positive, negative, cfg=1.0), plain)
    assert uncond_evaluated and not any(uncond_evaluated)
    record = RECORDS.latest(KIND)
    assert record.summary["note"].startswith("inactive: sampled at cfg 1")
    assert not any(any(step["touched"]) for step in record.steps)
    assert all(math.isnan(value) for step in record.steps for value in step["d_t"])
    assert touched_summary(record)["note"] == record.summary["note"]


def test_cfg_zero_still_applies_the_before_guidance(memorizer_items):
    model = build_memorizer(memorizer_items)
    positive, negative = conditioning()
    unconditional = ksample(model, negative, negative, cfg=1.0)
    # cfg 0: no rewritten cond can do it; both predictions become the target (here: cond only)
    conditional_only = ksample(model, positive, negative, cfg=1.0)
    patched = ksample(patch(model, percent=1.0, before="conditional"), positive, negative, cfg=0.0)
    torch.testing.assert_close(patched, conditional_only, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(conditional_only, unconditional, atol=1e-2)
    assert RECORDS.latest(KIND).summary["note"] == ""


@pytest.mark.parametrize("before, expected_scale", [("opposite", -2.5), ("conditional", 1.0), ("unconditional", 0.0)])
def test_before_guidance_is_applied_exactly_until_the_switch(before, expected_scale, memorizer_items):
    cfg = 3.0
    recorder, seen = record_predictions(build_memorizer(memorizer_items, "v_prediction"))
    positive, negative = conditioning()
    ksample(patch(recorder, percent=0.5, before=before, opposite_scale=2.5), positive, negative, cfg=cfg)
    record = RECORDS.latest(KIND)
    assert len(record.steps) == len(seen["denoised"]) == 8
    switched_steps = [all(step["switched"]) for step in record.steps]
    assert 0 < switched_steps.index(True) < 8 and all(switched_steps[switched_steps.index(True) :])
    for step, entry in enumerate(record.steps):
        scale = cfg if switched_steps[step] else expected_scale
        assert entry["guidance"] == [scale] * 3
        expected = guided(seen["uncond"][step], seen["cond"][step], scale)
        torch.testing.assert_close(seen["denoised"][step], expected, rtol=1e-5, atol=1e-5)
    assert any(not torch.allclose(c, u) for c, u in zip(seen["cond"], seen["uncond"], strict=True))


def test_samples_of_a_batch_switch_at_their_own_first_minimum():
    model = build_tiny_unet("flow", seed=1)
    positive, negative = random_text_conditioning(1), random_text_conditioning(2)
    ksample(patch(model, mode="dynamic"), positive, negative, steps=10, seed=3, batch=6)
    record = RECORDS.latest(KIND)
    switch_steps = record.summary["switch_step"]
    assert len(set(switch_steps)) >= 2, switch_steps  # samples switch at different steps
    for sample, switch_step in enumerate(switch_steps):
        curve = [step["d_t"][sample] for step in record.steps if step["counted"][sample]]
        assert record.summary["d_t_curves"][sample] == curve
        assert first_local_minimum_step(curve) == switch_step
        guidance = [step["guidance"][sample] for step in record.steps]
        assert guidance == [0.0] * switch_step + [3.0] * (len(guidance) - switch_step)


def test_cap_forces_guidance_on(memorizer_items):
    model = build_memorizer(memorizer_items)
    positive, negative = conditioning()
    ksample(patch(model, mode="dynamic", cap=0.6), positive, negative, steps=10)
    record = RECORDS.latest(KIND)
    cap_sigma = model.get_model_object("model_sampling").percent_to_sigma(0.6)
    assert record.summary["never_switched"] == []
    for step in record.steps:
        assert all(step["switched"]) == (step["sigma"][0] <= cap_sigma)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_every_sampler_runs(prediction, memorizer_items):
    model = patch(build_memorizer(memorizer_items, prediction), mode="dynamic", before="opposite", cap=0.8)
    positive, negative = conditioning()
    for sampler in comfy.samplers.KSampler.SAMPLERS:
        samples = ksample(model, positive, negative, steps=4, sampler=sampler, scheduler="simple", batch=2)
        record = RECORDS.latest(KIND)
        assert torch.isfinite(samples).all(), sampler
        assert record.finished and len(record.steps) >= 1, sampler
        counted_sigmas = [step["sigma"][0] for step in record.steps if step["counted"][0]]
        assert counted_sigmas and all(a > b for a, b in zip(counted_sigmas, counted_sigmas[1:], strict=False)), sampler


def test_basic_guider_without_negative_is_a_recorded_no_op(memorizer_items):
    """BasicGuider has no negative and samples at cfg 1: nothing to transition, said in the record."""
    base = build_memorizer(memorizer_items)
    sigmas = base.get_model_object("model_sampling").sigma_max * torch.tensor([1.0, 0.5, 0.0])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))

    def basic(model):
        guider = Guider_Basic(model)
        guider.set_conds(conditioning()[0])
        return guider.sample(noise, torch.zeros(1, 4, 8, 8), comfy.samplers.sampler_object("euler"), sigmas)

    assert torch.equal(basic(patch(base, mode="dynamic")), basic(base))
    assert RECORDS.latest(KIND).summary["note"].startswith("inactive: sampled at cfg 1")


def test_missing_uncond_at_another_cfg_raises(memorizer_items):
    run = TransitionCfgPatch(TransitionSettings("dynamic", "unconditional", 0.0)).new_run(
        RECORDS.start(KIND, "missing-uncond"), None
    )
    prediction = torch.zeros(1, 4, 8, 8)
    args = {"conds_out": [prediction, prediction], "conds": [[{}], None], "cond_scale": 3.0, "sigma": torch.ones(1)}
    with pytest.raises(ValueError, match="negative"):
        transition_step(run, args)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_composes_with_rescale_cfg(prediction, memorizer_items):
    model = build_memorizer(memorizer_items, prediction)
    positive, negative = conditioning()

    def rescale(m):
        return RescaleCFG().patch(m, 0.7)[0]

    plain, rescale_only = ksample(model, positive, negative), ksample(rescale(model), positive, negative)
    transition_only = ksample(patch(model), positive, negative)
    both = ksample(rescale(patch(model)), positive, negative)
    both_other_order = ksample(patch(rescale(model)), positive, negative)
    assert not torch.equal(rescale_only, plain) and not torch.equal(transition_only, plain)
    assert not torch.equal(both, rescale_only) and not torch.equal(both, transition_only)
    assert torch.equal(both, both_other_order)
    hooked = rescale(model)
    TransitionCfgPatch(
        TransitionSettings("static", "unconditional", 0.0, transition_sigma=1e9), patch_id="zero"
    ).attach(hooked)
    assert torch.equal(ksample(hooked, positive, negative), rescale_only)


def test_no_state_leak_between_runs(memorizer_items):
    model = build_memorizer(memorizer_items)
    positive, negative = conditioning()
    patched = patch(model, mode="dynamic", before="opposite", cap=0.7)
    first = ksample(patched, positive, negative, sampler="euler_ancestral", seed=11)
    first_record = RECORDS.latest(KIND)
    partial = ksample(patched, positive, negative, seed=11, denoise=0.5)
    partial_record = RECORDS.latest(KIND)
    again = ksample(patched, positive, negative, sampler="euler_ancestral", seed=11)
    again_record = RECORDS.latest(KIND)
    assert torch.equal(first, again) and torch.isfinite(partial).all()
    assert again_record is not first_record and again_record.steps == first_record.steps
    assert len(partial_record.steps) == 8 and partial_record.steps[0]["counted"] == [True] * 3
    other = patch(model, mode="dynamic", before="opposite", cap=0.7)  # a second patch from one start
    assert torch.equal(ksample(other, positive, negative, sampler="euler_ancestral", seed=11), first)
    assert RECORDS.latest(KIND).patch_id != first_record.patch_id


def test_tiny_unet_runs_for_every_prediction():
    for prediction in PREDICTIONS:
        model = patch(build_tiny_unet(prediction, seed=2), mode="dynamic", before="conditional", cap=0.9)
        samples = ksample(model, random_text_conditioning(1), random_text_conditioning(2), steps=4)
        assert torch.isfinite(samples).all()
        assert RECORDS.latest(KIND).summary["never_switched"] == []


def test_bad_inputs_are_named():
    assert check_settings("static", 0.5, 0.0, "unconditional", 1.0, 1.0) is None
    assert "cap_percent" in check_settings("static", 0.5, 0.0, "unconditional", 1.0, 0.3)
    assert check_settings("dynamic", 0.5, 0.0, "unconditional", 1.0, 0.3) is None  # no static point to precede
    assert "opposite_scale" in check_settings("dynamic", 0.5, 0.0, "opposite", 0.0, 1.0)
    assert "transition_percent" in check_settings("static", 1.5, 0.0, "unconditional", 1.0, 1.0)
    assert "cap_percent" in check_settings("static", 0.5, 0.0, "unconditional", 1.0, -0.1)
    assert TransitionPointCFG.validate_inputs("static", 0.5, 0.0, "opposite", -1.0, 1.0) is not True


def test_cap_before_a_static_sigma_is_an_error(memorizer_items):
    model_sampling = build_memorizer(memorizer_items).get_model_object("model_sampling")
    with pytest.raises(ValueError, match="cap_percent"):
        build_settings(model_sampling, "static", 0.5, 0.01, "unconditional", 1.0, 0.2)
    settings = build_settings(model_sampling, "static", 0.5, 2.0, "unconditional", 1.0, 0.95)
    assert settings.transition_sigma == 2.0 and settings.cap_sigma < 2.0


def transition_graph(positive_subset="1,4", patched=True, **overrides):
    """LoadLatent → Shield Memorizer Model → Transition-Point CFG → KSampler → SaveLatent.

    The items are the `memorizer_items` fixture, written by `write_items` as input/memorizer_items.latent.
    """
    inputs = {
        "model": ["1", 0],
        "mode": "static",
        "transition_percent": 0.5,
        "transition_sigma": 0.0,
        "before_guidance": "unconditional",
        "opposite_scale": 2.0,
        "cap_percent": 1.0,
    }
    inputs.update(overrides)
    return {
        "0": {"class_type": "LoadLatent", "inputs": {"latent": "memorizer_items.latent"}},
        "1": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["0", 0], "prediction": "eps"}},
        "2": {"class_type": "ShieldTransitionPointCFG", "inputs": inputs},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0] if patched else ["1", 0],
                "seed": 5,
                "steps": 6,
                "cfg": 3.0,
                "sampler_name": "euler",
                "scheduler": "karras",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "tpcfg"}},
        "6": {"class_type": "ShieldMemorizerConditioning", "inputs": {"n_items": ["1", 2], "subset": positive_subset}},
        "7": {"class_type": "ShieldMemorizerConditioning", "inputs": {"n_items": ["1", 2], "subset": ""}},
    }


@pytest.fixture
def write_items(server, memorizer_items):
    server.write_input_latent("memorizer_items", memorizer_items)


def run_latent(server, graph) -> torch.Tensor:
    return server.saved_latent(server.run(graph), "5")


def node_errors(server, graph) -> dict:
    """The server's validation errors by node id."""
    try:
        server.queue(graph)
    except ServerError as error:  # it carries the 400 body: {"error": ..., "node_errors": {id: {...}}}
        body = json.loads(str(error).split(": ", 1)[1])
        return {node: json.dumps(value) for node, value in body["node_errors"].items()}
    raise AssertionError("the server accepted an invalid graph")


def test_server_runs_the_node_in_a_graph(server, write_items):
    info = server.object_info()["ShieldTransitionPointCFG"]
    assert info["category"].startswith("shield")
    assert set(info["input"]["required"]) >= {"mode", "before_guidance", "opposite_scale", "cap_percent"}
    plain = run_latent(server, transition_graph(patched=False))
    unconditional = run_latent(server, transition_graph(positive_subset="", patched=False))
    assert not torch.equal(plain, unconditional)
    assert torch.equal(run_latent(server, transition_graph(transition_percent=1.0)), unconditional)
    assert torch.equal(run_latent(server, transition_graph(transition_percent=0.0)), plain)
    dynamic = run_latent(server, transition_graph(mode="dynamic", before_guidance="opposite", cap_percent=0.7))
    assert torch.isfinite(dynamic).all() and not torch.equal(dynamic, plain)


def test_server_rejects_bad_inputs_naming_them(server, write_items):
    errors = node_errors(server, transition_graph(cap_percent=0.2))
    assert "2" in errors and "cap_percent" in errors["2"] and "transition_percent" in errors["2"]
    errors = node_errors(server, transition_graph(before_guidance="opposite", opposite_scale=0.0))
    assert "2" in errors and "opposite_scale" in errors["2"]
