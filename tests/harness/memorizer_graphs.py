"""Pieces of API-format graphs around the memorizer model that several server tests share."""

from __future__ import annotations


def memorizer_sampler(seed: int, steps: int) -> dict:
    """KSampler inputs (euler, karras, cfg 2) wired to the graph's "positive", "negative" and "empty" nodes."""
    return {
        "seed": seed,
        "steps": steps,
        "cfg": 2.0,
        "sampler_name": "euler",
        "scheduler": "karras",
        "denoise": 1.0,
        "positive": ["positive", 0],
        "negative": ["negative", 0],
        "latent_image": ["empty", 0],
    }


def sparse_repellency(model: list, shield_set: list, radius: float, **overrides) -> dict:
    """A Sparse Repellency node with the paper's overcompensation over the whole schedule."""
    inputs = {
        "model": model,
        "shield_set": shield_set,
        "radius": radius,
        "radius_unit": "absolute",
        "overcompensation": 1.6,
        "intra_batch": True,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "search": "auto",
    }
    return {"class_type": "ShieldSparseRepellency", "inputs": {**inputs, **overrides}}


def embedding_space_method(node: dict, latent_file: str, shield_first: int, shield_count: int, sampler: dict,
                           prefix: str) -> dict:  # fmt: skip
    """The memorizer of the items in `latent_file` prompted with items 0-3 (it copies them), the stock pixel_space
    VAE and the Pixel Embedder at 16 px, shields = items [first, first + count) from latents, `node` (linked
    to model/vae/embedder/shields) sampled against the plain model with the same `sampler` settings, both
    saved under `prefix`, and the Shield Report reading the patched run."""
    return {
        "items": {"class_type": "LoadLatent", "inputs": {"latent": latent_file}},
        "model": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}},
        "positive": {
            "class_type": "ShieldMemorizerConditioning",
            "inputs": {"subset": "0,1,2,3", "n_items": ["model", 2]},
        },
        "negative": {"class_type": "ShieldMemorizerConditioning", "inputs": {"subset": "", "n_items": ["model", 2]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "embedder": {"class_type": "ShieldPixelEmbedder", "inputs": {"size": 16}},
        "protected": {
            "class_type": "LatentFromBatch",
            "inputs": {"samples": ["items", 0], "batch_index": shield_first, "length": shield_count},
        },
        "shields": {
            "class_type": "ShieldSetFromLatents",
            "inputs": {"latent": ["protected", 0], "model": ["model", 0]},
        },
        "method": {
            "class_type": node["class_type"],
            "inputs": {
                "model": ["model", 0],
                "vae": ["vae", 0],
                "embedder": ["embedder", 0],
                "shield_set": ["shields", 0],
                **node["inputs"],
            },
        },  # fmt: skip
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 4}},
        "shielded": {"class_type": "KSampler", "inputs": {"model": ["method", 0], **sampler}},
        "plain": {"class_type": "KSampler", "inputs": {"model": ["model", 0], **sampler}},
        "save_shielded": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["shielded", 0], "filename_prefix": f"{prefix}/s"},
        },
        "save_plain": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["plain", 0], "filename_prefix": f"{prefix}/p"},
        },
        "report": {
            "class_type": "ShieldReport",
            "inputs": {
                "latent": ["shielded", 0],
                "radius": 0.0,
                "similarity_threshold": 0.0,
                "include_run_records": True,
            },
        },
    }
