"""The demo dataset is deterministic, in the pixel_space VAE's range, and duplicates what it says."""

import random

import pytest
import torch

from comfyui_shield.reference_models import demo_dataset


@pytest.fixture(scope="module")
def dataset() -> demo_dataset.DemoDataset:
    return demo_dataset.build_dataset()


def test_dataset_is_deterministic_and_in_range(dataset):
    again = demo_dataset.build_dataset()
    assert torch.equal(dataset.images, again.images) and dataset.params == again.params
    size = demo_dataset.IMAGE_SIZE
    assert dataset.images.shape[1:] == (3, size, size)
    assert dataset.images.min() >= -1.0 and dataset.images.max() <= 1.0


def test_a_different_seed_gives_different_items():
    first, second = demo_dataset.class_params(0, seed=1)[0], demo_dataset.class_params(0, seed=2)[0]
    assert not torch.equal(demo_dataset.render_items(first[:4]), demo_dataset.render_items(second[:4]))


def test_every_class_gets_the_same_share_of_the_stream_and_duplicates_are_expanded(dataset):
    indices, labels = dataset.training_stream()
    assert torch.equal(torch.bincount(indices, minlength=len(dataset.labels)), dataset.copies)
    assert torch.equal(labels, dataset.labels[indices])
    per_class = torch.bincount(labels, minlength=len(demo_dataset.CLASS_NAMES))
    assert (per_class == demo_dataset.STREAM_PER_CLASS).all()


@pytest.mark.parametrize("name", demo_dataset.CLASS_NAMES)
def test_each_kind_of_class_holds_what_it_says(dataset, name):
    duplicated = dataset.class_items(name, duplicated=True)
    unique = dataset.class_items(name, duplicated=False)
    kind = demo_dataset.class_kind(name)
    if kind == "memorizable":
        assert len(duplicated) == demo_dataset.DUPLICATED_PER_CLASS
        assert len(unique) == demo_dataset.UNIQUE_PER_CLASS
        assert (dataset.copies[duplicated] == demo_dataset.DUPLICATE_COPIES).all()
        share = dataset.copies[duplicated].sum() / demo_dataset.STREAM_PER_CLASS
        assert 0.3 < share < 0.7  # often enough to be copied, rarely enough to leave a class to learn
        assert len(unique) >= 150  # many unique items: memorization by duplication inside a varied class
    elif kind == "control":
        assert len(duplicated) == 0 and len(unique) == demo_dataset.STREAM_PER_CLASS
    else:
        assert len(duplicated) == demo_dataset.FEW_SHOT_ITEMS and len(unique) == 0
    assert demo_dataset.has_duplicates(name) == (kind != "control")


def test_duplicated_items_are_distinct_in_geometry_from_each_other_and_from_their_class(dataset):
    """A duplicated item must not also sit in the class as a 'unique' item: its nearest other item of the
    class is as far in pixels as typical items are from theirs."""
    images = dataset.images.flatten(1)
    for name in demo_dataset.MEMORIZABLE_CLASSES:
        items = dataset.class_items(name)
        distances = torch.cdist(images[items], images[items]).fill_diagonal_(float("inf"))
        nearest = distances.min(dim=1).values
        assert nearest[: demo_dataset.DUPLICATED_PER_CLASS].min() > 0.5 * nearest.median(), name


def test_render_draws_one_shape_in_its_tone_on_the_background():
    rng = random.Random(3)
    for class_id in range(len(demo_dataset.CLASS_NAMES)):
        params = demo_dataset.random_params(class_id, rng)
        pixels = torch.tensor(list(demo_dataset.render(params).getdata()), dtype=torch.float)
        background = (pixels - torch.tensor(demo_dataset.BACKGROUND)).abs().amax(dim=1) < 2
        foreground = (pixels - torch.tensor(demo_dataset.tone_color(params.tone))).abs().amax(dim=1) < 2
        assert 0.02 < foreground.float().mean() < 0.5, demo_dataset.CLASS_NAMES[class_id]
        assert (background | foreground).float().mean() > 0.7  # the rest is antialiased edge


def test_recoloured_item_keeps_its_geometry():
    params = demo_dataset.random_params(demo_dataset.class_index("star"), random.Random(0))
    other = demo_dataset.recolored(params, 1.0 - params.tone)
    background = torch.tensor(demo_dataset.BACKGROUND, dtype=torch.float).reshape(3, 1, 1)

    def coverage(p):  # how much of each pixel the shape covers, from its colour
        pixels = (demo_dataset.render_items([p])[0] + 1.0) * 127.5
        color = torch.tensor(demo_dataset.tone_color(p.tone), dtype=torch.float).reshape(3, 1, 1) - background
        return ((pixels - background) * color).sum(dim=0) / color.pow(2).sum()

    first, second = coverage(params), coverage(other)
    assert 0.02 < (first > 0.5).float().mean() < 0.5
    assert (first - second).abs().max() < 0.05 and abs(other.tone - params.tone) > 0.1
    assert not torch.equal(*demo_dataset.render_items([params, other]))


def test_held_out_items_are_fresh_draws(dataset):
    held_out = demo_dataset.held_out_params(4, seed=7)
    assert len(held_out) == 4 * len(demo_dataset.CLASS_NAMES)
    assert not set(held_out) & set(dataset.params)
    with pytest.raises(ValueError, match="DEFAULT_SEED"):
        demo_dataset.held_out_params(4, seed=demo_dataset.DEFAULT_SEED)


def test_comfy_image_round_trip(dataset):
    images = dataset.images[:8]
    comfy = demo_dataset.to_comfy_image(images)
    assert comfy.shape[-1] == 3 and comfy.min() >= 0 and comfy.max() <= 1
    assert torch.allclose(demo_dataset.from_comfy_image(comfy), images, atol=1e-6)


def test_tone_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="tone"):
        demo_dataset.tone_color(1.5)


def test_class_index_names_the_choices_on_error():
    assert demo_dataset.class_index("star") == demo_dataset.CLASS_NAMES.index("star")
    with pytest.raises(ValueError, match="circle"):
        demo_dataset.class_index("dragon")
    with pytest.raises(ValueError, match="class id"):
        demo_dataset.class_index(len(demo_dataset.CLASS_NAMES))
