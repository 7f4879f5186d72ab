"""SPELL math (samplers/spell_math.py): the update, the appendix-B geometry, and range searches that
return exactly the in-radius shields."""

import math

import pytest
import torch

from comfyui_shield.samplers import range_search as rs
from comfyui_shield.samplers import shield_index
from comfyui_shield.samplers import spell_math as sm


def _clustered(count, dim, seed=0, clusters=8):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator) * 3
    labels = torch.randint(0, clusters, (count,), generator=generator)
    return centres[labels] + torch.randn(count, dim, generator=generator)


def _brute_force_pairs(queries, shields, radius):
    distance = torch.cdist(queries.double(), shields.double())
    return {(int(q), int(s)) for q, s in zip(*torch.nonzero(distance < radius, as_tuple=True), strict=True)}


def test_repellency_matches_the_formula_and_lands_on_the_sphere():
    shields = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    x0 = torch.tensor([[0.5, 0.0], [3.0, 4.0]])  # first inside the ball of shield 0, second outside (d=5)
    search = rs.ExactRangeSearch(shields)
    result = sm.sparse_repellency_step(x0, [search], radius=2.0, overcompensation=1.0, intra_batch=False)
    # Δ = (2/0.5 − 1)·(0.5, 0) = (1.5, 0): x̂0 + Δ = (2, 0), exactly at distance r (appendix B case 2)
    assert torch.allclose(result.denoised[0], torch.tensor([2.0, 0.0]))
    assert torch.equal(result.denoised[1], x0[1])  # case 1: untouched
    assert result.shield_hits == [1, 0] and result.touched == [0]


def test_overcompensation_overshoots_by_lambda():
    shields = torch.zeros(1, 3)
    x0 = torch.tensor([[1.0, 0.0, 0.0]])
    result = sm.sparse_repellency_step(x0, [rs.ExactRangeSearch(shields)], 4.0, 1.6, False)
    # r + (λ − 1)(r − d) = 4 + 0.6·3
    assert float(result.denoised.norm()) == pytest.approx(4.0 + 0.6 * 3.0)


def test_nothing_in_range_returns_the_same_tensor():
    x0 = torch.randn(3, 16)
    shields = torch.randn(5, 16) + 100.0
    result = sm.sparse_repellency_step(x0, [rs.ExactRangeSearch(shields)], 1.0, 1.6, True)
    assert result.denoised is x0 and result.touched == []


def test_intra_batch_pushes_close_samples_apart_symmetrically():
    x0 = torch.tensor([[0.0, 0.0], [1.0, 0.0], [50.0, 0.0]])
    result = sm.sparse_repellency_step(x0, [], radius=3.0, overcompensation=1.0, intra_batch=True)
    assert result.batch_hits == [1, 1, 0]
    moved = result.denoised
    assert float((moved[0] - moved[1]).norm()) > 1.0
    assert torch.allclose(moved[0] + moved[1], x0[0] + x0[1])  # equal and opposite pushes
    assert torch.equal(moved[2], x0[2])


def test_projection_bound_never_exceeds_the_true_distance():
    shields = _clustered(500, 64)
    queries = shields[:20] + 0.05 * torch.randn(20, 64)
    for dims in (1, 4, 16):
        basis, mean = rs.pca_basis(shields, dims)
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1]), atol=1e-5)
        bound = rs.projection_lower_bound(queries, shields, basis, mean)
        true = torch.cdist(queries.double(), shields.double()).pow(2)
        assert bool((bound <= true * (1 + 1e-5) + 1e-4).all())
        assert float((bound / true.clamp_min(1e-9)).max()) > 0.5  # and it is not trivially zero


@pytest.mark.parametrize("method", ["exact", "projection", "faiss", "clustered"])
def test_every_search_returns_exactly_the_in_radius_shields(method):
    shields = _clustered(3000, 128, seed=1)
    generator = torch.Generator().manual_seed(2)
    queries = torch.cat(
        [shields[:6] + 0.3 * torch.randn(6, 128, generator=generator), torch.randn(2, 128, generator=generator)]
    )
    nearest = torch.cdist(queries.double(), shields.double()).sort(dim=1).values
    radius = float(nearest[:, 3].median())  # several shields per query sit near the boundary
    search = shield_index.build_range_search(shields, method, projection_dims=8)
    found = search.search(queries, radius)
    assert {(int(q), int(s)) for q, s in zip(found.query, found.shield, strict=True)} == _brute_force_pairs(
        queries, shields, radius
    )
    assert len(found) > 0
    assert torch.allclose(found.distance, (queries[found.query].double() - shields[found.shield].double()).norm(dim=1))


def test_exact_search_is_chunked_and_still_exact():
    shields = _clustered(1000, 32, seed=3)
    queries = shields[:4] + 0.1
    search = rs.ExactRangeSearch(shields, chunk_bytes=32 * 4 * 7)  # 7 rows per chunk
    assert search.chunk == 7
    found = search.search(queries, 4.0)
    assert {(int(q), int(s)) for q, s in zip(found.query, found.shield, strict=True)} == _brute_force_pairs(
        queries, shields, 4.0
    )


def test_auto_picks_exact_for_small_and_projection_for_large(monkeypatch):
    assert shield_index.build_range_search(torch.randn(10, 8)).name == "exact"
    monkeypatch.setattr(rs, "AUTO_PROJECTION_MIN_SHIELDS", 5)
    assert shield_index.build_range_search(torch.randn(10, 8), projection_dims=2).name == "clustered"
    with pytest.raises(ValueError, match="search method"):
        shield_index.build_range_search(torch.randn(10, 8), "ivf")


def test_relative_radius_and_calibration():
    assert sm.absolute_radius(0.5, 4 * 64 * 64, relative=True) == pytest.approx(0.5 * 128)
    assert sm.absolute_radius(20.0, 4096, relative=False) == 20.0
    batch = torch.randn(16, 4096, generator=torch.Generator().manual_seed(0))
    # independent unit-variance latents are √(2D) apart: relative distance ≈ √2
    assert sm.median_pairwise_distance(batch) / math.sqrt(4096) == pytest.approx(math.sqrt(2), rel=0.03)
    with pytest.raises(ValueError, match="at least 2"):
        sm.median_pairwise_distance(batch[:1])


def test_an_exact_copy_is_pushed_to_the_sphere_along_the_fallback():
    shields = torch.tensor([[1.0, 2.0, 3.0]])
    x0 = shields.clone()
    noise_direction = torch.tensor([[0.0, 0.0, -5.0]])
    result = sm.sparse_repellency_step(
        x0, [rs.ExactRangeSearch(shields)], 2.0, 1.0, False, fallback_direction=noise_direction
    )
    assert torch.allclose(result.denoised, torch.tensor([[1.0, 2.0, 1.0]]))
    without = sm.sparse_repellency_step(x0, [rs.ExactRangeSearch(shields)], 2.0, 1.0, False)
    assert float((without.denoised - shields).norm()) == pytest.approx(2.0)


def test_intra_batch_can_pull_a_sample_into_a_shield():
    """docs/spell.md's counter-example: the batch's own x̂0 are shields that are not disjoint from the set's,
    so the appendix-B guarantee does not cover intra-batch repellency."""
    from comfyui_shield.samplers.range_search import ExactRangeSearch

    shield = ExactRangeSearch(torch.zeros(1, 1))
    x0 = torch.tensor([[0.5], [1.2]])  # A inside the shield's ball, B outside it but within r of A
    with_batch = sm.sparse_repellency_step(x0, [shield], 1.0, 1.0, intra_batch=True).denoised
    without = sm.sparse_repellency_step(x0, [shield], 1.0, 1.0, intra_batch=False).denoised
    assert float(with_batch[0, 0]) == pytest.approx(0.7)  # 0.5 + 0.5 (shield) − 0.3 (B): inside r = 1
    assert float(without[0, 0]) == pytest.approx(1.0)  # on the sphere, as appendix B says


def test_the_float32_filter_slack_covers_the_rounding():
    """The filter's slack (FILTER_SLACK relative to ‖a‖² + ‖b‖²) against the float32 rounding of the
    expanded squared distance, measured on near-duplicates with a large common offset (docs/spell.md)."""
    from comfyui_shield.samplers.range_search import FILTER_SLACK

    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for offset in (0.0, 10.0):
        shields = torch.randn(500, 16384, generator=generator) + offset
        queries = torch.cat([shields[:8] + 0.01 * torch.randn(8, 16384, generator=generator), shields[8:16] * 1.0])
        query_norms, shield_norms = queries.pow(2).sum(1), shields.pow(2).sum(1)
        expanded = query_norms[:, None] - 2.0 * queries @ shields.T + shield_norms[None, :]
        exact = torch.cdist(queries.double(), shields.double()).pow(2)
        error = (expanded.double() - exact).abs() / (query_norms[:, None] + shield_norms[None, :]).double()
        worst = max(worst, float(error.max()))
    assert worst * 20 < FILTER_SLACK  # measured: ~150x (docs/spell.md)
