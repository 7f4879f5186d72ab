"""API-format graphs for the family fixtures, built as a user would wire them in ComfyUI.

SD1.5/SDXL: CheckpointLoaderSimple (MODEL + VAE from one file) and EmptyLatentImage. SD3: UNETLoader,
VAELoader, EmptySD3LatentImage. Flux dev: the same, plus FluxGuidance on the positive prompt and
cfg 1 (the guidance is distilled into the model). Wan 2.1: UNETLoader, VAELoader and
EmptyHunyuanLatentVideo (what ComfyUI's Wan examples use). Text encoders are replaced by the test
pack's Fabricated Conditioning node (harness/family_nodes).
"""

from __future__ import annotations

import itertools
from typing import Any

from .families import Family

Ref = list  # [node id, output index]

FLUX_GUIDANCE = 3.5
LATENT_NODES = {"sd15": "EmptyLatentImage", "sdxl": "EmptyLatentImage", "sd3": "EmptySD3LatentImage"}


class FamilyGraph:
    """One graph: the family's loaders, conditioning and empty latent, plus whatever a test adds."""

    def __init__(self, family: Family, width: int = 64, height: int = 64, batch: int = 2, frames: int = 5):
        self.family = family
        self.width, self.height, self.batch, self.frames = width, height, batch, frames
        self.nodes: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self.model, self.vae = self._loaders()
        self.positive = self.conditioning(seed=1)
        if family.distilled_guidance:
            self.positive = self.add("FluxGuidance", conditioning=self.positive, guidance=FLUX_GUIDANCE)
        self.negative = self.conditioning(seed=2)
        self.empty_latent = self.latent(batch)

    @property
    def cfg(self) -> float:
        """What a user samples the family with: distilled guidance runs at cfg 1."""
        return 1.0 if self.family.distilled_guidance else 4.0

    def add(self, class_type: str, node_id: str | None = None, **inputs) -> Ref:
        node_id = node_id or f"n{next(self._ids)}"
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return [node_id, 0]

    def output(self, ref: Ref, index: int) -> Ref:
        return [ref[0], index]

    def _loaders(self) -> tuple[Ref, Ref]:
        family = self.family
        if family.loader == "checkpoint":
            checkpoint = self.add("CheckpointLoaderSimple", ckpt_name=family.file_name)
            return checkpoint, self.output(checkpoint, 2)
        model = self.add("UNETLoader", unet_name=family.file_name, weight_dtype="default")
        return model, self.add("VAELoader", vae_name=family.vae_file_name)

    def conditioning(self, seed: int, model: Ref | None = None) -> Ref:
        return self.add("ShieldTestFabricatedConditioning", model=model or self.model, seed=seed, tokens=8)

    def latent(self, batch: int) -> Ref:
        size = {"width": self.width, "height": self.height, "batch_size": batch}
        if self.family.video:
            return self.add("EmptyHunyuanLatentVideo", length=self.frames, **size)
        return self.add(LATENT_NODES.get(self.family.name, "EmptySD3LatentImage"), **size)

    def sample(
        self,
        model: Ref,
        seed: int = 7,
        steps: int = 4,
        sampler: str = "euler",
        scheduler: str = "simple",
        cfg: float | None = None,
        latent: Ref | None = None,
    ) -> Ref:
        return self.add(
            "KSampler",
            model=model,
            seed=seed,
            steps=steps,
            cfg=self.cfg if cfg is None else cfg,
            sampler_name=sampler,
            scheduler=scheduler,
            positive=self.positive,
            negative=self.negative,
            latent_image=latent or self.empty_latent,
            denoise=1.0,
        )

    def save_latent(self, samples: Ref, prefix: str) -> str:
        return self.add("SaveLatent", samples=samples, filename_prefix=prefix)[0]

    def decode(self, samples: Ref) -> Ref:
        return self.add("VAEDecode", samples=samples, vae=self.vae)


# -- example workflows with the family fixtures substituted for the real files -------------------------
SMALL_SIZES = {"width": 64, "height": 64}
TEXT_ENCODER_LOADERS = ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader")


def with_fixture_files(graph: dict[str, dict], family: Family, steps: int = 3) -> dict[str, dict]:
    """An API graph of a real-checkpoint example workflow, rewritten to run on the family's fixture:
    its loaders load the fixture files (a single-file checkpoint of a UNETLoader family becomes a
    UNETLoader plus a VAELoader), text encoders are dropped and every CLIPTextEncode becomes Fabricated
    Conditioning of that model, latents are 64 px (video: 5 frames) at batch ≤ 2, samplers take `steps`.
    Everything else (the Shield nodes and their settings, the sampler, the scheduler) stays as saved."""
    graph = {
        node_id: {"class_type": node["class_type"], "inputs": dict(node["inputs"])} for node_id, node in graph.items()
    }
    renamed: dict[tuple[str, int], list] = {}
    model_ref = None
    for node_id, node in list(graph.items()):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple" and family.loader == "checkpoint":
            inputs["ckpt_name"], model_ref = family.file_name, [node_id, 0]
        elif kind == "CheckpointLoaderSimple":
            graph[node_id] = {
                "class_type": "UNETLoader",
                "inputs": {"unet_name": family.file_name, "weight_dtype": "default"},
            }
            graph[f"{node_id}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": family.vae_file_name}}
            renamed[(node_id, 2)], model_ref = [f"{node_id}_vae", 0], [node_id, 0]
        elif kind == "UNETLoader":
            inputs["unet_name"], model_ref = family.file_name, [node_id, 0]
        elif kind == "VAELoader":
            inputs["vae_name"] = family.vae_file_name
        elif kind in TEXT_ENCODER_LOADERS:
            del graph[node_id]
    if model_ref is None:
        raise ValueError("the workflow has no checkpoint or diffusion-model loader to substitute")
    for seed, (node_id, node) in enumerate(sorted(graph.items())):
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CLIPTextEncode":
            graph[node_id] = {
                "class_type": "ShieldTestFabricatedConditioning",
                "inputs": {"model": model_ref, "seed": seed + 1, "tokens": 8},
            }
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage", "EmptyHunyuanLatentVideo", "ShieldSetFromImages"):
            inputs.update(SMALL_SIZES)
            inputs.update({"length": 5} if "length" in inputs else {})
            inputs.update({"batch_size": min(2, inputs["batch_size"])} if "batch_size" in inputs else {})
        elif kind in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = steps
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and (value[0], value[1]) in renamed:
                node["inputs"][name] = renamed[(value[0], value[1])]
    return graph
