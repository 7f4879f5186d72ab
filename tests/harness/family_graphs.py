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
