"""Early Copy Redraw in a real ComfyUI server graph: the memorizer (which copies its prompted items), the stock
pixel_space VAE, the Pixel Embedder, and the Shield Report reading the run."""

import pytest
import torch

from harness.memorizer_graphs import embedding_space_method, memorizer_sampler
from harness.procreate_parts import pixel_cosine, rgb_items
from harness.server import ServerError

SAMPLER = memorizer_sampler(seed=5, steps=8)


def graph(shield_first: int, shield_count: int, **settings) -> dict:
    """Prompt items 0-3 (the memorizer copies them); shields = items [first, first + count)."""
    inputs = {
        "similarity": 0.7,
        "check_percent": 0.3,
        "max_attempts": 16,
    }
    node = {"class_type": "ShieldEarlyCopyRedraw", "inputs": {**inputs, **settings}}
    return embedding_space_method(node, "redraw_items.latent", shield_first, shield_count, SAMPLER, "rd")


def nearest(latents: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    return pixel_cosine(latents, items).max(dim=1).values


@pytest.fixture
def items(server):
    items = rgb_items(6)
    server.write_input_latent("redraw_items", items)
    return items


def test_copies_of_shields_are_redrawn_as_other_prompted_items(server, items):
    outputs = server.run(graph(0, 2), timeout=600)
    plain = server.saved_latent(outputs, "save_plain")
    shielded = server.saved_latent(outputs, "save_shielded")
    assert (nearest(plain, items[:2]) > 0.99).any()  # plain sampling copies a protected item
    assert (nearest(shielded, items[:2]) < 0.99).all()  # no output is a protected item
    assert (nearest(shielded, items[2:4]) > 0.99).all()  # each is another prompted item, drawn clean
    text = "".join(outputs["report"]["text"])
    assert "Early Copy Redraw (run #" in text and "2 shields" in text, text


def test_no_copy_of_a_shield_leaves_sampling_bit_identical(server, items):
    outputs = server.run(graph(4, 2), timeout=600)  # the prompt never draws items 4 and 5
    assert torch.equal(server.saved_latent(outputs, "save_shielded"), server.saved_latent(outputs, "save_plain"))


@pytest.mark.parametrize(
    "name, value",
    [("similarity", float("nan")), ("check_percent", 1.0), ("check_percent", 0.0), ("max_attempts", 0),
     ("max_attempts", 10**6)],
)  # fmt: skip
def test_out_of_range_settings_are_refused_by_name(server, items, name, value):
    refused = graph(0, 2, **{name: value})
    del refused["plain"], refused["save_plain"]
    with pytest.raises(ServerError, match=name):
        server.run(refused)
