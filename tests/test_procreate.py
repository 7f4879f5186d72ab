"""ProCreate energy guidance on real ComfyUI models (the closed-form memorizer, pixel-space VAE).

The memorizer's items are 3-channel 16x16 "images" in [-1, 1], so ComfyUI's own pixel_space VAE
decodes them; the embedder is a small fixed differentiable feature map (or the real DreamSim).
"""

import dataclasses
import math

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import folder_paths
import pytest
import torch

from comfyui_shield.core.records import RECORDS
from comfyui_shield.core.shield_set import ShieldSetError, from_latents
from comfyui_shield.nodes.procreate import ShieldDreamSimLoader, ShieldProCreateGuidance
from comfyui_shield.reference_models.memorizer import build_memorizer, nearest_item_distance, subset_conditioning
from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning
from comfyui_shield.samplers import procreate_math as pm
from comfyui_shield.samplers.embedders import CallableEmbedder
from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings
from harness.procreate_parts import pooled_projection_embedder, rgb_items, to_images, write_random_dreamsim

N_ITEMS, PROTECTED = 6, 3


@pytest.fixture(scope="module")
def items():
    return rgb_items(N_ITEMS)


@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})


@pytest.fixture(scope="module")
def embedder():
    return pooled_projection_embedder()


def reference_set(items, count=PROTECTED):
    return from_latents(items[:count], "LatentFormat", images=to_images(items[:count]))


def patched(model, vae, embedder, reference, **settings):
    clone = model.clone()
    ProCreateGuidance(vae, embedder, reference, ProCreateSettings(**settings), patch_id="test").attach(clone)
    return clone


def tiny_rgb_unet():
    """The tiny real UNet with 3 latent channels, so the pixel_space VAE decodes its latents."""
    return build_tiny_unet("eps", seed=4, channels=3)


def conds_for(model, n_items=N_ITEMS):
    if isinstance(model.model.diffusion_model, torch.nn.Module) and hasattr(model.model.diffusion_model, "items"):
        return subset_conditioning(n_items, [0, 1, 2, 3]), subset_conditioning(n_items)
    return random_text_conditioning(1), random_text_conditioning(2)


def run(model, noise, steps=8, cfg=2.0, n_items=N_ITEMS):
    positive, negative = conds_for(model, n_items)
    latent = torch.zeros_like(noise)
    return comfy.sample.sample(model, noise, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, seed=0)


def noise_batch(batch, seed=11):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


# -- the paper's equations 1–5, written directly (DDIM in the VP parameterization) -----------------
def paper_procreate(model, noise, items, embedder, gamma, max_norm, look_ahead, steps=8, cfg=2.0):
    """Eq. 1–5 with the official clipping, on the model's own ε prediction, independent of the hook."""
    base = model.model
    sampling = base.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", steps).double()
    positive, negative = (cond[0][0] for cond in conds_for(model))
    references = embedder.embed(to_images(items[:PROTECTED])).double()

    def alpha_bar(sigma):
        return 1.0 / (1.0 + sigma**2)

    def eps(x_vp, sigma):
        x_k = x_vp / alpha_bar(sigma).sqrt()
        row = torch.full((x_vp.shape[0],), float(sigma))
        opts = {"transformer_options": {"sigmas": row}}
        d_cond = base.apply_model(x_k.float(), row, c_crossattn=positive.repeat(x_vp.shape[0], 1, 1), **opts).double()
        d_uncond = base.apply_model(x_k.float(), row, c_crossattn=negative.repeat(x_vp.shape[0], 1, 1), **opts).double()
        denoised = d_uncond + (d_cond - d_uncond) * cfg
        return (x_k - denoised) / sigma

    def ddim(x_vp, sigma, sigma_next, e):  # eq. 1 then eq. 2
        a, a_next = alpha_bar(sigma), alpha_bar(sigma_next) if sigma_next > 0 else torch.tensor(1.0).double()
        x0 = (x_vp - (1 - a).sqrt() * e) / a.sqrt()
        return a_next.sqrt() * x0 + (1 - a_next).sqrt() * e

    def predicted_x0(x_vp, sigma):  # §4 Multi-Step Look Ahead (look_ahead ≤ 1: eq. 1)
        n = max(look_ahead, 1)
        t = sampling.timestep(sigma.float())
        levels = (
            [sigma] + [sampling.sigma(t * (1 - k / n)).double() for k in range(1, n)] + [torch.tensor(0.0).double()]
        )
        x = x_vp
        for level, level_next in zip(levels[:-1], levels[1:], strict=True):
            x = ddim(x, level, level_next, eps(x, level))
        return x

    max_denoise = math.isclose(float(sampling.sigma_max), float(sigmas[0]), rel_tol=1e-5)
    x_vp = noise.double() if max_denoise else noise.double() * sigmas[0] * alpha_bar(sigmas[0]).sqrt()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x_var = x_vp.detach().requires_grad_(True)
        embeddings = embedder.embed(
            ((base.process_latent_out(predicted_x0(x_var, sigma)) + 1) / 2).clamp(0, 1).movedim(1, -1).float()
        ).double()
        cosine = torch.nn.functional.cosine_similarity(embeddings[:, None], references[None], dim=-1)
        nearest = cosine.detach().argmax(dim=1)
        g = gamma * cosine[torch.arange(len(nearest)), nearest]  # eq. 5
        (grad,) = torch.autograd.grad(g.sum(), x_var)
        grad = grad.clamp(-gamma, gamma)
        norms = grad.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
        grad = torch.where(norms > gamma * max_norm, grad / norms * gamma * max_norm, grad)
        with torch.no_grad():
            e = eps(x_vp, sigma) + (1 - alpha_bar(sigma)).sqrt() * grad  # eq. 4
            x_vp = ddim(x_vp, sigma, sigma_next, e)
    return base.process_latent_out(x_vp).float()  # comfy.sample returns the VAE's latent scale


@pytest.mark.parametrize("look_ahead", [0, 3])
def test_matches_the_papers_equations(items, vae, embedder, look_ahead):
    model = tiny_rgb_unet()
    noise = noise_batch(2)
    settings = dict(gamma=20.0, max_grad_norm=0.5, look_ahead_steps=look_ahead, gradient_mode="exact")
    ours = run(patched(model, vae, embedder, reference_set(items), **settings), noise)
    paper = paper_procreate(model, noise, items, embedder, gamma=20.0, max_norm=0.5, look_ahead=look_ahead)
    plain = run(model, noise)
    assert (ours - plain).abs().max() > 1e-2  # the guidance did something
    assert torch.allclose(ours, paper, atol=2e-4, rtol=1e-4), (ours - paper).abs().max()


def test_strength_zero_and_unreachable_threshold_are_bit_identical(items, vae, embedder):
    model = build_memorizer(items, "eps")
    noise = noise_batch(3)
    plain = run(model, noise)
    (off,) = ShieldProCreateGuidance.execute(
        model, vae, embedder, reference_set(items), 0.0, 1.0, 0.5, 0, 0.0, 1.0, "exact", -1.0
    ).result
    assert torch.equal(run(off, noise), plain)
    never = patched(model, vae, embedder, reference_set(items), gamma=50.0, similarity_threshold=1.0)
    assert torch.equal(run(never, noise), plain)
    record = RECORDS.latest("procreate", "test")
    assert record.finished and record.summary["guided_steps"] == 0 and len(record.steps) == 8


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_guidance_lowers_similarity_to_the_references(items, vae, embedder, mode):
    model = build_memorizer(items, "eps")
    noise = noise_batch(8, seed=5)
    references = embedder.embed(to_images(items[:PROTECTED]))

    def max_similarity(latents):
        cosine = torch.nn.functional.cosine_similarity(
            embedder.embed(to_images(latents))[:, None], references[None], dim=-1
        )
        return cosine.max(dim=1).values

    plain = run(model, noise)
    guided = run(patched(model, vae, embedder, reference_set(items), gamma=100.0, gradient_mode=mode), noise)
    protected_hits = lambda out: int((nearest_item_distance(out, items)[1] < PROTECTED).sum())  # noqa: E731
    assert max_similarity(guided).mean() < max_similarity(plain).mean() - 0.1
    assert protected_hits(guided) < protected_hits(plain)


def test_a_clone_of_the_patched_model_keeps_one_record_per_run(items, vae, embedder):
    """Patches stacked later clone the model (deep-copying model_options): the hook must still see the run state."""
    stacked_later = patched(build_memorizer(items, "eps"), vae, embedder, reference_set(items), gamma=30.0).clone()
    before = len(RECORDS.runs("procreate", "test"))
    run(stacked_later, noise_batch(2))
    runs = RECORDS.runs("procreate", "test")[before:]
    assert len(runs) == 1 and runs[0].finished and len(runs[0].steps) == 8 and runs[0].summary["guided_steps"] > 0


def test_each_sample_is_pushed_from_its_own_nearest_reference(items, vae, embedder):
    model = build_memorizer(items, "eps")
    reference = reference_set(items, count=N_ITEMS)  # every item protected: nearest differs per sample
    noise = noise_batch(4, seed=2)
    guided_model = patched(model, vae, embedder, reference, gamma=30.0, gradient_mode="exact")
    batch = run(guided_model, noise)
    first_step = RECORDS.latest("procreate", "test").steps[0]
    assert len(set(first_step["nearest"])) > 1
    for index in range(4):  # per-sample guidance: the same sample alone gives the same result
        alone = run(guided_model, noise[index : index + 1])
        assert torch.allclose(alone[0], batch[index], atol=1e-5)
        assert RECORDS.latest("procreate", "test").steps[0]["nearest"][0] == first_step["nearest"][index]


def test_nan_gradient_skips_the_step_and_reports(items, vae):
    model = build_memorizer(items, "eps")
    poisoned = CallableEmbedder(lambda images: images.flatten(1)[:, :8] * torch.tensor(float("nan")), "test/nan")
    reference = reference_set(items).with_embeddings("test/nan", torch.randn(PROTECTED, 8))
    noise = noise_batch(2)
    out = run(patched(model, vae, poisoned, reference, gamma=50.0), noise)
    assert torch.isfinite(out).all()
    record = RECORDS.latest("procreate", "test")
    assert record.summary["skipped_nonfinite"] > 0


def test_bad_inputs(items, vae, embedder):
    assert "strength" in ShieldProCreateGuidance.validate_inputs(strength=-1.0)
    assert "start_percent" in ShieldProCreateGuidance.validate_inputs(start_percent=0.8, end_percent=0.2)
    bare = from_latents(items[:2], "LatentFormat")
    with pytest.raises(ShieldSetError, match="no images and no embeddings"):
        ProCreateGuidance(vae, embedder, bare, ProCreateSettings(), "bad")
    with pytest.raises(ValueError, match="gradient_mode"):
        ProCreateSettings(gradient_mode="magic").validate()
    four_channel = build_memorizer(torch.randn(N_ITEMS, 4, 8, 8), "eps")
    with pytest.raises(ValueError, match="VAE"):
        run(patched(four_channel, vae, embedder, reference_set(items)), torch.randn(1, 4, 8, 8))


# -- the real DreamSim package with random weights in its own file layout ---------------------------
@pytest.fixture
def dreamsim_folder(tmp_path, monkeypatch):
    folder = tmp_path / "dreamsim"
    folder.mkdir()
    paths = dict(folder_paths.folder_names_and_paths)
    paths["dreamsim"] = ([str(folder)], set())
    monkeypatch.setattr(folder_paths, "folder_names_and_paths", paths)
    return folder


def test_dreamsim_loader_reports_missing_and_corrupt_files(dreamsim_folder):
    with pytest.raises(FileNotFoundError, match="open_clip_vitb32_pretrain.pth.tar") as error:
        ShieldDreamSimLoader.execute("open_clip_vitb32")
    assert str(dreamsim_folder) in str(error.value)
    (dreamsim_folder / "open_clip_vitb32_pretrain.pth.tar").write_bytes(b"not a checkpoint")
    (dreamsim_folder / "open_clip_vitb32_single_lora").mkdir()
    (dreamsim_folder / "open_clip_vitb32_single_lora" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="open_clip_vitb32_pretrain.pth.tar is damaged"):
        ShieldDreamSimLoader.execute("open_clip_vitb32")


def test_dreamsim_gradient_reaches_x_through_vae_decode(dreamsim_folder, items, vae):
    write_random_dreamsim(dreamsim_folder)
    with torch.inference_mode():  # as ComfyUI runs a prompt: the loader must still give a grad-capable model
        (embedder,) = ShieldDreamSimLoader.execute("open_clip_vitb32").result
    assert embedder.key.startswith("dreamsim/open_clip_vitb32/")
    model = build_memorizer(items, "eps")
    guided = patched(model, vae, embedder, reference_set(items), gamma=100.0, gradient_mode="exact")
    with torch.inference_mode():
        out = run(guided, noise_batch(2), steps=2)
    assert torch.isfinite(out).all()
    record = RECORDS.latest("procreate", "test")
    norms = [n for step in record.steps for n in step.get("grad_norm", [])]
    assert norms and all(math.isfinite(n) for n in norms) and max(norms) > 0
    assert record.summary["skipped_nonfinite"] == 0


# -- VAE / model / reference set of different model families --------------------------------------------
def test_mismatched_vae_and_reference_set_are_named(items, vae, embedder):
    import copy

    rgb_model = build_memorizer(items, "eps")
    four_channel = build_memorizer(torch.randn(N_ITEMS, 4, 16, 16), "eps")
    args = (embedder, reference_set(items), 50.0, 1.0, 0.5, 0, 0.0, 1.0, "fast", -1.0)
    with pytest.raises(
        ValueError, match=r"'vae' input works on 3-channel latents but the model \(LatentFormat\) samples 4"
    ):
        ShieldProCreateGuidance.execute(four_channel, vae, *args)
    video_vae = copy.copy(vae)
    video_vae.latent_dim = 3
    with pytest.raises(ValueError, match="'vae' input makes 3-D latents but the model .* 2-D"):
        ShieldProCreateGuidance.execute(rgb_model, video_vae, *args)
    sdxl_set = dataclasses.replace(reference_set(items), latent_format="SDXL")
    with pytest.raises(ShieldSetError, match="'reference_set' holds SDXL latents but the model makes LatentFormat"):
        ShieldProCreateGuidance.execute(rgb_model, vae, embedder, sdxl_set, *args[2:])
    four_channel_set = from_latents(torch.randn(2, 4, 16, 16), "VAE4ch", images=to_images(items[:2]))
    with pytest.raises(ShieldSetError, match="'reference_set' latents have 4 channels but the model"):
        ShieldProCreateGuidance.execute(rgb_model, vae, embedder, four_channel_set, *args[2:])
    (ok,) = ShieldProCreateGuidance.execute(rgb_model, vae, *args).result  # the matching family passes
    assert ok is not rgb_model


# -- a Shield Memory as the growing reference set ---------------------------------------------------------
def test_shield_memory_reference_set_grows_with_every_run(items, vae, embedder):
    from comfyui_shield.core.shield_memory import MEMORY
    from comfyui_shield.nodes.shield_sets import ShieldMemory
    from comfyui_shield.samplers.procreate_hook import cached_embedding_count

    (memory,) = ShieldMemory.execute("procreate-test", True).result
    assert len(memory) == 0
    model = build_memorizer(items, "eps")
    guided = patched(model, vae, embedder, memory, gamma=100.0, gradient_mode="fast")
    noise = noise_batch(3, seed=9)
    first = run(guided, noise)
    record = RECORDS.latest("procreate", "test")
    assert record.summary["references"] == 0 and record.summary["guided_steps"] == 0
    assert torch.equal(first, run(model, noise))  # nothing to repel from yet: plain sampling
    remembered = MEMORY.snapshot("procreate-test")
    assert len(remembered) == 3 and torch.equal(remembered.latents, first)
    second = run(guided, noise)  # the same seed: plain sampling would copy run 1's outputs again
    record = RECORDS.latest("procreate", "test")
    assert record.summary["references"] == 3 and record.summary["guided_steps"] > 0
    assert cached_embedding_count(embedder.key, remembered.hashes) == 3  # embedded once, from the decoded latents
    run_one = embedder.embed(to_images(first))

    def similarity_to_run_one(latents):
        cosine = torch.nn.functional.cosine_similarity(
            embedder.embed(to_images(latents))[:, None], run_one[None], dim=-1
        )
        return cosine.max(dim=1).values

    assert similarity_to_run_one(second).mean() < similarity_to_run_one(first).mean() - 0.1
    assert len(MEMORY.snapshot("procreate-test")) == 6
    MEMORY.reset("procreate-test")


# -- optional intra-batch repulsion ------------------------------------------------------------------------
def test_intra_batch_repulsion_raises_batch_diversity(items, vae, embedder):
    model = build_memorizer(items, "eps")
    far = from_latents(-items[:1], "LatentFormat", images=to_images(-items[:1]))  # a reference nothing comes near
    noise = noise_batch(6, seed=4)
    positive, negative = subset_conditioning(N_ITEMS, [0, 1]), subset_conditioning(N_ITEMS)

    def sample(intra_batch):
        guided = patched(model, vae, embedder, far, gamma=100.0, gradient_mode="fast", intra_batch=intra_batch)
        return comfy.sample.sample(
            guided, noise, 8, 2.0, "ddim", "ddim_uniform", positive, negative, torch.zeros_like(noise), seed=0
        )

    def mean_pairwise_similarity(latents):
        unit = torch.nn.functional.normalize(embedder.embed(to_images(latents)), dim=-1)
        cosine = unit @ unit.T
        return float((cosine.sum() - cosine.diagonal().sum()) / (len(unit) * (len(unit) - 1)))

    alone = sample(False)
    assert RECORDS.latest("procreate", "test").summary["settings"]["intra_batch"] is False
    together = sample(True)
    record = RECORDS.latest("procreate", "test")
    assert any(index >= 1 for step in record.steps for index in step.get("nearest", []))  # another sample was nearest
    assert mean_pairwise_similarity(together) < mean_pairwise_similarity(alone) - 0.05
    assert (
        torch.cdist(together.flatten(1), together.flatten(1)).mean()
        > torch.cdist(alone.flatten(1), alone.flatten(1)).mean()
    )


def test_pixel_embedder_is_pixel_cosine_and_differentiable():
    from comfyui_shield.nodes.procreate import ShieldPixelEmbedder

    (pixel,) = ShieldPixelEmbedder.execute(8).result
    images = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    embedded = pixel.embed(images)
    assert embedded.shape == (3, 3 * 8 * 8) and pixel.key == "pixels/8"
    assert torch.allclose(embedded.norm(dim=1), torch.ones(3))
    expected = torch.nn.functional.avg_pool2d(images.detach().movedim(-1, 1) * 2 - 1, 2).flatten(1)
    assert torch.allclose(embedded.detach(), torch.nn.functional.normalize(expected, dim=1), atol=1e-5)
    (embedded[0] @ embedded[1]).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="size"):
        ShieldPixelEmbedder.execute(1)


def test_pixel_embedder_guidance_moves_samples_off_the_references(items, vae):
    from comfyui_shield.samplers.embedders import PixelEmbedder

    pixel = PixelEmbedder(16)
    model = build_memorizer(items, "eps")
    noise = noise_batch(8, seed=5)
    protected_hits = lambda out: int((nearest_item_distance(out, items)[1] < PROTECTED).sum())  # noqa: E731
    plain = run(model, noise)
    guided = run(patched(model, vae, pixel, reference_set(items), gamma=100.0, gradient_mode="fast"), noise)
    assert protected_hits(plain) > 0
    assert protected_hits(guided) < protected_hits(plain)


# -- item 10: the look-ahead walks down the sampler's own schedule, on shifted flow and EDM too -------------
def shifted_flow_memorizer(items):
    return build_memorizer(items, prediction="flow", flow_shift=3.0)  # SD3's shift


def edm_memorizer(items):
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    (model,) = ModelSamplingContinuousEDM().patch(build_memorizer(items), "eps", 120.0, 0.002)
    return model


@pytest.mark.parametrize("build", [shifted_flow_memorizer, edm_memorizer], ids=["flow_shift_3", "edm"])
@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_look_ahead_descends_on_shifted_flow_and_edm(build, mode, items, vae, embedder, monkeypatch):
    from comfyui_shield.samplers import procreate_hook

    levels = []
    real = procreate_hook.cfg_denoised

    def recording(model, x, sigma, *args):
        levels.append(float(sigma.reshape(-1)[0]))
        return real(model, x, sigma, *args)

    monkeypatch.setattr(procreate_hook, "cfg_denoised", recording)
    model = build(items)
    # references near, not at, the items: the memorizer's look-ahead lands on an exact item, and at an exact
    # copy of a reference the cosine is maximal and its gradient vanishes
    references = reference_set(items * 0.8 + 0.1)
    guided = patched(model, vae, embedder, references, gamma=50.0, gradient_mode=mode, look_ahead_steps=3)
    noise = noise_batch(2)
    out = run(guided, noise, steps=6)
    sampling = model.get_model_object("model_sampling")
    record = RECORDS.latest("procreate", "test")
    steps = [step["sigma"][0] for step in record.steps]
    expected = []
    for step in record.steps:
        if "grad_norm" not in step:  # no sample was guided here: no look-ahead
            continue
        sigma = step["sigma"][0]
        count = min(3, sum(later < sigma for later in steps) + 1)  # capped at the sampler's remaining steps
        levels_here = pm.look_ahead_sigmas(torch.tensor([sigma]), count, lambda p: float(sampling.percent_to_sigma(p)))
        chain = [float(level) for level in levels_here] if count > 1 else [sigma]
        expected += chain if mode == "exact" else chain[1:]  # fast reuses the sampler's D(x, σ)
    assert sum("grad_norm" in step for step in record.steps) >= 3
    assert levels == pytest.approx(expected, rel=1e-5)
    for sigma in steps:  # each chain descends from the sampler's sigma (the old schedule went up on both)
        chain = pm.look_ahead_sigmas(torch.tensor([sigma]), 3, lambda p: float(sampling.percent_to_sigma(p)))
        assert all(float(later) < float(earlier) for earlier, later in zip(chain, chain[1:], strict=False))
    guided_norms = [norm for step in record.steps for norm in step.get("clipped_norm", [])]
    assert torch.isfinite(out).all() and max(guided_norms) > 0  # the look-ahead's x̂0 gave a real gradient


# -- exact mode on a loaded model: gradients through its own weights, no copy (issue #13 item 4) --------
def test_exact_mode_takes_gradients_through_the_loaded_weights_without_copying(items, vae, embedder):
    with torch.inference_mode():  # as a loader node builds it: every weight an inference tensor
        model = tiny_rgb_unet()
    diffusion = model.model.diffusion_model
    assert all(parameter.is_inference() for parameter in diffusion.parameters())
    storage = {name: parameter.data_ptr() for name, parameter in diffusion.named_parameters()}
    calls = []

    def watch(module, inputs):
        pointers = {name: parameter.data_ptr() for name, parameter in module.named_parameters()}
        calls.append((pointers, any(parameter.is_inference() for parameter in module.parameters())))

    handle = diffusion.register_forward_pre_hook(watch)
    try:
        guided = patched(model, vae, embedder, reference_set(items), gamma=100.0, gradient_mode="exact")
        with torch.inference_mode():
            out = run(guided, noise_batch(2), steps=3)
    finally:
        handle.remove()
    gradient_passes = [pointers for pointers, inference in calls if not inference]
    assert gradient_passes and len(gradient_passes) < len(calls)  # sampler passes keep the originals
    assert all(pointers == storage for pointers, _ in calls)  # one storage: no weight was copied
    assert all(parameter.is_inference() for parameter in diffusion.parameters())  # put back after each pass
    record = RECORDS.latest("procreate", "test")
    norms = [norm for step in record.steps for norm in step.get("grad_norm", [])]
    assert torch.isfinite(out).all() and norms and max(norms) > 0
