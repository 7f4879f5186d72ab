"""Train the demo domain's judge: the copy detector and the class classifier (reference_models/judge.py).

    OMP_NUM_THREADS=1 $SHIELD_PYTHON scripts/train_judge.py [--seed 0] [--report judge_report.json]

The second, judging-only copy detector (docs/judge.md "The second copy detector"): another architecture and
seed, the same augmentations and evaluation, no classifier:

    OMP_NUM_THREADS=1 $SHIELD_PYTHON scripts/train_judge.py --detector-only --seed 1 --architecture pooled \
        --width 16 --dim 96 --activation relu --detector-name demo_copy_detector_2nd.safetensors

Reproducible from the seed (same torch build and thread count give the same weights). Both models learn
from renders of the demo domain: the dataset's distinct items (unique and duplicated, each once) and
fresh random items of every class drawn from the seed. Nothing trains on the held-out items of
`held_out_params`: validation items (seed VALIDATION_SEED) choose the copy threshold, test items (seed
TEST_SEED) give the reported numbers.

Copy detector (SSCD, Pizzi et al. 2022, §3.1): two augmented views of each item in a batch, InfoNCE
over the batch (each view must pick its twin among 2B−1 others); half of every batch is one class, so
"another star" is a frequent negative. Evaluation: each held-out item against an augmented copy of
itself (positive) and against every other held-out item, same class or not (negative).

Classifier: cross-entropy on the class labels with milder augmentations; its pooled features of the
dataset's items give each class's statistics for the Fréchet quality figure.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import random
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness.host import import_comfyui_in_process  # noqa: E402

import_comfyui_in_process()

import torch  # noqa: E402

from comfyui_shield.core import metrics  # noqa: E402
from comfyui_shield.core.copy_detector import (  # noqa: E402
    ACTIVATIONS,
    ARCHITECTURES,
    CopyDescriptor,
    DetectorConfig,
    load_detector,
    save_detector,
)
from comfyui_shield.reference_models import demo_dataset, judge  # noqa: E402
from comfyui_shield.reference_models.copy_augment import AugmentLevels, augment, clearly_distinct  # noqa: E402

VALIDATION_SEED = 101
TEST_SEED = 202
# milder than the detector's: with its noise (σ 0.4) and blotches, small stars and crosses became hard to
# tell apart and 600 steps reached 83 % held-out accuracy
CLASSIFIER_LEVELS = AugmentLevels(shift=1.0, scale=0.05, rotation=5.0, grey=0.2, blur=0.8, noise=0.15, blotch=0.1)
TARGET_FPR = 0.01


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--detector-steps", type=int, default=1500)
    parser.add_argument("--classifier-steps", type=int, default=1500)
    parser.add_argument("--classifier-lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--fresh-per-class", type=int, default=800, help="random training items per class")
    parser.add_argument("--eval-per-class", type=int, default=100, help="held-out items per class and split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=pathlib.Path, default=judge.WEIGHTS_DIR)
    parser.add_argument("--report", type=pathlib.Path, default=None, help="write the evaluation as JSON")
    parser.add_argument("--detector-only", action="store_true", help="train and write the copy detector only")
    parser.add_argument("--detector-name", default=judge.DETECTOR_PATH.name, help="the detector's file in --out-dir")
    parser.add_argument("--architecture", choices=ARCHITECTURES, default=DetectorConfig.architecture)
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default=DetectorConfig.activation)
    parser.add_argument("--width", type=int, default=DetectorConfig.width, help="channels of the first stage")
    parser.add_argument("--dim", type=int, default=DetectorConfig.dim, help="descriptor length")
    parser.add_argument(
        "--reuse-detector",
        type=pathlib.Path,
        default=None,
        help="skip the detector's training: re-evaluate and re-threshold the detector in this file",
    )
    return parser.parse_args()


def training_pool(dataset, seed: int, fresh_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dataset's distinct items and fresh random items of every class: images [M, 3, 32, 32], labels [M]."""
    rng = random.Random(seed)
    fresh = [
        demo_dataset.random_params(c, rng) for c in range(len(demo_dataset.CLASS_NAMES)) for _ in range(fresh_per_class)
    ]
    images = torch.cat([dataset.images, demo_dataset.render_items(fresh)])
    labels = torch.cat([dataset.labels, torch.tensor([p.class_id for p in fresh])])
    return images, labels


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def class_heavy_batch(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices: half from one random class (hard negatives), half from the whole pool."""
    cls = int(torch.randint(len(demo_dataset.CLASS_NAMES), (1,), generator=generator))
    members = (labels == cls).nonzero().flatten()
    same = members[torch.randperm(len(members), generator=generator)[: size // 2]]
    rest = torch.randint(len(labels), (size - len(same),), generator=generator)
    return torch.cat([same, rest])


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over 2B unit descriptors: view i of item k must find view j of item k (SSCD §3.1)."""
    views = torch.cat([first, second])
    logits = views @ views.T / temperature
    logits.fill_diagonal_(float("-inf"))
    count = first.shape[0]
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)])
    return torch.nn.functional.cross_entropy(logits, targets)


def train_detector(images, labels, args, config: DetectorConfig | None = None) -> CopyDescriptor:
    """InfoNCE on two augmented views per item (SSCD §3.1); `config`: the architecture (default: the bundled one's)."""
    torch.manual_seed(args.seed)
    model = CopyDescriptor(config or DetectorConfig())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.time()
    for step in range(args.detector_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.detector_steps, args.lr)
        batch = images[class_heavy_batch(labels, args.batch_size, generator)]
        loss = info_nce(model(augment(batch, generator)), model(augment(batch, generator)), args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.detector_steps - 1:
            print(f"detector step {step}: InfoNCE {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
    return as_shipped(model.eval().requires_grad_(False))


@torch.no_grad()
def as_shipped(model: torch.nn.Module) -> torch.nn.Module:
    """The weights rounded to float16, as the file stores them: every figure is measured on these."""
    for tensor in model.state_dict().values():
        tensor.copy_(tensor.half().float())
    return model


def copy_scores(model: CopyDescriptor, seed: int, per_class: int) -> dict:
    """Held-out items: an augmented copy vs its original (positives), vs every clearly distinct item
    (negatives; `clearly_distinct`: another class, or a geometry beyond twice a copy's changes). Pairs of
    independent draws that are the same picture up to colour are neither, and only counted."""
    params = demo_dataset.held_out_params(per_class, seed)
    originals = demo_dataset.render_items(params)
    copies = augment(originals, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        similarity = model(copies) @ model(originals).T
    labels = torch.tensor([p.class_id for p in params])
    distinct = torch.tensor([[clearly_distinct(a, b) for b in params] for a in params])
    same_class = (labels[:, None] == labels[None, :]) & distinct
    return {
        "positive": similarity.diagonal(),
        "negative": similarity[distinct],
        "same_class": similarity[same_class],
        "same_picture_pairs": int((~distinct).sum()) - len(params),
    }


def detector_report(scores: dict[str, torch.Tensor], threshold: float) -> dict:
    return {
        "roc_auc": metrics.roc_auc(scores["positive"], scores["negative"]),
        "tpr": metrics.rate_at_threshold(scores["positive"], threshold),
        "fpr": metrics.rate_at_threshold(scores["negative"], threshold),
        "fpr_same_class": metrics.rate_at_threshold(scores["same_class"], threshold),
        "tpr_at_1pct_fpr": metrics.rate_at_threshold(
            scores["positive"], metrics.threshold_at_fpr(scores["negative"], TARGET_FPR)
        ),
        "tpr_at_1pct_same_class_fpr": metrics.rate_at_threshold(
            scores["positive"], metrics.threshold_at_fpr(scores["same_class"], TARGET_FPR)
        ),
        "positives": len(scores["positive"]),
        "negatives": len(scores["negative"]),
        "same_class_negatives": len(scores["same_class"]),
        "same_picture_pairs_left_out": scores["same_picture_pairs"],
        "lowest_copy_similarity": float(scores["positive"].min()),
        "highest_distinct_similarity": float(scores["negative"].max()),
    }


def choose_threshold(scores: dict[str, torch.Tensor]) -> float:
    """Halfway between the lowest threshold with validation FPR <= 1 % on same-class pairs (the hard
    negatives) and the validation copies' 1st percentile, or that FPR threshold when they overlap."""
    at_fpr = metrics.threshold_at_fpr(scores["same_class"], TARGET_FPR)
    low_copies = metrics.percentile(scores["positive"], 1.0)
    return (at_fpr + low_copies) / 2 if low_copies > at_fpr else at_fpr


def train_classifier(images, labels, args) -> judge.ShapeClassifier:
    torch.manual_seed(args.seed + 1)
    model = judge.ShapeClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.classifier_lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed + 1)
    started = time.time()
    for step in range(args.classifier_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.classifier_steps, args.classifier_lr)
        index = torch.randint(len(labels), (args.batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(
            model(augment(images[index], generator, CLASSIFIER_LEVELS)), labels[index]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.classifier_steps - 1:
            print(
                f"classifier step {step}: cross-entropy {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True
            )
    return as_shipped(model.eval().requires_grad_(False))


@torch.no_grad()
def classifier_report(model: judge.ShapeClassifier, per_class: int) -> dict:
    params = demo_dataset.held_out_params(per_class, TEST_SEED)
    images = demo_dataset.render_items(params)
    labels = torch.tensor([p.class_id for p in params])
    augmented = augment(images, torch.Generator().manual_seed(TEST_SEED), CLASSIFIER_LEVELS)
    clean_hits = model(images).argmax(1) == labels
    return {
        "held_out_accuracy": float(clean_hits.double().mean()),
        "held_out_accuracy_augmented": float((model(augmented).argmax(1) == labels).double().mean()),
        "per_class": {
            name: float(clean_hits[labels == c].double().mean()) for c, name in enumerate(demo_dataset.CLASS_NAMES)
        },
        "items": len(labels),
    }


@torch.no_grad()
def class_statistics(model: judge.ShapeClassifier, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of the pooled features of each class's training items (distinct, each once)."""
    features = model.features(dataset.images)
    stats = [metrics.gaussian_stats(features[dataset.labels == c]) for c in range(len(demo_dataset.CLASS_NAMES))]
    return torch.stack([s[0] for s in stats]), torch.stack([s[1] for s in stats])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    dataset = demo_dataset.build_dataset()
    images, labels = training_pool(dataset, args.seed, args.fresh_per_class)
    print(f"training pool: {len(labels)} items", flush=True)
    settings = {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}
    if args.reuse_detector:
        detector = load_detector(args.reuse_detector).model
    else:
        started = time.time()
        config = DetectorConfig(
            width=args.width, dim=args.dim, architecture=args.architecture, activation=args.activation
        )
        detector = train_detector(images, labels, args, config)
        settings["detector_training_minutes"] = round((time.time() - started) / 60, 1)
    settings["config"] = json.loads(detector.config.as_json())  # the architecture the weights are (also on reuse)
    threshold = choose_threshold(copy_scores(detector, VALIDATION_SEED, args.eval_per_class))
    test = detector_report(copy_scores(detector, TEST_SEED, args.eval_per_class), threshold)
    save_detector(detector, threshold, args.out_dir / args.detector_name, {**settings, "test": test})
    report = {"threshold": threshold, "detector_test": test, "settings": settings}
    if not args.detector_only:
        classifier = train_classifier(images, labels, args)
        report["classifier_test"] = accuracy = classifier_report(classifier, args.eval_per_class)
        mean, cov = class_statistics(classifier, dataset)
        judge.save_classifier(
            classifier, mean, cov, args.out_dir / judge.CLASSIFIER_PATH.name, {**settings, "test": accuracy}
        )
    print(json.dumps(report, indent=2))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
