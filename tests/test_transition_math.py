"""Transition-point math: Algorithm 1's detector on given d_t sequences, the guidance scales, the algebra."""

import math

import pytest
import torch

from comfyui_shield.samplers.transition_math import (
    TransitionDetector,
    before_guidance_scale,
    first_local_minimum_step,
    guidance_distance,
    guided,
    reached_sigma,
    replacement_cond,
)


def algorithm_1_literal(distances):
    """Algorithm 1 transcribed with its own indexing (t = T..1, d_{T+2} = d_{T+1} = −∞)."""
    total = len(distances)
    d = {total + 2: -math.inf, total + 1: -math.inf}
    for t in range(total, 0, -1):
        d[t] = distances[total - t]
        if d[t + 2] > d[t + 1] and d[t + 1] < d[t]:
            return total - t
    return None


CURVES = {
    "minimum at index 1": ([5.0, 3.0, 4.0, 1.0], 2),
    "minimum late": ([9.0, 8.0, 7.0, 6.0, 7.0, 1.0], 4),
    "first of two minima": ([4.0, 2.0, 3.0, 1.0, 2.0], 2),
    "monotone decreasing: never": ([5.0, 4.0, 3.0, 2.0, 1.0], None),
    "monotone increasing: never": ([1.0, 2.0, 3.0, 4.0], None),
    "constant: never": ([2.0, 2.0, 2.0, 2.0], None),
    "tie at the minimum: never": ([5.0, 3.0, 3.0, 4.0], None),
    "tie before a strict minimum": ([5.0, 5.0, 3.0, 4.0], 3),
    "tie after the minimum: never": ([5.0, 3.0, 3.0], None),
    "rise then dip": ([1.0, 2.0, 1.0, 2.0], 3),
    "index 0 is never a minimum": ([1.0, 5.0, 6.0], None),
    "too short": ([3.0, 1.0], None),
    "empty": ([], None),
}


@pytest.mark.parametrize("name", sorted(CURVES))
def test_switch_step_matches_algorithm_1(name):
    curve, expected = CURVES[name]
    assert first_local_minimum_step(curve) == expected
    assert algorithm_1_literal(curve) == expected


@pytest.mark.parametrize("name", sorted(CURVES))
def test_batched_detector_matches_sequence_form(name):
    curve, expected = CURVES[name]
    detector = TransitionDetector(batch_size=1)
    flags = [bool(detector.observe(torch.tensor([value]))[0]) for value in curve]
    first = flags.index(True) if True in flags else None
    assert first == expected
    assert all(flags[first:]) if first is not None else not any(flags)


def test_detector_switches_each_sample_on_its_own_curve():
    curves = [CURVES["minimum at index 1"][0], CURVES["minimum late"][0][:4], CURVES["tie at the minimum: never"][0]]
    detector = TransitionDetector(batch_size=3)
    history = [detector.observe(torch.tensor(step)) for step in zip(*curves, strict=True)]
    first = [next((i for i, flags in enumerate(history) if flags[b]), None) for b in range(3)]
    assert first == [first_local_minimum_step(c) for c in curves] == [2, None, None]


def test_steps_that_do_not_count_keep_the_history():
    detector = TransitionDetector(batch_size=2)
    detector.observe(torch.tensor([5.0, 5.0]))
    detector.observe(torch.tensor([3.0, 3.0]))
    # an intermediate evaluation (e.g. a second-order stage) for sample 0 only: it must be ignored
    switched = detector.observe(torch.tensor([0.0, 4.0]), counts=torch.tensor([False, True]))
    assert switched.tolist() == [False, True]
    assert detector.observe(torch.tensor([4.0, 1.0])).tolist() == [True, True]


def test_before_guidance_scales():
    assert before_guidance_scale("unconditional", 2.0) == 0.0
    assert before_guidance_scale("conditional", 2.0) == 1.0
    assert before_guidance_scale("opposite", 2.5) == -2.5
    with pytest.raises(ValueError, match="λ > 0"):
        before_guidance_scale("opposite", 0.0)
    with pytest.raises(ValueError, match="before_guidance"):
        before_guidance_scale("none", 1.0)


def test_guidance_distance_is_per_sample_squared_norm():
    cond = torch.zeros(2, 1, 2, 2)
    uncond = torch.zeros(2, 1, 2, 2)
    cond[1] = 0.5
    assert guidance_distance(cond, uncond).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("cfg", [7.0, 1.0, -2.0, 0.0])
def test_replacement_makes_sampler_cfg_apply_the_target(cfg):
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 3, 2, 2, generator=generator), torch.randn(4, 3, 2, 2, generator=generator)
    guidance = torch.tensor([0.0, 1.0, -3.0, cfg], dtype=torch.float64)
    new_cond, new_uncond = replacement_cond(cond, uncond, guidance, cfg)
    combined = new_uncond + cfg * (new_cond - new_uncond)
    torch.testing.assert_close(combined, guided(uncond, cond, guidance), rtol=1e-5, atol=1e-5)
    assert torch.equal(new_cond[3], cond[3]) and torch.equal(new_uncond[3], uncond[3])  # g == cfg: untouched
    if cfg != 0:
        assert torch.equal(new_uncond, uncond)  # the real uncond survives for later hooks
        assert torch.equal(combined[0], uncond[0])  # g = 0 is exact: pure unconditional


def test_static_point_in_sigma():
    sigma = torch.tensor([14.6, 1.0, 0.03])
    assert reached_sigma(sigma, 1.0).tolist() == [False, True, True]
    assert reached_sigma(sigma, 999999999.9).all()  # percent 0
    assert not reached_sigma(sigma, 0.0).any()  # percent 1
