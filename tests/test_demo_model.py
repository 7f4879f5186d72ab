"""The bundled demo model loads through ComfyUI, in-process and in a server graph, and memorizes."""

import nodes
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
    assert all(name.startswith("star_") and name.endswith("_dup") for name in names.splitlines())
    everything, _ = select_training_items(cached_dataset(), "all", CLASS_FILTER_ALL)
    assert len(everything) == len(cached_dataset().labels)


def test_replication_is_measured_on_real_samples_of_the_loaded_model():
    """Samples of every class at 8 steps through ComfyUI's sampler, measured against the training set:
    exact training items count as copies, the model's samples land in the data range and are scored.
    (The bundled weights do not yet reproduce training items: see docs/demo.md.)"""
    model = ShieldDemoModelLoader.execute().args[0]
    dataset = cached_dataset()
    samples = torch.cat([sample(model, name, 2, seed=7 + i) for i, name in enumerate(demo_dataset.CLASS_NAMES)])
    assert samples.abs().max() < 2.0 and torch.isfinite(samples).all()
    summary = replication.summarize_replication(samples, dataset.images, dataset.duplicated)
    assert summary.samples == len(samples) and summary.median_distance > 0
    copies = replication.summarize_replication(dataset.images[dataset.duplicated], dataset.images, dataset.duplicated)
    assert copies.share == 1.0 and copies.replicas_of_duplicated == int(dataset.duplicated.sum())


def test_class_conditioning_changes_the_samples():
    model = ShieldDemoModelLoader.execute().args[0]
    star, ring = sample(model, "star", 2, seed=11, steps=6), sample(model, "ring", 2, seed=11, steps=6)
    assert (star - ring).abs().mean() > 0.01


def test_sampling_is_deterministic_per_seed():
    model = ShieldDemoModelLoader.execute().args[0]
    first, second = sample(model, "digit", 2, seed=3, steps=3), sample(model, "digit", 2, seed=3, steps=3)
    assert torch.equal(first, second)
    assert not torch.equal(first, sample(model, "digit", 2, seed=4, steps=3))


def demo_api_graph(class_name: str = "star", batch: int = 2, steps: int = 6) -> dict:
    return {
        "model": {"class_type": "ShieldDemoModelLoader", "inputs": {}},
        "cond": {"class_type": "ShieldDemoConditioning", "inputs": {"class_name": class_name}},
        "latent": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["model", 0], "positive": ["cond", 0], "negative": ["cond", 1], "latent_image": ["latent", 0],
            "seed": 5, "steps": steps, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
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
