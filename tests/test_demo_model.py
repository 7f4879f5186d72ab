"""The bundled demo model loads through ComfyUI, in-process and in a server graph, and memorizes."""

import nodes
import pytest
import torch

from comfyui_shield.nodes.demo_model import (
    CLASS_FILTER_ALL,
    ShieldDemoConditioning,
    ShieldDemoModelLoader,
    ShieldDemoTrainingSet,
    cached_dataset,
    select_training_items,
)
from comfyui_shield.reference_models import demo_dataset, pixel_unet, replication

SIZE = demo_dataset.IMAGE_SIZE
MIN_TEST_COPIES = 16  # of 32 (50 %; 90 % on average at 20 steps over 256 samples: docs/demo_model.md)


def sample(model, class_name: str, count: int, seed: int, steps: int = 8, cfg: float = 3.0) -> torch.Tensor:
    positive, negative = ShieldDemoConditioning.execute(class_name).args
    latent = {"samples": torch.zeros(count, 3, SIZE, SIZE)}
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def test_weights_are_small_and_describe_their_training():
    assert pixel_unet.WEIGHTS_PATH.stat().st_size < 5_000_000
    metadata = pixel_unet.read_metadata()
    assert "seed" in metadata["training"] and "steps" in metadata["training"]


def test_conditioning_is_one_hot_and_the_negative_is_the_null_class():
    positive, negative = ShieldDemoConditioning.execute("ring").args
    token = positive[0][0]
    assert token.shape == (1, 1, pixel_unet.CONTEXT_DIM)
    assert token[0, 0].argmax() == demo_dataset.CLASS_NAMES.index("ring") and token.sum() == 1
    assert negative[0][0].abs().sum() == 0


def test_training_set_node_selects_items_by_duplication_and_class():
    images, names = ShieldDemoTrainingSet.execute("duplicated", "star").args
    assert images.shape == (demo_dataset.DUPLICATED_PER_CLASS, SIZE, SIZE, 3)
    few_shot, _ = ShieldDemoTrainingSet.execute("duplicated", "heart").args
    assert few_shot.shape == (demo_dataset.FEW_SHOT_ITEMS, SIZE, SIZE, 3)
    assert all(name.startswith("star_") and name.endswith("_dup") for name in names.splitlines())
    everything, _ = select_training_items(cached_dataset(), "all", CLASS_FILTER_ALL)
    assert len(everything) == len(cached_dataset().labels)
    unique, _ = ShieldDemoTrainingSet.execute("unique", "circle").args
    assert unique.shape == (demo_dataset.STREAM_PER_CLASS, SIZE, SIZE, 3)


def test_training_set_node_names_the_inputs_when_a_class_has_no_such_items():
    with pytest.raises(ValueError, match="no duplicated items.*class_name"):
        ShieldDemoTrainingSet.execute("duplicated", "circle")
    with pytest.raises(ValueError, match="no unique items.*class_name"):
        ShieldDemoTrainingSet.execute("unique", "heart")


def test_the_bundled_model_draws_the_prompted_class():
    """Most few-shot samples land nearest to the few-shot items (of 2508 items of 8 classes) and the
    control-class samples are clean circles: nearest to training circles and classified as circles. A
    control sample may lie within pixel L2 6 of some training circle (576 of them cover the class
    densely: 12 % of 64 samples do, docs/demo_model.md), so that is not asserted."""
    from comfyui_shield.reference_models.judge import load_judge

    model = ShieldDemoModelLoader.execute().args[0]
    dataset = cached_dataset()
    heart = sample(model, "heart", 4, seed=21, steps=10)
    _, index = replication.nearest_items(heart, dataset.images)
    assert (dataset.labels[index] == demo_dataset.class_index("heart")).sum() >= 3
    circle = sample(model, "circle", 4, seed=21, steps=10)
    assert torch.isfinite(circle).all() and circle.abs().max() < 2.0
    _, index = replication.nearest_items(circle, dataset.images)
    assert (dataset.labels[index] == demo_dataset.class_index("circle")).sum() >= 3
    assert load_judge().class_agreement(circle, "circle") >= 0.75


def test_plain_sampling_copies_the_duplicated_items_of_memorizable_classes_and_draws_the_class_otherwise():
    """The memorization the shield's methods remove (docs/demo_model.md: 64 samples per class at 20 steps):
    on a reduced sample (4 memorizable classes × 8 samples, 10 euler steps, cfg 3) a large share of plain
    samples copy one of their class's two duplicated items by the copy detector, and the others are
    still recognised as the prompted class by the independent classifier."""
    from comfyui_shield.reference_models.judge import load_judge

    model, dataset, judge = ShieldDemoModelLoader.execute().args[0], cached_dataset(), load_judge()
    copies, others_on_class, others = 0, 0, 0
    for name in demo_dataset.MEMORIZABLE_CLASSES:
        images = sample(model, name, 8, seed=31, steps=10)
        verdict = judge.is_copy(images, dataset.images[dataset.class_items(name, duplicated=True)])
        copies += verdict.count
        rest = images[~verdict.is_copy]
        if len(rest):
            others += len(rest)
            others_on_class += round(judge.class_agreement(rest, name) * len(rest))
    assert copies >= MIN_TEST_COPIES, copies
    assert others > 0 and others_on_class >= 0.75 * others, (others_on_class, others)


def test_class_conditioning_changes_the_samples():
    model = ShieldDemoModelLoader.execute().args[0]
    star, ring = sample(model, "star", 2, seed=11, steps=6), sample(model, "ring", 2, seed=11, steps=6)
    assert (star - ring).abs().mean() > 0.01


def test_sampling_is_deterministic_per_seed():
    model = ShieldDemoModelLoader.execute().args[0]
    first, second = sample(model, "circle", 2, seed=3, steps=3), sample(model, "circle", 2, seed=3, steps=3)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(model, "circle", 2, seed=4, steps=3))


def demo_api_graph(class_name: str = "star", batch: int = 2, steps: int = 6) -> dict:
    return {
        "model": {"class_type": "ShieldDemoModelLoader", "inputs": {}},
        "cond": {"class_type": "ShieldDemoConditioning", "inputs": {"class_name": class_name}},
        "latent": {
            "class_type": "EmptyChromaRadianceLatentImage",
            "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch},
        },
        "sampler": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["model", 0],
                "positive": ["cond", 0],
                "negative": ["cond", 1],
                "latent_image": ["latent", 0],
                "seed": 5,
                "steps": steps,
                "cfg": 3.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "shield_demo_test"}},
    }


def test_demo_graph_runs_on_the_server_with_the_pixel_space_vae(server):
    from PIL import Image

    outputs = server.run(demo_api_graph())
    images = outputs["save"]["images"]
    assert len(images) == 2
    for info in images:
        with Image.open(server.output_path(info)) as image:
            assert image.size == (SIZE, SIZE)
            pixels = demo_dataset.pil_to_tensor(image.convert("RGB"))
            assert pixels.std() > 0.05  # a picture, not a flat or NaN-black square


def test_comfyui_feeds_the_model_the_position_channels_it_was_trained_with():
    """The sampler's path (extra_conds → c_concat → apply_model) gives the network the same input as the
    training script's `with_positions`, so the trained weights see at sampling what they learned on."""
    patcher = ShieldDemoModelLoader.execute().args[0]
    model = patcher.model
    noise = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    context = pixel_unet.class_context([demo_dataset.class_index("star"), -1])
    conds = model.extra_conds(noise=noise, cross_attn=context, device=torch.device("cpu"))
    concat = conds["c_concat"].cond
    assert torch.equal(concat, pixel_unet.position_channels(SIZE, SIZE).expand(2, -1, -1, -1))
    sigma = torch.full((2,), 1.5)
    noisy = noise * 1.5
    with torch.inference_mode():
        through_comfy = model.apply_model(noisy, sigma, c_concat=concat, c_crossattn=context, y=conds["y"].cond)
        output = model.diffusion_model(
            pixel_unet.with_positions(model.model_sampling.calculate_input(sigma, noisy)),
            model.model_sampling.timestep(sigma).float(),
            context=context,
            y=pixel_unet.class_vector(context),
        )
        direct = model.model_sampling.calculate_denoised(sigma, output, noisy)
    assert torch.allclose(through_comfy, direct, atol=1e-5)
