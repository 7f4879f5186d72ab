"""The closed-form memorizer: exact posterior mean, sound at every sigma, and replication under KSampler."""

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.reference_models.memorizer import (
    build_memorizer,
    minimum_item_spacing,
    nearest_item_distance,
    posterior_mean,
    subset_conditioning,
)

PREDICTIONS = ["eps", "v_prediction", "flow"]


def brute_force_posterior_mean(x, items, a, s, mask=None):
    out = []
    for row in range(x.shape[0]):
        log_w = torch.stack([-((x[row] - a[row] * y) ** 2).sum() / (2 * s[row] ** 2) for y in items]).double()
        if mask is not None:
            log_w[~mask[row]] = -float("inf")
        w = torch.softmax(log_w, 0)
        out.append((w[:, None] * items.flatten(1).double()).sum(0).reshape(items.shape[1:]))
    return torch.stack(out).float()


def test_posterior_mean_matches_brute_force(memorizer_items):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=generator) * 2
    a = torch.tensor([1.0, 0.7, 0.2])
    s = torch.tensor([1.5, 3.0, 8.0])
    mask = torch.tensor([[True] * 6, [True, False, True, False, True, False], [False] * 5 + [True]])
    expected = brute_force_posterior_mean(x, memorizer_items, a, s, mask)
    got = posterior_mean(x, memorizer_items, a, s, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_posterior_mean_is_sound_at_extreme_sigmas(memorizer_items):
    item = memorizer_items[2:3]
    tiny = posterior_mean(item + 1e-4, memorizer_items, torch.ones(1), torch.tensor([1e-4]))
    assert torch.isfinite(tiny).all()
    torch.testing.assert_close(tiny, item)
    huge = posterior_mean(torch.randn(1, 4, 8, 8) * 10, memorizer_items, torch.ones(1), torch.tensor([1e6]))
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge[0], memorizer_items.mean(0), rtol=1e-4, atol=1e-4)


def ksample(model, latent, positive, negative, seed=7, cfg=1.0, steps=20, sampler="euler", scheduler="karras"):
    (out,) = comfy_nodes.common_ksampler(
        model, seed, steps, cfg, sampler, scheduler, positive, negative, {"samples": latent}, denoise=1.0
    )
    return out["samples"]


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_ksampler_reproduces_training_items(prediction, memorizer_items):
    model = build_memorizer(memorizer_items, prediction)
    everything = subset_conditioning(len(memorizer_items))
    samples = ksample(model, torch.zeros(4, 4, 8, 8), everything, everything, scheduler="simple")
    distance, _ = nearest_item_distance(samples, memorizer_items)
    spacing = minimum_item_spacing(memorizer_items)
    assert samples.shape == (4, 4, 8, 8)
    assert distance.max() < 1e-2 * spacing, (distance, spacing)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_conditioning_selects_a_subset(prediction, memorizer_items):
    model = build_memorizer(memorizer_items, prediction)
    positive = subset_conditioning(len(memorizer_items), [1, 4])
    negative = subset_conditioning(len(memorizer_items))
    samples = ksample(model, torch.zeros(4, 4, 8, 8), positive, negative, cfg=3.0, scheduler="simple")
    distance, index = nearest_item_distance(samples, memorizer_items)
    assert set(index.tolist()) <= {1, 4}
    assert distance.max() < 1e-2 * minimum_item_spacing(memorizer_items)


def test_memorizer_rejects_bad_items():
    with pytest.raises(ValueError, match="non-empty"):
        build_memorizer(torch.zeros(0, 4, 8, 8))
    with pytest.raises(ValueError, match="prediction"):
        build_memorizer(torch.zeros(2, 4, 8, 8), "x0")


def test_memorizer_conditioning_node_selects_a_subset(memorizer_items):
    from comfyui_shield.nodes.reference import ShieldMemorizerConditioning, ShieldMemorizerModel

    model, whole, n_items = ShieldMemorizerModel.execute({"samples": memorizer_items}, "eps").result
    assert n_items == 6 and torch.equal(whole[0][0], subset_conditioning(6)[0][0])
    (subset,) = ShieldMemorizerConditioning.execute("1, 4", n_items).result
    assert torch.equal(subset[0][0], subset_conditioning(6, [1, 4])[0][0])
    (everything,) = ShieldMemorizerConditioning.execute("", n_items).result
    assert torch.equal(everything[0][0], whole[0][0])
    # sampling with the subset lands on an item of the subset
    latent = {"samples": torch.zeros(3, *memorizer_items.shape[1:])}
    (out,) = comfy_nodes.common_ksampler(model, 2, 12, 1.0, "euler", "karras", subset, subset, latent)
    assert set(nearest_item_distance(out["samples"], memorizer_items)[1].tolist()) <= {1, 4}
    assert "'1,4'" in ShieldMemorizerConditioning.validate_inputs(subset="1;4")
    assert ShieldMemorizerConditioning.validate_inputs(subset="0,5") is True
    with pytest.raises(ValueError, match=r"\[6\] are outside 0..5"):
        ShieldMemorizerConditioning.execute("2,6", 6)
