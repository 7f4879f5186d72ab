"""The demo dataset is deterministic, in the pixel_space VAE's range, and duplicates what it says."""

import torch

from comfyui_shield.reference_models import demo_dataset


def test_dataset_is_deterministic_and_in_range():
    first, second = demo_dataset.build_dataset(unique_per_class=4), demo_dataset.build_dataset(unique_per_class=4)
    assert torch.equal(first.images, second.images)
    size = demo_dataset.IMAGE_SIZE
    memorized = len(demo_dataset.MEMORIZED_CLASSES)
    count = memorized * demo_dataset.DUPLICATED_PER_CLASS + (len(demo_dataset.CLASS_NAMES) - memorized) * 4
    assert first.images.shape == (count, 3, size, size)
    assert first.images.min() >= -1.0 and first.images.max() <= 1.0


def test_a_different_seed_gives_different_items():
    first = demo_dataset.build_dataset(seed=1, unique_per_class=2)
    second = demo_dataset.build_dataset(seed=2, unique_per_class=2)
    assert not torch.equal(first.images, second.images)


def test_every_item_is_distinct_and_duplicates_are_expanded_in_the_stream():
    dataset = demo_dataset.build_dataset(unique_per_class=8)
    distances = torch.cdist(dataset.images.flatten(1), dataset.images.flatten(1))
    distances.fill_diagonal_(float("inf"))
    assert distances.min() > 1.0
    indices, labels = dataset.training_stream()
    per_item = torch.bincount(indices, minlength=len(dataset.labels))
    assert torch.equal(per_item, dataset.copies)
    assert int(dataset.duplicated.sum()) == demo_dataset.DUPLICATED_PER_CLASS * len(demo_dataset.MEMORIZED_CLASSES)
    memorized_labels = [demo_dataset.CLASS_NAMES.index(name) for name in demo_dataset.MEMORIZED_CLASSES]
    assert torch.equal(dataset.duplicated, torch.isin(dataset.labels, torch.tensor(memorized_labels)))
    assert torch.equal(labels, dataset.labels[indices])


def test_comfy_image_round_trip():
    images = demo_dataset.build_dataset(unique_per_class=1).images
    comfy = demo_dataset.to_comfy_image(images)
    assert comfy.shape[-1] == 3 and comfy.min() >= 0 and comfy.max() <= 1
    assert torch.allclose(demo_dataset.from_comfy_image(comfy), images, atol=1e-6)


def test_class_index_names_the_choices_on_error():
    assert demo_dataset.class_index("star") == demo_dataset.CLASS_NAMES.index("star")
    try:
        demo_dataset.class_index("dragon")
    except ValueError as error:
        assert "circle" in str(error)
    else:
        raise AssertionError("an unknown class name must raise")
