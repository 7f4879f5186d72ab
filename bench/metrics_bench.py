"""Speed of core/metrics.py on 1000 x 512 embeddings, against the vendi_score and prdc packages.

Run: `$SHIELD_PYTHON bench/metrics_bench.py [--quick]`. Prints a markdown section: median time per call
over repeats, the reference package's median and the ratio (both timed in this run), and the largest
difference between the two results.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from bench_common import arguments, import_pack, markdown_table, median_seconds

COUNT, DIM = 1000, 512
K = 3


def embeddings(seed: int, shift: float = 0.0) -> np.ndarray:
    """Correlated rows (a shared offset), as real image embeddings are, so the Vendi spectrum is not flat."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(COUNT, DIM)) + shift + 0.5).astype(np.float32)


def quiet_prdc(real, fake, k):
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        return compute_prdc(real, fake, nearest_k=k)


def main() -> None:
    args = arguments(__doc__)
    import_pack()
    from vendi_score import vendi

    from comfyui_shield.core import metrics

    repeats = 3 if args.quick else 7
    real, fake = embeddings(0), embeddings(1, shift=0.3)
    references = embeddings(2)[:COUNT]

    cases = [
        ("Vendi score (cosine kernel)", lambda: metrics.vendi_score(fake), lambda: vendi.score_X(fake), None),
        ("mean pairwise similarity", lambda: metrics.mean_pairwise_similarity(fake), None, None),
        ("nearest cosine similarity (1k x 1k)", lambda: metrics.nearest_similarity(fake, references), None, None),
        ("nearest L2 distance (1k x 1k)", lambda: metrics.nearest_distance(fake, references), None, None),
        (f"precision/recall (k={K})", lambda: metrics.precision_recall(real, fake, K), None, None),
        (f"density/coverage (k={K})", lambda: metrics.density_coverage(real, fake, K), None, None),
        (
            f"precision/recall/density/coverage (k={K})",
            lambda: metrics.prdc(real, fake, K),
            lambda: quiet_prdc(real, fake, K),
            ("precision", "recall", "density", "coverage"),
        ),
    ]
    rows = []
    for name, ours, reference, keys in cases:
        ours_time = median_seconds(ours, repeats)
        if reference is None:
            rows.append([name, f"{ours_time * 1000:.1f}", "", "", ""])
            continue
        reference_time = median_seconds(reference, repeats)
        ours_value, reference_value = ours(), reference()
        pairs = [(ours_value, reference_value)] if keys is None else [(ours_value[k], reference_value[k]) for k in keys]
        difference = max(abs(a - float(b)) / max(abs(float(b)), 1e-12) for a, b in pairs)
        rows.append(
            [
                name,
                f"{ours_time * 1000:.1f}",
                f"{reference_time * 1000:.1f}",
                f"{reference_time / ours_time:.2f}x",
                f"{difference:.1e}",
            ]
        )
    scores = metrics.prdc(real, fake, K)
    print("## Metrics: core/metrics.py speed\n")
    print(
        f"{COUNT} x {DIM} float32 embeddings (Gaussian rows with a shared offset), torch threads {args.threads}, "
        f"median of {repeats} calls after one warm-up. Reference packages: `vendi_score` (score_X) and `prdc` "
        f"(compute_prdc, sklearn distances). Speed-up = reference time / ours; max relative difference = largest "
        f"relative difference between the two results (the packages compute in the input's float32, we in float64).\n"
    )
    print(markdown_table(["metric", "ours (ms)", "reference (ms)", "speed-up", "max relative difference"], rows))
    print(
        f"\nValues on this data: Vendi {metrics.vendi_score(fake):.2f} of {COUNT}, "
        f"precision {scores['precision']:.3f}, recall {scores['recall']:.3f}, "
        f"density {scores['density']:.3f}, coverage {scores['coverage']:.3f}.\n"
    )


if __name__ == "__main__":
    main()
