"""core/metrics.py: values known by construction, and agreement with the vendi_score and prdc packages."""

import contextlib
import io

import numpy as np
import pytest
import torch
from prdc import compute_prdc
from vendi_score import vendi

from comfyui_shield.core import metrics


def random_embeddings(count, dim, seed):
    return np.random.default_rng(seed).normal(size=(count, dim))


def reference_prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        return compute_prdc(real, fake, nearest_k=k)


# -- Vendi / MSS ------------------------------------------------------------------------------------
def test_vendi_of_identical_items_is_one():
    same = np.tile(random_embeddings(1, 16, 0), (7, 1))
    assert metrics.vendi_score(same) == pytest.approx(1.0, abs=1e-9)
    assert metrics.mean_pairwise_similarity(same) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("count", [1, 3, 8])
def test_vendi_of_orthonormal_items_is_their_count(count):
    basis = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(count)))[
        0
    ][:count]
    assert metrics.vendi_score(basis * 3.0) == pytest.approx(count, abs=1e-9)  # scale-free: cosine kernel
    if count > 1:
        assert metrics.mean_pairwise_similarity(basis) == pytest.approx(0.0, abs=1e-12)


def test_vendi_of_two_clusters_is_two():
    a, b = np.eye(4)[0], np.eye(4)[1]
    assert metrics.vendi_score(np.stack([a, a, a, b, b, b])) == pytest.approx(2.0, abs=1e-9)


def test_vendi_matches_the_vendi_score_package():
    embeddings = random_embeddings(40, 8, 1) + 0.5  # correlated rows: a non-trivial spectrum
    expected = vendi.score_X(embeddings)  # normalizes rows, cosine kernel, q = 1
    assert metrics.vendi_score(torch.as_tensor(embeddings, dtype=torch.float32)) == pytest.approx(expected, rel=1e-5)
    assert 1.0 < expected < 40


def test_all_zero_items_count_as_one_item():
    zeros_and_one = np.zeros((4, 6))
    zeros_and_one[3, 0] = 1.0
    assert metrics.vendi_score(np.zeros((3, 6))) == pytest.approx(1.0)
    assert metrics.mean_pairwise_similarity(np.zeros((3, 6))) == pytest.approx(1.0)
    # three zeros (one item) and one unit vector (orthogonal to them): two clusters of sizes 3 and 1
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert metrics.vendi_score(zeros_and_one) == pytest.approx(expected)


def test_mss_matches_a_direct_loop():
    embeddings = random_embeddings(6, 5, 2)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    pairs = [unit[i] @ unit[j] for i in range(6) for j in range(6) if i != j]
    assert metrics.mean_pairwise_similarity(embeddings) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_latents_are_flattened_per_item():
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert metrics.vendi_score(latents) == pytest.approx(metrics.vendi_score(latents.reshape(5, -1)))


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="single vector"):
        metrics.vendi_score(np.ones(4))
    with pytest.raises(ValueError, match="NaN"):
        metrics.vendi_score(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="k=3 .* at least k\\+1=4"):
        metrics.precision_recall(np.eye(3), np.eye(3), k=3)


# -- nearest neighbours / replication --------------------------------------------------------------
def test_nearest_distance_and_similarity_find_the_right_reference():
    references = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0]])
    queries = np.array([[9.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    distances, indices = metrics.nearest_distance(queries, references)
    assert indices.tolist() == [1, 2, 0]
    assert distances.tolist() == pytest.approx([1.0, 1.0, 0.0])
    similarities, indices = metrics.nearest_similarity(np.array([[1.0, 0.1], [-1.0, 0.0]]), references[1:])
    assert indices.tolist() == [0, 1]  # [-1, 0] is orthogonal to [0, 5] (cos 0) and opposite [10, 0] (cos -1)
    assert similarities.tolist() == pytest.approx([1 / np.sqrt(1.01), 0.0])


def test_replication_shares_and_percentile():
    distances = np.array([0.5, 1.0, 1.5, 3.0])
    assert metrics.share_within_radius(distances, 1.0) == 0.5  # the boundary counts as inside
    assert metrics.share_above_similarity([0.2, 0.6, 0.9], 0.5) == pytest.approx(2 / 3)
    assert metrics.percentile(np.arange(101), 95) == pytest.approx(95.0)
    assert metrics.percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        metrics.percentile([1.0], 120)


# -- precision / recall / density / coverage ---------------------------------------------------------
def test_identical_sets_have_full_precision_recall_coverage():
    points = random_embeddings(30, 4, 4)
    scores = metrics.prdc(points, points, k=3)
    assert scores["precision"] == scores["recall"] == scores["coverage"] == 1.0


def test_disjoint_far_sets_score_zero():
    real = random_embeddings(30, 4, 5)
    fake = random_embeddings(30, 4, 6) + 100.0
    assert metrics.prdc(real, fake, k=3) == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_known_overlap_on_a_line():
    # real = 0..9 and fake = 4.5..13.5 on a line; with k=1 every ball has radius 1, so exactly the
    # fakes 4.5..9.5 (6 of 10) lie on the real manifold and the reals 4..9 (6 of 10) on the fake one.
    real = np.arange(10.0)[:, None]
    fake = np.arange(10.0)[:, None] + 4.5
    scores = metrics.prdc(real, fake, k=1)
    assert scores["precision"] == pytest.approx(0.6)
    assert scores["recall"] == pytest.approx(0.6)
    # reals 4..9 each hold one fake within radius 1 -> coverage 0.6; fakes 4.5..8.5 lie in two real
    # balls, 9.5 in one, the others in none -> density (5*2 + 1) / 10 / k = 1.1
    assert scores["coverage"] == pytest.approx(0.6)
    assert scores["density"] == pytest.approx(1.1)


def test_a_collapsed_fake_set_has_precision_but_no_recall():
    """Semantica's argument: copying the reference scores precision, recall exposes it."""
    real = random_embeddings(50, 8, 7)
    fake = real[:1] + random_embeddings(50, 8, 8) * 1e-3  # 50 near-copies of one real item
    scores = metrics.precision_recall(real, fake, k=3)
    assert scores["precision"] == 1.0
    assert scores["recall"] <= 4 / 50


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_the_prdc_package(k):
    real = random_embeddings(60, 6, 10 + k)
    fake = random_embeddings(45, 6, 20 + k) * 1.3 + 0.4  # partial overlap
    ours = metrics.prdc(real, fake, k=k)
    theirs = reference_prdc(real, fake, k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(theirs[name]), abs=1e-12), name
    assert 0 < ours["precision"] < 1  # a partial overlap, not a trivial case
