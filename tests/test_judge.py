"""The demo judge (reference_models/judge.py): copy detector, classifier and quality figures on known inputs.

The issue's examples: a recoloured or noised duplicated item is a copy; another item of the same class
(another place, size or angle) is not, however alike in colour; pixel L2 gets the first one wrong.
"""

import logging
import pathlib

import pytest
import torch

from comfyui_shield.core import metrics
from comfyui_shield.core.copy_detector import CopyDetectorError, DetectorConfig, load_detector
from comfyui_shield.reference_models import demo_dataset, judge, replication
from comfyui_shield.reference_models.copy_augment import AugmentLevels, augment, clearly_distinct
from comfyui_shield.samplers.embedders import CopyDetectorEmbedder

NOISE = 0.2  # pixel-noise sigma in [-1, 1] units: about twice what plain sampling leaves


@pytest.fixture(scope="module")
def the_judge() -> judge.Judge:
    return judge.load_judge()


@pytest.fixture(scope="module")
def dataset() -> demo_dataset.DemoDataset:
    return demo_dataset.build_dataset()


def noised(images, sigma, seed=0):
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images + sigma * noise).clamp(-1, 1)


def duplicated_items(dataset, name):
    index = dataset.class_items(name, duplicated=True)
    return dataset.images[index], [dataset.params[i] for i in index]


# -- copies -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", demo_dataset.MEMORIZABLE_CLASSES)
def test_recoloured_and_noised_duplicated_items_are_copies(the_judge, dataset, name):
    originals, params = duplicated_items(dataset, name)
    recoloured = demo_dataset.render_items([demo_dataset.recolored(p, 1.0 - p.tone) for p in params])
    grey = originals.mean(dim=1, keepdim=True).expand_as(originals)
    for changed in (recoloured, noised(originals, NOISE), noised(recoloured, NOISE, seed=1), grey):
        verdict = the_judge.is_copy(changed, originals)
        assert verdict.is_copy.all(), verdict.similarity
        assert verdict.nearest.tolist() == list(range(len(originals)))  # each is a copy of its own original


@pytest.mark.parametrize("name", demo_dataset.MEMORIZABLE_CLASSES)
def test_other_items_of_the_class_are_no_copies_of_the_duplicated_ones(the_judge, dataset, name):
    """The class's unique items (UNIQUE_PER_CLASS), less the few drawn at nearly the same place, size and angle as a
    duplicated one (the same picture up to colour: `clearly_distinct`), are no copies."""
    duplicated_index = dataset.class_items(name, duplicated=True).tolist()
    duplicated = dataset.images[duplicated_index]
    unique = [
        int(i)
        for i in dataset.class_items(name, duplicated=False)
        if all(clearly_distinct(dataset.params[int(i)], dataset.params[d]) for d in duplicated_index)
    ]
    assert len(unique) >= 0.9 * demo_dataset.UNIQUE_PER_CLASS
    verdict = the_judge.is_copy(dataset.images[unique], duplicated)
    assert verdict.share <= 0.02, verdict.similarity.topk(6).values
    fresh = [p for p in demo_dataset.held_out_params(40, seed=11) if p.class_id == demo_dataset.class_index(name)]
    fresh = [p for p in fresh if all(clearly_distinct(p, dataset.params[d]) for d in duplicated_index)]
    assert the_judge.is_copy(noised(demo_dataset.render_items(fresh), NOISE), duplicated).count <= 1
    assert not the_judge.is_copy(duplicated[:1], duplicated[1:]).is_copy.any()  # the two duplicated items


def test_pixel_l2_misses_a_recoloured_copy_that_the_detector_catches(the_judge, dataset):
    original, params = duplicated_items(dataset, "star")
    recoloured = demo_dataset.render_items([demo_dataset.recolored(p, 1.0 - p.tone) for p in params])
    distance, _ = replication.nearest_items(noised(recoloured, NOISE), original)
    assert (distance > replication.REPLICA_DISTANCE).all()  # no replica in pixels ...
    assert the_judge.is_copy(noised(recoloured, NOISE), original).is_copy.all()  # ... a copy to the detector


def test_held_out_augmented_copies_are_found_and_distinct_items_are_not(the_judge):
    """Fresh items (never trained on) under the training augmentations: TPR and FPR at the threshold."""
    originals = demo_dataset.render_items(demo_dataset.held_out_params(12, seed=33))
    copies = augment(originals, torch.Generator().manual_seed(33), AugmentLevels())
    with torch.no_grad():
        matrix = the_judge.detector.descriptors(copies) @ the_judge.detector.descriptors(originals).T
    params = demo_dataset.held_out_params(12, seed=33)
    distinct = matrix[torch.tensor([[clearly_distinct(a, b) for b in params] for a in params])]
    assert float((matrix.diagonal() >= the_judge.threshold).double().mean()) >= 0.97
    assert float((distinct >= the_judge.threshold).double().mean()) <= 0.01
    assert metrics.roc_auc(matrix.diagonal(), distinct) >= 0.99


def test_the_bundled_detector_is_small_float16_and_records_its_test_numbers():
    detector = load_detector(judge.DETECTOR_PATH)
    assert judge.DETECTOR_PATH.stat().st_size < 3_000_000
    assert 0.0 < detector.threshold < 1.0
    test = detector.info["test"]
    assert test["tpr_at_1pct_fpr"] >= 0.99 and test["roc_auc"] >= 0.99


# -- class agreement ------------------------------------------------------------------------------------
def test_classifier_recognizes_held_out_items_of_every_class(the_judge):
    params = demo_dataset.held_out_params(25, seed=44)
    images = demo_dataset.render_items(params)
    labels = torch.tensor([p.class_id for p in params])
    assert the_judge.class_agreement(images, labels) >= 0.95
    for class_id in range(len(demo_dataset.CLASS_NAMES)):
        assert the_judge.class_agreement(images[labels == class_id], class_id) >= 0.85
    assert the_judge.class_agreement(images[labels == 0], "circle") <= 0.1  # stars are not circles


# -- quality --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["circle", "star", "heart"])
def test_quality_clean_items_near_the_training_set_noise_blur_and_other_classes_worse(the_judge, dataset, name):
    """Noise raises the noise figure; drift off the class (blur, another shape) raises the Fréchet distance.
    (The classifier is trained to see through noise, so its features, and the Fréchet distance, barely
    move with it: the two figures are read together.)"""
    items = dataset.images[dataset.class_items(name)][:64]
    clean = the_judge.quality(items, name)
    noisy = the_judge.quality(noised(items, NOISE), name)
    blurred = the_judge.quality(torch.nn.functional.avg_pool2d(items, 3, 1, 1, count_include_pad=False), name)
    other = the_judge.quality(dataset.images[dataset.class_items("square")][:64], name)
    assert clean.noise < 0.02 and noisy.noise == pytest.approx(NOISE, rel=0.25)
    assert blurred.frechet > 5 * max(clean.frechet, 1.0) and other.frechet > 5 * max(clean.frechet, 1.0)
    assert blurred.noise < 0.02  # blur is no noise


def test_noise_sigma_estimates_the_added_noise():
    images = demo_dataset.render_items(demo_dataset.held_out_params(2, seed=5))
    assert metrics.noise_sigma(images).max() < 0.02
    for sigma in (0.05, 0.1, 0.3):
        estimate = metrics.noise_sigma(images + sigma * torch.randn(images.shape, generator=torch.Generator()))
        assert estimate.mean() == pytest.approx(sigma, rel=0.15)


def test_frechet_distance_on_known_gaussians():
    rng = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=rng, dtype=torch.float64)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shifted = a + torch.tensor([3.0, 0.0, 4.0], dtype=torch.float64)  # same covariance, means 5 apart
    assert metrics.frechet_distance(a, shifted) == pytest.approx(25.0, rel=1e-9)
    scaled = a * 2.0  # covariance 4I vs I: tr(I + 4I - 2·2I) = 3 per unit variance
    assert metrics.frechet_distance(a, scaled) == pytest.approx(3.0 * float(a.var(dim=0).mean()), rel=0.02)


def test_roc_auc_and_threshold_at_fpr():
    assert metrics.roc_auc([0.9, 0.8], [0.1, 0.2, 0.3]) == 1.0
    assert metrics.roc_auc([0.1], [0.9]) == 0.0
    assert metrics.roc_auc([0.5, 0.5], [0.5]) == 0.5  # ties count one half
    negatives = torch.linspace(0, 1, 1001)
    threshold = metrics.threshold_at_fpr(negatives, 0.01)
    assert metrics.rate_at_threshold(negatives, threshold) <= 0.01 < metrics.rate_at_threshold(negatives, 0.989)


def test_vendi_of_copies_is_lower_than_of_distinct_items(the_judge, dataset):
    items = dataset.images[dataset.class_items("circle")][:16]
    copies = dataset.images[dataset.class_items("star", duplicated=True)][:1].expand(16, -1, -1, -1)
    distinct = metrics.vendi_score(the_judge.detector.descriptors(items).detach())
    same = metrics.vendi_score(the_judge.detector.descriptors(noised(copies, NOISE)).detach())
    assert same < 2.0 < 6.0 < distinct


# -- bad input ------------------------------------------------------------------------------------------
def test_missing_and_damaged_detector_files_are_named(tmp_path: pathlib.Path):
    missing = tmp_path / "nowhere" / "detector.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_detector(missing)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(judge.DETECTOR_PATH.read_bytes()[:500])
    with pytest.raises(CopyDetectorError, match="damaged.safetensors is damaged"):
        load_detector(damaged)
    with pytest.raises(CopyDetectorError, match="not a Shield copy-detector file"):
        load_detector(judge.CLASSIFIER_PATH)


def test_other_sizes_are_resized_with_a_note_and_keep_the_verdict(the_judge, dataset, caplog):
    original, params = duplicated_items(dataset, "moon")
    large = demo_dataset.render_items([demo_dataset.recolored(p, 0.5) for p in params])
    large = torch.nn.functional.interpolate(large, scale_factor=2, mode="nearest")  # 64x64
    with caplog.at_level(logging.INFO):
        verdict = the_judge.is_copy(large, original)
    assert verdict.is_copy.all()
    assert "resizing images of 64x64 to the detector's 32x32" in caplog.text


def test_an_empty_batch_is_refused(the_judge, dataset):
    with pytest.raises(ValueError, match="empty"):
        the_judge.is_copy(dataset.images[:0], dataset.images[:2])


# -- as an embedder ----------------------------------------------------------------------------------------
def test_embedder_is_differentiable_even_when_loaded_in_inference_mode(dataset):
    with torch.inference_mode():
        detector = load_detector(judge.DETECTOR_PATH)
    embedder = CopyDetectorEmbedder(detector, "test")
    images = demo_dataset.to_comfy_image(dataset.images[:3]).requires_grad_(True)
    embedding = embedder.embed(images)
    assert embedding.shape == (3, detector.model.config.dim) and embedder.copy_threshold == detector.threshold
    embedding[:, 0].sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with torch.no_grad():  # same numbers as the judge on [-1, 1] images
        direct = detector.descriptors(dataset.images[:3])
    assert torch.allclose(embedding.detach(), direct, atol=1e-5)


# -- graph parts in-process: the loader node and the Report's copy count ------------------------------------
def test_loader_node_gives_the_bundled_detector_and_names_a_missing_file():
    from comfyui_shield.nodes.copy_detector import BUNDLED, ShieldCopyDetectorLoader, detector_path

    (embedder,) = ShieldCopyDetectorLoader.execute(BUNDLED).result
    assert embedder.key.startswith("copy_detector/") and 0 < embedder.copy_threshold < 1
    with pytest.raises(FileNotFoundError, match=r"'nope.safetensors' is not in .*shield_copy_detectors"):
        detector_path("nope.safetensors")


def test_report_counts_copies_by_the_detector_beside_latent_l2(dataset):
    from comfyui_shield.core.report import measure_outputs, summary_text
    from comfyui_shield.nodes.copy_detector import BUNDLED, ShieldCopyDetectorLoader

    (embedder,) = ShieldCopyDetectorLoader.execute(BUNDLED).result
    shields = dataset.images[dataset.class_items("star", duplicated=True)]
    outputs = torch.cat([noised(shields, NOISE), dataset.images[dataset.class_items("star", duplicated=False)][:2]])
    with torch.no_grad():
        report = measure_outputs(
            latents=outputs,
            images=demo_dataset.to_comfy_image(outputs),
            output_embeddings=embedder.embed(demo_dataset.to_comfy_image(outputs)),
            shield_latents=shields,
            shield_names=["star_dup_0", "star_dup_1"],
            shield_embeddings=embedder.embed(demo_dataset.to_comfy_image(shields)),
            radius=replication.REPLICA_DISTANCE,
            embedder_key=embedder.key,
            copy_threshold=embedder.copy_threshold,
        )
    text = summary_text(report)
    assert report.copies().tolist() == [True, True, False, False]
    assert f"copies by the copy detector (similarity >= {embedder.copy_threshold:.4g}, {embedder.key}): 2/4" in text
    assert "output 0: nearest shield 'star_dup_0'" in text and text.count(" COPY") == 2
    assert "latent L2 (not a copy test: noise and colour move it) inside the radius r=6: 0/4" in text


def test_training_is_reproducible_from_the_seed(dataset):
    """scripts/train_judge.py: the same seed gives the same detector (a few steps on a small pool)."""
    import argparse
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "train_judge.py"
    spec = importlib.util.spec_from_file_location("train_judge", path)
    train_judge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_judge)
    images, labels = train_judge.training_pool(dataset, seed=3, fresh_per_class=4)
    args = argparse.Namespace(seed=3, detector_steps=3, batch_size=16, lr=2e-3, temperature=0.1)
    first, second = (train_judge.train_detector(images, labels, args) for _ in range(2))
    assert all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )
    args.seed = 4
    third = train_judge.train_detector(images, labels, args)
    assert not torch.equal(first.head.weight, third.head.weight)
    pooled = DetectorConfig(width=4, dim=8, architecture="pooled", activation="relu")  # the second detector's kind
    fourth, fifth = (train_judge.train_detector(images, labels, args, pooled) for _ in range(2))
    assert fourth.config == pooled and torch.equal(fourth.head.weight, fifth.head.weight)


def test_summarize_copies_counts_by_the_detector_with_pixel_l2_beside(the_judge, dataset):
    """The demo's and benches' summary: a noised duplicated star is a copy (of a duplicated item) that
    pixel L2 misses; a training item itself is a copy in both columns."""
    duplicated = dataset.class_items("star", duplicated=True)
    unique = dataset.class_items("star", duplicated=False)[:1]
    samples = torch.cat([noised(dataset.images[duplicated], NOISE), dataset.images[unique]])
    summary = replication.summarize_copies(samples, dataset.images, dataset.duplicated, the_judge)
    assert (summary.copies, summary.copies_of_duplicated, summary.pixels.replicas) == (3, 2, 1)
    assert summary.as_dict()["copy_share"] == 1.0 and summary.as_dict()["pixel_l2_replicas"] == 1
    assert list(summary.copy_index) == [*duplicated.tolist(), int(unique[0])]


# -- the second copy detector: judging only, another architecture and seed ------------------------------------
@pytest.fixture(scope="module")
def second_detector():
    return load_detector(judge.SECOND_DETECTOR_PATH, "second detector")


def test_the_second_detector_is_another_small_network_with_its_training_recorded(the_judge, second_detector):
    first = the_judge.detector
    assert the_judge.second_detector.path == str(judge.SECOND_DETECTOR_PATH)
    assert second_detector.model.config.architecture != first.model.config.architecture
    layout = {name: tuple(t.shape) for name, t in second_detector.model.state_dict().items()}
    assert layout != {name: tuple(t.shape) for name, t in first.model.state_dict().items()}
    assert layout["features.0.weight"] == (16, 3, 5, 5) and layout["head.weight"][0] == 96  # 5×5 stem, 96-d
    assert any(isinstance(m, torch.nn.MaxPool2d) for m in second_detector.model.modules())
    assert judge.SECOND_DETECTOR_PATH.stat().st_size < 1_000_000
    info = second_detector.info
    assert info["seed"] != first.info["seed"] and info["detector_only"] and info["config"]["architecture"] == "pooled"
    assert info["test"]["tpr_at_1pct_fpr"] >= 0.99 and info["test"]["roc_auc"] >= 0.99
    assert 0.0 < second_detector.threshold < 1.0


def test_the_second_detector_flags_held_out_augmented_copies_and_not_distinct_items(the_judge):
    """Fresh items (neither detector trained on them; another seed than the first detector's test above)."""
    params = demo_dataset.held_out_params(12, seed=34)
    originals = demo_dataset.render_items(params)
    copies = augment(originals, torch.Generator().manual_seed(34), AugmentLevels())
    nearest = the_judge.is_copy_second(copies, originals).nearest.tolist()
    # each copy's best match is its original, or another draw that is the same picture up to colour
    assert all(i == j or not clearly_distinct(params[i], params[j]) for i, j in enumerate(nearest))
    detector = the_judge.second_detector
    with torch.no_grad():
        matrix = detector.descriptors(copies) @ detector.descriptors(originals).T
    distinct = matrix[torch.tensor([[clearly_distinct(a, b) for b in params] for a in params])]
    assert float((matrix.diagonal() >= detector.threshold).double().mean()) >= 0.97
    assert float((distinct >= detector.threshold).double().mean()) <= 0.01
    assert metrics.roc_auc(matrix.diagonal(), distinct) >= 0.99


@pytest.mark.parametrize("name", ["star", "moon"])
def test_the_second_detector_agrees_on_the_issue_examples(the_judge, dataset, name):
    """Recoloured, noised and greyed duplicated items are copies; the class's other items are not."""
    originals, params = duplicated_items(dataset, name)
    recoloured = demo_dataset.render_items([demo_dataset.recolored(p, 1.0 - p.tone) for p in params])
    grey = originals.mean(dim=1, keepdim=True).expand_as(originals)
    for changed in (recoloured, noised(originals, NOISE), grey):
        assert the_judge.is_copy_second(changed, originals).is_copy.all()
    duplicated_index = dataset.class_items(name, duplicated=True).tolist()
    unique = [
        int(i)
        for i in dataset.class_items(name, duplicated=False)
        if all(clearly_distinct(dataset.params[int(i)], dataset.params[d]) for d in duplicated_index)
    ]
    assert the_judge.is_copy_second(dataset.images[unique], originals).share <= 0.02


def test_the_second_detector_loads_only_through_the_safe_path_and_names_bad_files(tmp_path: pathlib.Path):
    import json

    import safetensors
    import safetensors.torch

    damaged = tmp_path / "second.safetensors"
    damaged.write_bytes(judge.SECOND_DETECTOR_PATH.read_bytes()[:700])
    with pytest.raises(CopyDetectorError, match="second.safetensors is damaged"):
        judge.load_judge(second_detector_path=str(damaged))
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        judge.load_judge(second_detector_path=str(tmp_path / "missing.safetensors"))
    with safetensors.safe_open(str(judge.SECOND_DETECTOR_PATH), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors = safetensors.torch.load_file(str(judge.SECOND_DETECTOR_PATH))
    for field, wrong, message in (("architecture", "strided", "does not match its weights"),
                                  ("activation", "tanh", "activation one of")):  # fmt: skip
        config = {**json.loads(metadata["config"]), field: wrong}
        relabelled = tmp_path / f"relabelled_{field}.safetensors"
        safetensors.torch.save_file(tensors, str(relabelled), metadata={**metadata, "config": json.dumps(config)})
        with pytest.raises(CopyDetectorError, match=rf"relabelled_{field}.safetensors does not hold .*{message}"):
            load_detector(relabelled)


def test_the_second_detector_is_no_embedder_choice():
    """Judging only: the Copy Detector Loader (ProCreate's and embedding SPELL's embedder) never offers it."""
    from comfyui_shield.nodes.copy_detector import BUNDLED, detector_choices, detector_path

    assert judge.SECOND_DETECTOR_PATH.name not in detector_choices()
    assert detector_path(BUNDLED) == judge.DETECTOR_PATH != judge.SECOND_DETECTOR_PATH
