"""Memorization Risk and Shield Gate in a real ComfyUI server, on the bundled demo model (#12 items 1, 2):
unflagged samples bit-identical to plain sampling, flagged ones mitigated; the errors a user meets."""

import json
import re

import pytest
import torch
from PIL import Image

from comfyui_shield.core.certificate import read_certificate
from comfyui_shield.reference_models import demo_dataset
from comfyui_shield.version import __version__
from harness.server import ServerError

SEED, STEPS, CFG, BATCH = 11, 6, 3.0, 4


def risk_graph(threshold: float, risk_seed: int = SEED, cfg: float = CFG, flag: str = "per sample") -> dict:
    sampler = {"steps": STEPS, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    return {
        "model": {"class_type": "ShieldDemoModelLoader", "inputs": {}},
        "conditioning": {"class_type": "ShieldDemoConditioning", "inputs": {"class_name": "star"}},
        "empty": {
            "class_type": "EmptyChromaRadianceLatentImage",
            "inputs": {"width": 32, "height": 32, "batch_size": BATCH},
        },
        "risk": {
            "class_type": "ShieldMemorizationRisk",
            "inputs": {
                "model": ["model", 0],
                "positive": ["conditioning", 0],
                "negative": ["conditioning", 1],
                "latent_image": ["empty", 0],
                "seed": risk_seed,
                "cfg": cfg,
                "probe_steps": 1,
                "threshold": threshold,
                "flag": flag,
                **sampler,
            },
        },
        "tpcfg": {
            "class_type": "ShieldTransitionPointCFG",
            "inputs": {
                "model": ["model", 0],
                "mode": "static",
                "transition_percent": 0.6,
                "transition_sigma": 0.0,
                "before_guidance": "unconditional",
                "opposite_scale": 2.0,
                "cap_percent": 1.0,
            },
        },
        "gate": {"class_type": "ShieldGate", "inputs": {"model": ["tpcfg", 0], "risk": ["risk", 0], "enabled": True}},
        **ksampler("gated", ["gate", 0], sampler, cfg),
        **ksampler("plain", ["model", 0], sampler, cfg),
    }


def ksampler(name: str, model: list, sampler: dict, cfg: float) -> dict:
    return {
        f"sample_{name}": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": SEED,
                "cfg": cfg,
                "positive": ["conditioning", 0],
                "negative": ["conditioning", 1],
                "latent_image": ["empty", 0],
                **sampler,
            },
        },
        f"save_{name}": {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"sample_{name}", 0], "filename_prefix": f"risk_{name}"},
        },
    }


def scores_from(outputs: dict) -> list[float]:
    text = outputs["risk"]["text"][0]
    return [float(value) for value in re.findall(r"sample \d+: ([0-9.eE+-]+)", text)]


def test_the_gate_leaves_unflagged_samples_bit_identical_and_mitigates_the_flagged(server):
    scores = scores_from(server.run(risk_graph(threshold=0.0)))
    assert len(scores) == BATCH and len(set(scores)) == BATCH  # each sample its own score
    ordered = sorted(scores)
    threshold = (ordered[1] + ordered[2]) / 2  # two samples above, two below
    outputs = server.run(risk_graph(threshold))
    assert scores_from(outputs) == scores  # the probe is deterministic for a seed
    gated = server.saved_latent(outputs, "save_gated")
    plain = server.saved_latent(outputs, "save_plain")
    for sample, score in enumerate(scores):
        if score >= threshold:
            assert (gated[sample] - plain[sample]).abs().max() > 1e-3, f"flagged sample {sample} not mitigated"
        else:
            assert torch.equal(gated[sample], plain[sample]), f"unflagged sample {sample} changed"
    assert "2/4 sample(s) at or above" in outputs["risk"]["text"][0]


def test_flag_per_prompt_gates_the_whole_batch_by_its_mean_score(server):
    """flag "per prompt (batch mean)": with the threshold between the batch mean and the highest score, per
    sample would flag a sample, per prompt flags none and the gated batch is bit-identical to plain; between
    the lowest score and the mean, per prompt flags (and mitigates) every sample, also those below it. The
    certificate says which rule set the flag and the mean it compared."""
    scores = scores_from(server.run(risk_graph(threshold=0.0)))
    mean = sum(scores) / len(scores)
    above, below = (mean + max(scores)) / 2, (mean + min(scores)) / 2
    assert min(scores) < below < mean < above < max(scores)
    unflagged = server.run(risk_graph(above, flag="per prompt (batch mean)"))
    assert "0/4 sample(s) flagged" in unflagged["risk"]["text"][0] and scores_from(unflagged) == scores
    plain = server.saved_latent(unflagged, "save_plain")
    assert torch.equal(server.saved_latent(unflagged, "save_gated"), plain)
    outputs = server.run(certificate_graph(below, flag="per prompt (batch mean)"))
    gated = server.saved_latent(outputs, "save_gated")
    assert torch.equal(server.saved_latent(outputs, "save_plain"), plain)
    for sample in range(BATCH):
        assert (gated[sample] - plain[sample]).abs().max() > 1e-3, f"sample {sample} of a flagged batch not mitigated"
    for index, info in enumerate(outputs["certificate"]["images"]):
        risk = read_certificate(server.output_path(info))["risk"]
        assert risk["flag_rule"] == "per prompt (batch mean)" and risk["at_risk"] and risk["threshold"] == below
        assert risk["batch_mean"] == pytest.approx(mean, rel=1e-3) and risk["score"] == pytest.approx(
            scores[index], rel=1e-3
        )
    assert "(AT RISK per prompt: batch mean" in outputs["certificate"]["text"][0]


def test_a_gate_from_another_seed_is_refused_naming_the_seed(server):
    with pytest.raises(ServerError, match="Shield Gate: the sampler does not start from the noise"):
        server.run(risk_graph(threshold=0.0, risk_seed=SEED + 1))


def test_risk_at_cfg_1_says_why_the_score_is_undefined(server):
    with pytest.raises(ServerError, match=r"score is undefined here: 'cfg' is 1.*guidance-distilled"):
        server.run(risk_graph(threshold=0.0, cfg=1.0))


def certificate_graph(threshold: float, flag: str = "per sample") -> dict:
    graph = risk_graph(threshold, flag=flag)
    graph.update(
        {
            "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
            "decoded": {"class_type": "VAEDecode", "inputs": {"samples": ["sample_gated", 0], "vae": ["vae", 0]}},
            "items": {"class_type": "ShieldDemoTrainingSet", "inputs": {"items": "duplicated", "class_name": "star"}},
            "shields": {
                "class_type": "ShieldSetFromImages",
                "inputs": {
                    "images": ["items", 0],
                    "vae": ["vae", 0],
                    "model": ["model", 0],
                    "width": 32,
                    "height": 32,
                    "folder": "",
                },
            },
            "embedder": {"class_type": "ShieldPixelEmbedder", "inputs": {"size": 32}},
            "certificate": {
                "class_type": "ShieldSaveImageWithCertificate",
                "inputs": {
                    "images": ["decoded", 0],
                    "filename_prefix": "risk_certificate",
                    "model": ["gate", 0],
                    "risk": ["risk", 0],
                    "latent": ["sample_gated", 0],
                    "shield_set": ["shields", 0],
                    "embedder": ["embedder", 0],
                },
            },
        }
    )
    return graph


def test_a_saved_png_carries_its_certificate(server):
    scores = scores_from(server.run(risk_graph(threshold=0.0)))
    threshold = sum(sorted(scores)[1:3]) / 2  # the two lowest scores unflagged (text rounds to 4 digits)
    outputs = server.run(certificate_graph(threshold))
    saved = outputs["certificate"]["images"]
    assert len(saved) == BATCH
    gated = server.saved_latent(outputs, "save_gated")
    items = server_items()
    for index, info in enumerate(saved):
        path = server.output_path(info)
        certificate = read_certificate(path)
        with Image.open(path) as image:  # ComfyUI's own chunks are there too
            assert json.loads(image.text["prompt"])["certificate"]["class_type"] == "ShieldSaveImageWithCertificate"
        assert certificate["version"] == __version__ and certificate["image"] == {"index": index, "batch_size": BATCH}
        risk = certificate["risk"]
        assert risk["score"] == pytest.approx(scores[index], rel=1e-3) and risk["at_risk"] == (
            risk["score"] >= threshold
        )
        assert risk["flag_rule"] == "per sample" and risk["batch_mean"] is None
        (shield,) = certificate["shields"]
        assert shield["method"] == "transition_cfg" and shield["settings"]["mode"] == "static"
        assert shield["fired"] == risk["at_risk"]  # the gate: TPCFG acted on the flagged samples only
        assert shield["risk_score"] == pytest.approx(risk["score"])  # the run's own d_t, the same number
        if shield["fired"]:
            assert shield["steps"][0] == 0 and len(shield["steps"]) == len(shield["sigmas"]) < shield["evaluations"]
        nearest = certificate["nearest_protected"]["latent_l2"]
        distances = (items - gated[index]).flatten(1).norm(dim=1)
        assert nearest["distance"] == pytest.approx(float(distances.min()), rel=1e-4)
        by_pixels = certificate["nearest_protected"]["embedder"]  # the pixel embedder at full size: cosine of pixels
        pixels = gated[index].clamp(-1, 1).flatten()[None]  # what the pixel_space VAE decodes, back in [-1, 1]
        cosines = torch.nn.functional.cosine_similarity(pixels, items.flatten(1))
        assert by_pixels["similarity"] == pytest.approx(float(cosines.max()), abs=2e-3)
        assert by_pixels["item"] == f"image {int(cosines.argmax())}" and "copy" not in by_pixels  # no copy detector
        assert nearest["item"] == f"image {int(distances.argmin())}"
    assert sum(read_certificate(server.output_path(i))["risk"]["at_risk"] for i in saved) == 2
    assert "Transition-Point CFG: fired at" in outputs["certificate"]["text"][0]


def test_risk_refuses_empty_flat_and_nan_latents_by_name(server):
    """The hostile battery: an empty batch gave "integer modulo by zero", a 3-D tensor a matmul shape error,
    NaN latents scores of nan; each now names 'latent_image'."""
    server.write_input_latent("risk_empty", torch.zeros(0, 3, 32, 32))
    server.write_input_latent("risk_flat", torch.zeros(3, 32, 32))
    server.write_input_latent("risk_nan", torch.full((2, 3, 32, 32), float("nan")))
    graph = {key: value for key, value in risk_graph(threshold=1.0).items() if key in ("model", "conditioning", "risk")}
    graph["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["risk", 3]}}
    graph["risk"]["inputs"]["latent_image"] = ["bad", 0]
    for name, why in [
        ("risk_empty", "is an empty batch"),
        ("risk_flat", "has shape \\[3, 32, 32\\]"),
        ("risk_nan", "contains NaN"),
    ]:
        graph["bad"] = {"class_type": "LoadLatent", "inputs": {"latent": f"{name}.latent"}}
        with pytest.raises(ServerError, match=rf"Memorization Risk: 'latent_image' {why}"):
            server.run(graph, timeout=60)


def test_a_certificate_prefix_outside_output_or_too_long_is_refused_by_name(server):
    """The hostile battery: '..' and absolute prefixes were refused by core only at run time ("Saving image
    outside the output folder is not allowed", not naming the input), a NUL gave "embedded null byte" and
    300 characters "[Errno 36] File name too long". All are refused at /prompt naming filename_prefix."""
    images = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}
    for prefix, why in [
        ("../escape", "points outside ComfyUI's output directory"),
        ("/tmp/escape", "points outside ComfyUI's output directory"),
        ("sub/../../escape", "points outside ComfyUI's output directory"),
        ("nul\x00byte", "a NUL character"),
        ("x" * 300, "is 311 bytes long.*Shorten it"),
    ]:
        certificate = {"images": ["images", 0], "filename_prefix": prefix}
        graph = {
            "images": images,
            "certificate": {"class_type": "ShieldSaveImageWithCertificate", "inputs": certificate},
        }
        with pytest.raises(ServerError, match=rf"400.*Save Image with Shield Certificate: filename_prefix: .*{why}"):
            server.queue(graph)
    certificate = {"images": ["images", 0], "filename_prefix": "certificates/ünï v1.5"}
    graph = {"images": images, "certificate": {"class_type": "ShieldSaveImageWithCertificate", "inputs": certificate}}
    (saved,) = server.run(graph)["certificate"]["images"]
    assert server.output_path(saved).is_file() and saved["subfolder"] == "certificates"


def server_items() -> torch.Tensor:
    """The star class's duplicated training items as pixel-space latents ([-1, 1], what the set holds)."""
    dataset = demo_dataset.build_dataset()
    return dataset.images[dataset.class_items("star", duplicated=True)]
