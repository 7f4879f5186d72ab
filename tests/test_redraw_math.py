"""Early Copy Redraw's pieces against direct computations."""

import torch

from comfyui_shield.samplers import redraw_math as rm


def test_the_probe_runs_the_steps_that_start_at_or_above_the_check():
    sigmas = torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0])
    assert rm.probe_length(sigmas, 3.0) == 3  # steps from 10, 6 and 3; the check is the evaluation at 3
    assert rm.probe_length(sigmas, 2.9) == 3
    assert rm.probe_length(sigmas, 50.0) == 1  # at least the first step
    assert rm.probe_length(sigmas, -1.0) == 4  # at most every step


def test_heading_into_a_shield_is_at_or_above_the_threshold():
    similarity = torch.tensor([0.59, 0.6, 0.61, -1.0])
    assert rm.heading_into(similarity, 0.6).tolist() == [False, True, True, False]


def test_fresh_noise_is_reproducible_standard_normal_and_differs_per_attempt():
    first, again, second = (rm.fresh_noise((64, 4, 8, 8), 5, a) for a in (1, 1, 2))
    assert torch.equal(first, again) and not torch.equal(first, second)
    assert not torch.equal(first, rm.fresh_noise((64, 4, 8, 8), 6, 1))
    assert abs(float(first.mean())) < 0.02 and abs(float(first.std()) - 1.0) < 0.02


def test_keep_best_keeps_the_least_similar_noise_per_sample():
    best, best_similarity = torch.zeros(3, 2), torch.tensor([0.9, 0.5, float("inf")])
    noise, similarity = torch.ones(3, 2), torch.tensor([0.8, 0.7, 0.95])
    kept, kept_similarity = rm.keep_best(best, best_similarity, noise, similarity)
    assert kept.tolist() == [[1, 1], [0, 0], [1, 1]]
    assert kept_similarity.tolist() == [0.800000011920929, 0.5, 0.949999988079071]
