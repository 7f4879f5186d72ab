"""The copy detector in a real ComfyUI server graph (#10 item 4): Shield Copy Detector Loader as ProCreate's
embedder on the demo model, and the Shield Report counting copies with it."""

import json
import re

import pytest
import torch

from comfyui_shield.reference_models import demo_dataset
from comfyui_shield.reference_models.judge import load_judge
from harness.server import ServerError

BATCH = 4
SAMPLER = {
    "seed": 21,
    "steps": 8,
    "cfg": 3.0,
    "sampler_name": "euler",
    "scheduler": "normal",
    "denoise": 1.0,
    "positive": ["cond", 0],
    "negative": ["cond", 1],
    "latent_image": ["empty", 0],
}


def detector_graph(strength: float) -> dict:
    """Plain and ProCreate-guided samples of the class 'star', repelled from its duplicated items in the
    detector's space; the Report reads the guided images against the same references."""
    return {
        "model": {"class_type": "ShieldDemoModelLoader", "inputs": {}},
        "cond": {"class_type": "ShieldDemoConditioning", "inputs": {"class_name": "star"}},
        "items": {"class_type": "ShieldDemoTrainingSet", "inputs": {"items": "duplicated", "class_name": "star"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "detector": {"class_type": "ShieldCopyDetectorLoader", "inputs": {"detector": "demo (bundled)"}},
        "references": {
            "class_type": "ShieldReferenceSetFromImages",
            "inputs": {"images": ["items", 0], "vae": ["vae", 0], "embedder": ["detector", 0], "model": ["model", 0]},
        },
        "procreate": {
            "class_type": "ShieldProCreateGuidance",
            "inputs": {
                "model": ["model", 0],
                "vae": ["vae", 0],
                "embedder": ["detector", 0],
                "reference_set": ["references", 0],
                "strength": strength,
                "element_clip": 1.0,
                "max_grad_norm": 0.5,
                "look_ahead_steps": 0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "gradient_mode": "fast",
                "similarity_threshold": -1.0,
                "intra_batch": False,
            },
        },
        "empty": {
            "class_type": "EmptyChromaRadianceLatentImage",
            "inputs": {"width": 32, "height": 32, "batch_size": BATCH},
        },
        "guided": {"class_type": "KSampler", "inputs": {"model": ["procreate", 0], **SAMPLER}},
        "plain": {"class_type": "KSampler", "inputs": {"model": ["model", 0], **SAMPLER}},
        "save_guided": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["guided", 0], "filename_prefix": "judge/guided"},
        },
        "save_plain": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["plain", 0], "filename_prefix": "judge/plain"},
        },
        "decoded": {"class_type": "VAEDecode", "inputs": {"samples": ["guided", 0], "vae": ["vae", 0]}},
        "report": {
            "class_type": "ShieldReport",
            "inputs": {
                "images": ["decoded", 0],
                "shield_set": ["references", 0],
                "embedder": ["detector", 0],
                "radius": 0.0,
                "similarity_threshold": 0.0,
                "include_run_records": True,
            },
        },
    }


def test_procreate_with_the_copy_detector_moves_samples_away_in_its_space(server):
    outputs = server.run(detector_graph(strength=300.0), timeout=600)
    # the pixel_space latent is the image in [-1, 1]; VAEDecode clamps it, as here
    guided = server.saved_latent(outputs, "save_guided").clamp(-1, 1)
    plain = server.saved_latent(outputs, "save_plain").clamp(-1, 1)
    assert guided.shape == plain.shape == (BATCH, 3, 32, 32) and torch.isfinite(guided).all()
    dataset = demo_dataset.build_dataset()
    references = dataset.images[dataset.class_items("star", duplicated=True)]
    judge = load_judge()
    before = judge.is_copy(plain, references).similarity
    after = judge.is_copy(guided, references).similarity
    print("detector similarity to the nearest duplicated star, plain", before.tolist(), "guided", after.tolist())
    assert after.mean() < before.mean() - 0.05, (before, after)
    text = "".join(outputs["report"]["text"])
    assert re.search(r"ProCreate \(run #\d+, copy_detector/\w+\): 8 steps recorded", text), text
    copies = re.search(r"copies by the copy detector \(similarity >= ([\d.]+), copy_detector/\w+\): (\d)/4", text)
    assert copies, text
    assert float(copies.group(1)) == pytest.approx(judge.threshold, abs=1e-3)
    assert int(copies.group(2)) == judge.is_copy(guided, references).count
    similarities = [float(v) for v in re.findall(r"copy-detector similarity (-?[\d.e-]+)", text)]
    assert similarities == pytest.approx(after.tolist(), abs=2e-3)


def test_a_user_detector_file_that_is_damaged_is_named_in_the_error(server):
    folder = server.base_dir / "models" / "shield_copy_detectors"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    graph = {
        "detector": {"class_type": "ShieldCopyDetectorLoader", "inputs": {"detector": "broken.safetensors"}},
        "items": {"class_type": "ShieldDemoTrainingSet", "inputs": {"items": "duplicated", "class_name": "star"}},
        "report": {
            "class_type": "ShieldReport",
            "inputs": {
                "images": ["items", 0],
                "embedder": ["detector", 0],
                "radius": 0.0,
                "similarity_threshold": 0.0,
                "include_run_records": False,
            },
        },
    }
    prompt_id = server.queue(graph)
    with pytest.raises(ServerError) as raised:
        server.wait(prompt_id, timeout=120)
    assert "broken.safetensors is damaged or not a safetensors file" in str(raised.value)

    # damaged metadata in an otherwise valid file (the hostile battery): a NaN threshold loaded and counted no
    # copy; a config of absurd sizes built a model of gigabytes before its weights were compared
    from safetensors import safe_open
    from safetensors.torch import save_file

    from comfyui_shield.reference_models.judge import DETECTOR_PATH

    with safe_open(str(DETECTOR_PATH), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    damaged = {
        "nan_threshold": ({"threshold": "nan"}, r"threshold 'nan' is not a cosine similarity in \[-1, 1\]"),
        "huge_config": (
            {"config": json.dumps({"image_size": 1024, "width": 16, "dim": 128})},
            r"its config .*1024.* does not match its weights",
        ),
    }
    for name, (change, message) in damaged.items():
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata={**metadata, **change})
        graph["detector"]["inputs"]["detector"] = f"{name}.safetensors"
        with pytest.raises(ServerError, match=rf"{name}.safetensors does not hold a complete copy detector.*{message}"):
            server.run(graph, timeout=120)
