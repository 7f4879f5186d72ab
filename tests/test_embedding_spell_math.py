"""Embedding-space sparse repellency: the radius, the balls, and the gradient step that moves x̂0 to the target."""

import math

import pytest
import torch

from comfyui_shield.samplers import embedding_spell_math as esm


def test_the_radius_is_the_angle_of_the_similarity():
    assert esm.angular_radius(1.0) == 0.0
    assert esm.angular_radius(0.0) == pytest.approx(math.pi / 2)
    with pytest.raises(ValueError, match="cosine"):
        esm.angular_radius(1.5)


def test_inside_balls_is_spell_eq5_on_the_sphere():
    """One shield: Δ is (θ_r − θ) along the great circle away from it, and exp_e(λΔ) lands at θ + λ(θ_r − θ)."""
    shields = torch.tensor([[1.0, 0.0, 0.0]])
    angle = 0.2
    samples = torch.tensor([[math.cos(angle), math.sin(angle), 0.0], [0.0, 1.0, 0.0]])
    radius = esm.angular_radius(0.9)
    found = esm.inside_balls(samples, shields, radius, intra_batch=False)
    assert found.inside.tolist() == [True, False]
    assert found.shield_hits == [1, 0]
    away = torch.tensor([-math.sin(angle), math.cos(angle), 0.0], dtype=torch.float64)  # tangent, away from z
    assert torch.allclose(found.delta[0], (radius - angle) * away)
    assert torch.equal(found.delta[1], torch.zeros(3, dtype=torch.float64))
    assert found.nearest_similarity[1] == pytest.approx(0.0, abs=1e-6)
    target = esm.exp_map(samples.double(), 1.6 * found.delta)
    assert float(torch.acos(target[0, 0])) == pytest.approx(angle + 1.6 * (radius - angle))
    assert torch.equal(target[1], samples[1].double())  # Δ = 0: the sample stays where it is


def test_an_exact_copy_is_pushed_the_full_radius():
    shields = torch.tensor([[1.0, 0.0]])
    found = esm.inside_balls(shields.clone(), shields, 0.5, intra_batch=False)
    assert found.inside.tolist() == [True]
    assert float(found.delta[0].norm()) == pytest.approx(0.5)
    assert float(found.delta[0] @ shields[0].double()) == pytest.approx(0.0)  # a tangent at e


def test_intra_batch_pairs_repel_each_other_only_when_asked():
    samples = esm.unit_embeddings(torch.tensor([[1.0, 0.05], [1.0, -0.05]]))
    no_shields = torch.zeros(0, 2)
    assert not esm.inside_balls(samples, no_shields, 0.5, intra_batch=False).inside.any()
    found = esm.inside_balls(samples, no_shields, 0.5, intra_batch=True)
    assert found.batch_hits == [1, 1] and found.inside.all()
    assert float(found.delta[0, 1]) > 0 > float(found.delta[1, 1])  # pushed apart


def test_moving_through_the_gradient_reaches_the_target_of_a_nonlinear_embedder():
    """A tanh-then-project embedder of 4×4 "images": the steps move only the flagged rows and reach e + λΔ."""
    generator = torch.Generator().manual_seed(1)
    projection = torch.randn(16, 6, generator=generator)

    def embed(x):
        return esm.unit_embeddings(torch.tanh(x.flatten(1)) @ projection)

    x0 = torch.randn(3, 1, 4, 4, generator=generator) * 0.5
    start = embed(x0)
    shields = start[:2] + 0.01  # samples 0 and 1 sit on a shield; sample 2 is far from both
    shields = esm.unit_embeddings(shields)
    radius = esm.angular_radius(0.8)
    found = esm.inside_balls(start, shields, radius, intra_batch=False)
    assert found.inside.tolist() == [True, True, False]
    targets = esm.exp_map(start, 1.6 * found.delta).float()
    moved, embedded, taken = esm.move_to_targets(x0, targets, embed, found.inside, iterations=8)
    assert torch.equal(moved[2], x0[2])  # a sample outside every ball is not touched
    assert 1 <= taken <= 8
    before = (start[:2] - targets[:2]).norm(dim=1)
    after = (embedded[:2] - targets[:2]).norm(dim=1)
    assert (after < 0.35 * before).all(), (before, after)
    assert not esm.inside_balls(embedded[:2], shields, radius, intra_batch=False).inside.any()


def test_the_cauchy_step_is_exact_for_a_linear_map():
    """For e = A x and r = e − t, one step along −Aᵀr with α = ‖g‖²/‖Ag‖² minimises ‖r − αAg‖ exactly."""
    generator = torch.Generator().manual_seed(2)
    matrix = torch.randn(5, 8, generator=generator)

    def embed(x):
        return x.flatten(1) @ matrix.T

    x0 = torch.randn(1, 8, generator=generator)
    target = torch.randn(1, 5, generator=generator)
    moved, embedded = esm.correction_step(x0, target, embed, torch.tensor([True]))
    residual = embed(x0) - target
    gradient = residual @ matrix
    alpha = gradient.pow(2).sum() / (gradient @ matrix.T).pow(2).sum()
    assert torch.allclose(moved, x0 - alpha * gradient, atol=1e-4)
    assert float((embedded - target).norm()) <= float(residual.norm())
