"""Diversity, replication and few-shot quality metrics on embeddings or flattened latents.

Plain torch; nothing here imports ComfyUI. Every function takes a [N, D] array (torch tensor or numpy
array; anything with more dimensions is flattened per item) and computes in float64 on the CPU, so
the numbers do not depend on the caller's dtype or device.

Sources:
- Vendi score: Friedman & Dieng, "The Vendi Score", TMLR 2023, Def. 3.1 (q = 1), used as the diversity
  metric of SPELL (spell-sparse-repellency.txt, section 4.1).
- Precision/recall: Kynkäänniemi et al., "Improved precision and recall metric for assessing generative
  models", NeurIPS 2019, Eq. 1-3; few-shot use: Semantica (semantica-image-variations.txt, section 7).
- Density/coverage: Naeem et al., "Reliable fidelity and diversity metrics for generative models",
  ICML 2020, Eq. 5 and 6.
- Nearest-training similarity at the 95th percentile: transition-point CFG (transition-point-cfg.txt,
  section 5, "Similarity (95pc)"); replication share inside a radius: SPELL section 4.6, Table 2.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import torch

ArrayLike = Union[torch.Tensor, np.ndarray]


# -- inputs -----------------------------------------------------------------------------------------
def as_matrix(items: ArrayLike, name: str = "items") -> torch.Tensor:
    """[N, ...] -> [N, D] float64 on the CPU."""
    matrix = torch.as_tensor(np.asarray(items) if not isinstance(items, torch.Tensor) else items)
    matrix = matrix.detach().to("cpu", torch.float64)
    if matrix.ndim == 1:
        raise ValueError(
            f"{name}: expected a batch [N, D] (one row per item), got a single vector of {matrix.shape[0]}"
        )
    matrix = matrix.reshape(matrix.shape[0], -1)
    if matrix.shape[0] == 0:
        raise ValueError(f"{name}: the batch is empty")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return matrix


def normalize_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Unit-length rows; an all-zero row stays zero (its cosine to anything is 0)."""
    norms = matrix.norm(dim=1, keepdim=True)
    return matrix / norms.clamp_min(torch.finfo(matrix.dtype).tiny)


def cosine_similarity_matrix(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """[N, M] cosine similarities between the rows of a and b."""
    return normalize_rows(as_matrix(a, "a")) @ normalize_rows(as_matrix(b, "b")).T


def distance_matrix(a: ArrayLike, b: ArrayLike) -> torch.Tensor:
    """[N, M] Euclidean distances between the rows of a and b."""
    return torch.cdist(as_matrix(a, "a"), as_matrix(b, "b"))


def cosine_kernel(matrix: torch.Tensor) -> torch.Tensor:
    """[N, N] cosine similarities within one batch, with identical items at similarity 1.

    All-zero rows (an empty latent, a black image) have no direction: two of them are the same item
    (similarity 1) and unrelated to the rest (0), which keeps the kernel PSD with a unit diagonal.
    """
    kernel = normalize_rows(matrix) @ normalize_rows(matrix).T
    zero = matrix.norm(dim=1) == 0
    kernel[zero[:, None] & zero[None, :]] = 1.0
    return kernel


# -- diversity --------------------------------------------------------------------------------------
def vendi_score_from_kernel(kernel: torch.Tensor) -> float:
    """exp(Shannon entropy of the eigenvalues of K/n) for a PSD kernel with unit diagonal (Def. 3.1, q=1)."""
    count = kernel.shape[0]
    eigenvalues = torch.linalg.eigvalsh(kernel.to(torch.float64) / count)
    eigenvalues = eigenvalues[eigenvalues > 0]  # round-off can make zero eigenvalues slightly negative
    entropy = -(eigenvalues * eigenvalues.log()).sum()
    return float(entropy.exp())


def vendi_score(embeddings: ArrayLike) -> float:
    """Vendi score with the cosine kernel: the effective number of distinct items, from 1 (all the
    same direction) to N (mutually orthogonal)."""
    return vendi_score_from_kernel(cosine_kernel(as_matrix(embeddings, "embeddings")))


def mean_pairwise_similarity(embeddings: ArrayLike) -> float:
    """Mean cosine similarity over all pairs i != j (the mean similarity score, MSS); 1 = all alike.

    A batch of one item has no pairs: the result is NaN.
    """
    similarities = cosine_kernel(as_matrix(embeddings, "embeddings"))
    count = similarities.shape[0]
    if count < 2:
        return float("nan")
    off_diagonal_sum = similarities.sum() - similarities.diagonal().sum()
    return float(off_diagonal_sum / (count * (count - 1)))


# -- replication ------------------------------------------------------------------------------------
def nearest_similarity(queries: ArrayLike, references: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the highest cosine similarity to any reference and that reference's index."""
    values, indices = cosine_similarity_matrix(queries, references).max(dim=1)
    return values, indices


def nearest_distance(queries: ArrayLike, references: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, the Euclidean distance to the nearest reference and that reference's index."""
    values, indices = distance_matrix(queries, references).min(dim=1)
    return values, indices


def share_within_radius(distances: ArrayLike, radius: float) -> float:
    """Share of items whose nearest-reference distance is <= radius (inside a shield: a violation)."""
    values = torch.as_tensor(np.asarray(distances, dtype=np.float64)).reshape(-1)
    return float((values <= radius).double().mean())


def share_above_similarity(similarities: ArrayLike, threshold: float) -> float:
    """Share of items whose nearest-reference similarity is >= threshold (e.g. SSCD > 0.5 as a copy)."""
    values = torch.as_tensor(np.asarray(similarities, dtype=np.float64)).reshape(-1)
    return float((values >= threshold).double().mean())


def percentile(values: ArrayLike, q: float) -> float:
    """The q-th percentile (0..100, linear interpolation), e.g. q=95 for the transition-point paper's
    "Similarity (95pc)"."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError("percentile of an empty set of values")
    return float(np.percentile(array, q))


# -- few-shot fidelity / diversity (k-NN manifolds) ---------------------------------------------------
def kth_neighbour_radii(items: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """Distance from each item to its k-th nearest other item (the radius of its k-NN ball)."""
    count = items.shape[0]
    if not 1 <= k < count:
        raise ValueError(f"{name}: k={k} nearest neighbours need at least k+1={k + 1} items, got {count}")
    distances = torch.cdist(items, items)
    # the k+1-th smallest in each row skips the item itself (distance 0)
    return distances.kthvalue(k + 1, dim=1).values


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eq. 1-3).

    precision: share of fake items inside the union of the real items' k-NN balls (quality);
    recall: share of real items inside the union of the fake items' k-NN balls (diversity).
    A point on a ball's boundary counts as inside (Eq. 1 uses <=).
    """
    real, fake = as_matrix(real, "real"), as_matrix(fake, "fake")
    real_radii = kth_neighbour_radii(real, k, "real")
    fake_radii = kth_neighbour_radii(fake, k, "fake")
    real_to_fake = torch.cdist(real, fake)  # [N_real, N_fake]
    precision = (real_to_fake <= real_radii[:, None]).any(dim=0).double().mean()
    recall = (real_to_fake <= fake_radii[None, :]).any(dim=1).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020, Eq. 5 and 6), both on the real items' k-NN balls.

    density: mean number of real balls holding each fake item, divided by k (about 1 when the
    distributions match; can exceed 1); coverage: share of real items whose ball holds a fake item.
    """
    real, fake = as_matrix(real, "real"), as_matrix(fake, "fake")
    real_radii = kth_neighbour_radii(real, k, "real")
    inside = torch.cdist(real, fake) <= real_radii[:, None]  # [N_real, N_fake]
    density = inside.double().sum(dim=0).mean() / k
    coverage = inside.any(dim=1).double().mean()
    return {"density": float(density), "coverage": float(coverage)}


def prdc(real: ArrayLike, fake: ArrayLike, k: int = 3) -> dict[str, float]:
    """Precision, recall, density and coverage at one k."""
    return {**precision_recall(real, fake, k), **density_coverage(real, fake, k)}


# -- distribution distance and noise (quality) -------------------------------------------------------
def gaussian_stats(features: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [D] and covariance [D, D] (unbiased; zero for a single item) of [N, D] features."""
    matrix = as_matrix(features, "features")
    mean = matrix.mean(dim=0)
    centred = matrix - mean
    covariance = centred.T @ centred / max(matrix.shape[0] - 1, 1)
    return mean, covariance


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off -> 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_from_stats(mean_a, cov_a, mean_b, cov_b) -> float:
    """Fréchet distance of two Gaussians (Heusel et al., "GANs trained by a two time-scale update rule",
    NeurIPS 2017, Eq. 6 — FID on other features): |μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½).
    The trace of the cross term is computed from the symmetric product, which has the same eigenvalues
    as Σa Σb and stays real."""
    mean_a, mean_b = torch.as_tensor(mean_a, dtype=torch.float64), torch.as_tensor(mean_b, dtype=torch.float64)
    cov_a, cov_b = torch.as_tensor(cov_a, dtype=torch.float64), torch.as_tensor(cov_b, dtype=torch.float64)
    root_a = psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))


def frechet_distance(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet distance between the Gaussians fitted to two sets of [N, D] features. Biased upwards for
    small sets (the covariance of a few items is noisy): compare batches of the same size."""
    return frechet_distance_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))


NOISE_KERNEL = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]], dtype=torch.float64)


def noise_sigma(images: torch.Tensor) -> torch.Tensor:
    """[N] estimated sigma of additive white gaussian pixel noise in images [N, C, H, W] (image units).

    Immerkær, "Fast noise variance estimation", CVIU 1996: the 3×3 kernel above (a difference of two
    Laplacians) cancels flat areas and linear ramps; on white noise of sigma s its response has standard
    deviation 6·s (the kernel's L2 norm). The median absolute response / 0.6745 (a robust standard
    deviation, instead of the paper's mean) ignores the few edge pixels of flat-coloured shapes, so a
    clean render scores about 0 and the same image with noise of sigma s about s."""
    if images.ndim != 4:
        raise ValueError(f"noise_sigma: expected images [N, C, H, W], got shape {tuple(images.shape)}")
    pixels = images.detach().to("cpu", torch.float64)
    count, channels = pixels.shape[:2]
    kernel = NOISE_KERNEL.reshape(1, 1, 3, 3)
    response = torch.nn.functional.conv2d(pixels.reshape(count * channels, 1, *pixels.shape[2:]), kernel)
    return response.reshape(count, -1).abs().median(dim=1).values / (0.6745 * 6.0)


# -- detection quality (ROC) ---------------------------------------------------------------------------
# One convention for every detector in the pack (the copy detector, Memorization Risk): an item is
# flagged when its score is AT OR ABOVE the threshold (score >= t). The TPR / FPR at t are the shares of
# positives / negatives flagged; threshold_at_fpr returns the lowest t whose FPR is at most the target, so
# negatives tied at the boundary all stay below it (never half a tie flagged); the AUC counts ties one half.
def roc_auc(positive: ArrayLike, negative: ArrayLike) -> float:
    """Area under the ROC curve of scores where higher means positive: the probability that a random
    positive outscores a random negative, ties counting one half (Mann-Whitney U / (n_pos · n_neg))."""
    pos = torch.as_tensor(np.asarray(positive, dtype=np.float64)).reshape(-1)
    neg = torch.as_tensor(np.asarray(negative, dtype=np.float64)).reshape(-1)
    if not len(pos) or not len(neg):
        raise ValueError("roc_auc needs at least one positive and one negative score")
    scores = torch.cat([pos, neg])
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:  # average ranks of ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    u_statistic = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u_statistic / (len(pos) * len(neg)))


def rate_at_threshold(scores: ArrayLike, threshold: float) -> float:
    """Share of scores >= threshold (the TPR on positives, the FPR on negatives)."""
    return share_above_similarity(scores, threshold)


def threshold_at_fpr(negative: ArrayLike, fpr: float) -> float:
    """The lowest threshold whose false-positive rate (share of negatives >= it) is at most `fpr`: just
    above the highest negative that must stay unflagged (all negatives tied with it stay unflagged too).
    -inf when `fpr` allows every negative to be flagged."""
    values = np.sort(np.asarray(negative, dtype=np.float64).reshape(-1))
    if values.size == 0:
        raise ValueError("threshold_at_fpr needs at least one negative score")
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"threshold_at_fpr: fpr must lie in [0, 1], got {fpr}")
    allowed = int(np.floor(fpr * len(values)))  # negatives that may lie at or above the threshold
    if allowed >= len(values):
        return float("-inf")
    top = values[len(values) - allowed - 1]  # the highest negative that must stay below
    return float(np.nextafter(top, np.inf))
