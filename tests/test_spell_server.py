"""Sparse Repellency nodes in a real ComfyUI server graph, with the memorizer model node."""

import pytest
import torch

from comfyui_shield.reference_models.memorizer import minimum_item_spacing
from harness.memorizer_graphs import sparse_repellency
from harness.server import ServerError

RADIUS = 4.0


def _write_items(server, items):
    server.write_input_latent("shield_items", items)


def _saved_latent(server, outputs, node_id):
    return server.saved_latent(outputs, node_id)


def _graph(shield_source: dict, prefix: str) -> dict:
    sampler = {
        "seed": 3,
        "steps": 8,
        "cfg": 1.0,
        "sampler_name": "dpmpp_2m",
        "scheduler": "karras",
        "denoise": 1.0,
        "positive": ["2", 1],
        "negative": ["2", 1],
        "latent_image": ["5", 0],
    }
    return {
        "1": {"class_type": "LoadLatent", "inputs": {"latent": "shield_items.latent"}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": shield_source,
        "4": sparse_repellency(["2", 0], ["3", 0], RADIUS),
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["4", 0], **sampler}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}/shielded"}},
        "8": {"class_type": "KSampler", "inputs": {"model": ["2", 0], **sampler}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"{prefix}/plain"}},
    }


def test_graph_with_shield_nodes_keeps_outputs_out_of_the_shields(server, memorizer_items):
    assert minimum_item_spacing(memorizer_items) > 2.6 * RADIUS
    _write_items(server, memorizer_items)
    from_latents = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["1", 0], "model": ["2", 0]}}
    graph = _graph(from_latents, "spell_a")
    graph["10"] = {
        "class_type": "ShieldSaveShieldSet",
        "inputs": {"shield_set": ["3", 0], "filename": "server_set", "overwrite": True},
    }
    outputs = server.run(graph)
    items = memorizer_items.flatten(1).double()
    plain = _saved_latent(server, outputs, "9").flatten(1).double()
    shielded = _saved_latent(server, outputs, "7").flatten(1).double()
    assert float(torch.cdist(plain, items).min(dim=1).values.max()) < 1e-3  # the memorizer copies its items
    assert float(torch.cdist(shielded, items).min()) >= RADIUS - 1e-3
    assert (server.base_dir / "models" / "shield_sets" / "server_set.safetensors").is_file()

    loaded = {"class_type": "ShieldLoadShieldSet", "inputs": {"filename": "server_set.safetensors"}}
    again = _saved_latent(server, server.run(_graph(loaded, "spell_b")), "7").flatten(1).double()
    assert torch.equal(again, shielded)  # the saved set shields exactly like the original


def test_bad_shield_file_name_is_refused_before_running(server):
    info = server.object_info()
    assert "ShieldSparseRepellency" in info and "ShieldMemory" in info
    graph = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["1", 0], "prediction": "eps"}},
        "3": {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["1", 0], "model": ["2", 0]}},
        "4": {
            "class_type": "ShieldSaveShieldSet",
            "inputs": {"shield_set": ["3", 0], "filename": "../escape", "overwrite": True},
        },
    }
    with pytest.raises(ServerError, match="outside"):
        server.post("/prompt", {"prompt": graph, "client_id": "t"})
