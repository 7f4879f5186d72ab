"""Shields measured in an embedding space, as the embedding-space methods (Sparse Repellency in an embedding
space, Early Copy Redraw) hold them: the VAE that decodes latents, the embedder, the shield set or Shield
Memory, and the shields' unit embeddings, computed once for a fixed set and afresh at every run for a memory."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import torch

from ..core.shield_set import ShieldSet
from . import embedding_spell_math as esm
from .embedders import Embedder
from .method_patch import MethodPatch, MethodRun, Run, Settings, memory_id_of, read_memory
from .procreate_hook import check_model_compatibility, reference_embeddings


class EmbeddedShields:
    def __init__(self, vae, embedder: Embedder, shield_set: ShieldSet, title: str):
        self.vae = vae
        self.embedder = embedder
        self.shield_set = shield_set
        self.title = title
        self.memory_id = memory_id_of(shield_set)
        # a Shield Memory is read afresh at every run start; a fixed set is embedded once, here
        self._fixed = None if self.memory_id else self._embed(shield_set)

    def check_model(self, model_patcher) -> None:
        """Errors naming the input to fix when the VAE or the set belongs to another model family."""
        check_model_compatibility(model_patcher, self.vae, self.shield_set, self.title, "shield_set")

    def memory_ids(self) -> list[str]:
        return [self.memory_id] if self.memory_id else []

    def for_run(self) -> torch.Tensor:
        """[K, D] unit embeddings of the shields for a run starting now ([0, 0] without shields)."""
        return self._fixed if not self.memory_id else self._embed(read_memory(self.memory_id))

    def _embed(self, shield_set: ShieldSet) -> torch.Tensor:
        if not len(shield_set):
            return torch.zeros(0, 0)
        embedded = reference_embeddings(
            shield_set, self.embedder, decode=self._decode_latents, where=f"{self.title}: the shield set"
        )
        return esm.unit_embeddings(embedded)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(torch.float32))[..., :3].float().cpu()


def shield_count(shields: Optional[torch.Tensor]) -> int:
    return int(shields.shape[0]) if shields is not None else 0


@dataclasses.dataclass
class EmbeddedShieldsRun(MethodRun):
    shields: Optional[torch.Tensor] = None  # [K, D] unit embeddings for this run (a memory grows between runs)


class EmbeddedShieldsPatch(MethodPatch[Settings, Run]):
    """One node execution of a method whose shields live in an embedder's space: the VAE that decodes x̂0, the
    embedder, the shields and the settings. `run_state` is the method's run state (an EmbeddedShieldsRun)."""

    run_state: ClassVar[type]

    def __init__(
        self, vae, embedder: Embedder, shield_set: ShieldSet, settings: Settings, patch_id: Optional[str] = None
    ):
        settings.validate()
        super().__init__(settings, label=embedder.key, patch_id=patch_id)
        self.vae = vae
        self.embedder = embedder
        self.shields = EmbeddedShields(vae, embedder, shield_set, self.method.title)

    def check_model(self, model_patcher) -> None:
        self.shields.check_model(model_patcher)

    def memory_ids(self) -> list[str]:
        return self.shields.memory_ids()

    def new_run(self, record, context) -> Run:
        return self.run_state(record=record, shields=self.shields.for_run())
