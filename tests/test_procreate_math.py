"""ProCreate math (plain torch): the sigma-parameterization update equals eq. 4 in the VP form."""

import pytest
import torch

from comfyui_shield.samplers import procreate_math as pm


def test_guided_denoised_equals_eq4_in_vp_form():
    generator = torch.Generator().manual_seed(0)
    y, n, grad_vp = (torch.randn(3, 4, 5, 5, generator=generator, dtype=torch.float64) for _ in range(3))
    for signal, noise in (
        (torch.ones(3), torch.tensor([0.3, 2.0, 14.0])),
        (1 - torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.2, 0.5, 0.9])),
    ):
        signal, noise = signal.double(), noise.double()
        a, s = signal.reshape(-1, 1, 1, 1), noise.reshape(-1, 1, 1, 1)
        x = a * y + s * n
        denoised = y + 0.1 * n  # any prediction; ε is then defined by x = a·D + s·ε
        eps = (x - a * denoised) / s
        root = torch.sqrt(a * a + s * s)
        x_vp, sqrt_alpha, sqrt_one_minus = x / root, a / root, s / root
        eps_guided = eps + sqrt_one_minus * grad_vp  # eq. 4
        expected = (x_vp - sqrt_one_minus * eps_guided) / sqrt_alpha  # eq. 1 with ε'
        got = pm.guided_denoised(denoised, grad_vp, signal, noise)
        assert torch.allclose(got, expected, atol=1e-12)


def test_vp_gradient_is_the_chain_rule():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    signal, noise = torch.tensor([1.0, 0.4], dtype=torch.float64), torch.tensor([3.0, 0.6], dtype=torch.float64)
    root = torch.sqrt(signal**2 + noise**2).reshape(-1, 1, 1, 1)

    def g_of_vp(x_vp):
        return (x_vp.sin() * torch.arange(x_vp.numel(), dtype=x_vp.dtype).reshape(x_vp.shape)).sum()

    (grad_x,) = torch.autograd.grad(g_of_vp(x / root), x)
    x_vp = (x / root).detach().requires_grad_()
    (grad_vp,) = torch.autograd.grad(g_of_vp(x_vp), x_vp)
    assert torch.allclose(pm.to_vp_gradient(grad_x, signal, noise), grad_vp, atol=1e-10)


def test_clip_gradient_clamps_then_limits_norm_per_sample():
    grad = torch.tensor([[3.0, -0.5, 0.1, 0.0], [0.01, 0.0, 0.0, 0.0]])
    clipped = pm.clip_gradient(grad, gamma=2.0, element_clip=1.0, max_norm=0.5)
    assert clipped[0].abs().max() <= 2.0 + 1e-6
    assert abs(clipped[0].norm().item() - 1.0) < 1e-6  # limited to γ·max_norm = 1
    assert torch.equal(clipped[1], grad[1])  # already within both limits
    assert torch.equal(pm.clip_gradient(grad, 2.0, 0.0, 0.0), grad)  # 0 turns both off


def test_energy_uses_each_samples_nearest_reference():
    references = torch.eye(4)
    embeddings = torch.tensor([[0.1, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -1.0], [5.0, 1.0, 0.0, 0.0]], requires_grad=True)
    g, index = pm.energy(embeddings, references, gamma=3.0)
    assert index.tolist() == [2, 0, 0]
    best, _ = pm.nearest_reference(embeddings, references)
    assert torch.allclose(g, 3.0 * best)
    g.sum().backward()
    assert torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0


def test_look_ahead_is_exact_for_a_denoiser_that_knows_the_answer():
    target = torch.randn(2, 3, 4, 4)

    def denoise(x, sigma):
        return target.clone()

    x = target + 5.0 * torch.randn(2, 3, 4, 4)
    sigma = torch.full((2,), 5.0)
    out = pm.look_ahead(
        x,
        sigma,
        4,
        denoise,
        percent_to_sigma=lambda p: 10.0 * (1.0 - p),
        scales=lambda s: (torch.ones_like(s), s),
    )
    assert torch.allclose(out, target)
    assert pm.look_ahead_percents(0.2, 4) == pytest.approx([0.2, 0.4, 0.6, 0.8])


# -- §4 look-ahead schedule in percent space, on ComfyUI's own samplings (issue #11, item 10) ----------------
def comfy_samplings():
    import comfy.model_sampling as ms

    flow = ms.ModelSamplingDiscreteFlow()
    flow.set_parameters(shift=3.0)  # SD3's shift
    edm = ms.ModelSamplingContinuousEDM()
    edm.set_parameters(sigma_min=0.002, sigma_max=120.0, sigma_data=0.5)
    return {"discrete": ms.ModelSamplingDiscrete(), "flow_shift_3": flow, "edm": edm}


@pytest.mark.parametrize("name, sigma", [("discrete", 4.0), ("flow_shift_3", 0.5), ("edm", 5.0)])
def test_look_ahead_levels_decrease_evenly_in_schedule_percent(name, sigma):
    sampling = comfy_samplings()[name]

    def percent_to_sigma(p):
        return float(sampling.percent_to_sigma(p))

    batch = pm.look_ahead_sigmas(torch.tensor([sigma, sigma]), 4, percent_to_sigma)
    assert all(level.shape == (2,) and level[0] == level[1] for level in batch)
    levels = [float(level[0]) for level in batch]
    assert levels[0] == pytest.approx(sigma)
    assert all(later < earlier for earlier, later in zip(levels, levels[1:], strict=False))  # towards the clean image
    percents = [pm.sigma_to_percent(level, percent_to_sigma) for level in levels]
    gaps = [b - a for a, b in zip(percents, percents[1:], strict=False)]
    assert gaps == pytest.approx([(1 - percents[0]) / 4] * 3, abs=1e-5)


def test_the_old_timestep_schedule_was_wrong_off_the_discrete_schedule():
    """sigma(t·(1 − k/n)) assumed timestep() inverts sigma(); it does for DDPM's discrete schedule (where
    the percent schedule equals it), not for shifted flow (σ went up: 0.5 → 0.667) nor for EDM (timestep 0.25·ln σ: up again below σ = 1)."""
    samplings = comfy_samplings()
    discrete = samplings["discrete"]
    t = discrete.timestep(torch.tensor(4.0))
    old = [4.0] + [float(discrete.sigma(t * (1 - k / 4))) for k in range(1, 4)]
    new = pm.look_ahead_sigmas(torch.tensor([4.0]), 4, lambda p: float(discrete.percent_to_sigma(p)))
    assert [float(level) for level in new] == pytest.approx(old, rel=1e-3)
    flow = samplings["flow_shift_3"]
    assert float(flow.sigma(flow.timestep(torch.tensor(0.5)) * 0.75)) > 0.5
    edm = samplings["edm"]
    assert float(edm.sigma(edm.timestep(torch.tensor(0.5)) * 0.75)) > 0.5  # log σ < 0 scaled towards 0


def test_video_energy_is_the_clips_most_similar_frame():
    """Frame-wise eq. 5 (video clips [B, T, D]): a clip's similarity, nearest reference and energy are
    those of its most similar frame; one frame per clip is exactly the image version."""
    generator = torch.Generator().manual_seed(8)
    references = torch.randn(3, 6, generator=generator)
    frames = torch.randn(2, 4, 6, generator=generator)
    frames[1, 2] = references[1] * 2.0  # clip 1's third frame copies reference 1
    similarity, nearest = pm.nearest_reference_over_frames(frames, references)
    per_frame = pm.cosine_to_references(frames.flatten(0, 1), references).reshape(2, 4, 3)
    assert torch.allclose(similarity, per_frame.amax(dim=(1, 2)))
    assert similarity[1] == pytest.approx(1.0) and int(nearest[1]) == 1
    energy = pm.energy_over_frames(frames, references, gamma=10.0)
    assert torch.allclose(energy, 10.0 * similarity)
    single = frames[:, :1]
    assert torch.allclose(pm.energy_over_frames(single, references, 10.0), pm.energy(single[:, 0], references, 10.0)[0])
    assert torch.equal(
        pm.nearest_reference_over_frames(single, references)[1], pm.nearest_reference(single[:, 0], references)[1]
    )
    moving = frames.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(pm.energy_over_frames(moving, references, 10.0).sum(), moving)
    assert gradient[1, 2].abs().sum() > 0 and gradient[1, [0, 1, 3]].abs().sum() == 0  # only the max frame
