"""ProCreate in a real ComfyUI server graph: random-weight DreamSim files in the server's models/dreamsim,
the stock pixel_space VAE, the memorizer as MODEL, and the Shield Report reading the run's record."""

import re
import uuid

import torch

from harness.memorizer_graphs import memorizer_sampler
from harness.procreate_parts import rgb_items, write_random_dreamsim

SAMPLER = memorizer_sampler(seed=3, steps=4)


def procreate_graph() -> dict:
    return {
        "items": {"class_type": "LoadLatent", "inputs": {"latent": "procreate_items.latent"}},
        "model": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}},
        "positive": {
            "class_type": "ShieldMemorizerConditioning",
            "inputs": {"subset": "0,1,2,3", "n_items": ["model", 2]},
        },
        "negative": {"class_type": "ShieldMemorizerConditioning", "inputs": {"subset": "", "n_items": ["model", 2]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "protected": {
            "class_type": "LatentFromBatch",
            "inputs": {"samples": ["items", 0], "batch_index": 0, "length": 3},
        },
        "images": {"class_type": "VAEDecode", "inputs": {"samples": ["protected", 0], "vae": ["vae", 0]}},
        "embedder": {"class_type": "ShieldDreamSimLoader", "inputs": {"variant": "open_clip_vitb32"}},
        "references": {
            "class_type": "ShieldReferenceSetFromImages",
            "inputs": {"images": ["images", 0], "vae": ["vae", 0], "embedder": ["embedder", 0], "model": ["model", 0]},
        },
        "procreate": {
            "class_type": "ShieldProCreateGuidance",
            "inputs": {
                "model": ["model", 0],
                "vae": ["vae", 0],
                "embedder": ["embedder", 0],
                "reference_set": ["references", 0],
                "strength": 100.0,
                "element_clip": 1.0,
                "max_grad_norm": 0.5,
                "look_ahead_steps": 0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "gradient_mode": "exact",
                "similarity_threshold": -1.0,
                "intra_batch": False,
            },
        },
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 2}},
        "guided": {"class_type": "KSampler", "inputs": {"model": ["procreate", 0], **SAMPLER}},
        "plain": {"class_type": "KSampler", "inputs": {"model": ["model", 0], **SAMPLER}},
        "save_guided": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["guided", 0], "filename_prefix": "procreate/guided"},
        },
        "save_plain": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["plain", 0], "filename_prefix": "procreate/plain"},
        },
        "report": {
            "class_type": "ShieldReport",
            "inputs": {
                "latent": ["guided", 0],
                "radius": 0.0,
                "similarity_threshold": 0.0,
                "include_run_records": True,
            },
        },
    }


def test_procreate_with_real_dreamsim_runs_in_a_server_graph(server):
    write_random_dreamsim(server.base_dir / "models" / "dreamsim")
    server.write_input_latent("procreate_items", rgb_items(6))
    outputs = server.run(procreate_graph(), timeout=600)
    guided = server.saved_latent(outputs, "save_guided")
    plain = server.saved_latent(outputs, "save_plain")
    assert guided.shape == plain.shape == (2, 3, 16, 16)
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
    text = "".join(outputs["report"]["text"])
    assert re.search(r"ProCreate \(run #\d+, dreamsim/open_clip_vitb32/\w+\): 4 steps recorded", text), text
    # a sample counts as guided only when its gradient through VAE decode + DreamSim was finite
    assert re.search(r"ProCreate .*\n  touched \d+ step-samples .*samples touched: \[0, 1\]", text), text


def test_shield_memory_grows_the_reference_set_across_queued_runs(server):
    """Run 1 (empty memory) samples plainly and is remembered; run 2 repels from run 1's outputs."""
    write_random_dreamsim(server.base_dir / "models" / "dreamsim")
    server.write_input_latent("procreate_items", rgb_items(6))
    graph = procreate_graph()
    del graph["protected"], graph["images"], graph["references"]
    memory_id = f"procreate-server-{uuid.uuid4().hex[:8]}"
    graph["memory"] = {"class_type": "ShieldMemory", "inputs": {"memory_id": memory_id, "reset": False}}
    graph["procreate"]["inputs"].update(reference_set=["memory", 0], gradient_mode="fast")
    first = server.run(graph, timeout=600)
    first_text = "".join(first["report"]["text"])
    assert re.search(r"4 steps recorded, 0 references\n  touched 0 step-samples", first_text), first_text
    assert torch.equal(server.saved_latent(first, "save_guided"), server.saved_latent(first, "save_plain"))
    second = server.run(graph, timeout=600)
    second_text = "".join(second["report"]["text"])
    assert re.search(r"4 steps recorded, 2 references\n.*samples touched: \[0, 1\]", second_text), second_text
    guided, plain = server.saved_latent(second, "save_guided"), server.saved_latent(second, "save_plain")
    assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-3
