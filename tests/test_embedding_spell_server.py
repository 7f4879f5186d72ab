"""Sparse Repellency in an embedding space, in a real ComfyUI server graph: the memorizer (which copies its
prompted items), the stock pixel_space VAE, the Pixel Embedder, and the Shield Report reading the run."""

import re

import pytest
import torch

from harness.memorizer_graphs import embedding_space_method, memorizer_sampler
from harness.procreate_parts import pixel_cosine, rgb_items
from harness.server import ServerError

SIMILARITY = 0.9
SAMPLER = memorizer_sampler(seed=5, steps=6)


def graph(shield_first: int, shield_count: int, **settings) -> dict:
    """Prompt items 0-3 (the memorizer copies them); shields = items [first, first + count)."""
    inputs = {
        "similarity": SIMILARITY,
        "overcompensation": 1.6,
        "intra_batch": False,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "iterations": 3,
    }
    node = {"class_type": "ShieldEmbeddingRepellency", "inputs": {**inputs, **settings}}
    return embedding_space_method(node, "embedding_spell_items.latent", shield_first, shield_count, SAMPLER, "es")


@pytest.fixture
def items(server):
    items = rgb_items(6)
    server.write_input_latent("embedding_spell_items", items)
    return items


def test_outputs_inside_a_shield_are_pushed_out_of_it_in_the_embedding_space(server, items):
    outputs = server.run(graph(0, 4), timeout=600)
    plain = server.saved_latent(outputs, "save_plain")
    shielded = server.saved_latent(outputs, "save_shielded")
    assert pixel_cosine(plain, items[:4]).max(dim=1).values.min() > 0.99  # the memorizer copies items 0-3
    nearest = pixel_cosine(shielded, items[:4]).max(dim=1).values
    assert (nearest <= SIMILARITY).all(), nearest  # out of every shield's ball, by the embedder's measure
    assert torch.isfinite(shielded).all() and shielded.abs().mean() < 1.0  # moved, not blown out of range (items: 0.5)
    text = "".join(outputs["report"]["text"])
    assert re.search(r"Sparse Repellency \(embedding space\) \(run #\d+, pixels/16\): \d+ steps recorded", text), text
    assert "samples touched: [0, 1, 2, 3]" in text, text


def test_nothing_inside_any_ball_leaves_sampling_bit_identical(server, items):
    outputs = server.run(graph(4, 2), timeout=600)  # shields: items 4 and 5, which the prompt never draws
    plain = server.saved_latent(outputs, "save_plain")
    shielded = server.saved_latent(outputs, "save_shielded")
    assert pixel_cosine(plain, items[4:]).max() < SIMILARITY
    assert torch.equal(shielded, plain)
    text = "".join(outputs["report"]["text"])
    assert re.search(r"Sparse Repellency \(embedding space\).*\n  touched 0 step-samples", text), text


def test_a_window_that_ends_before_it_starts_is_refused(server, items):
    refused = graph(0, 4, start_percent=0.8, end_percent=0.2)
    del refused["plain"], refused["save_plain"]  # the plain branch alone would validate and run
    with pytest.raises(ServerError, match=r"start_percent \(0.8\) must not exceed end_percent \(0.2\)"):
        server.run(refused)
