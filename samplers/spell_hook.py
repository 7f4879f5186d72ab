"""Sparse repellency inside ComfyUI's sampler: a post-CFG function that edits `denoised`.

ComfyUI's samplers step from the denoised prediction x̂0 (for EPS, V-prediction and flow/CONST models
alike), so replacing x̂0 by x̂0 + λΔ after CFG is exactly SPELL's "take a step towards x̂0 + λΔ"
(appendix D, Algorithm 1) on every sampler. Only this module touches comfy; the math is in
`spell_math`, the range search in `range_search`/`shield_index`. The patch follows the method
contract (`method_patch.MethodPatch`); its record schema is `SPELL_RECORD` below.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Optional, Sequence

import numpy as np
import torch
from typing_extensions import TypedDict

from ..core import shield_files
from ..core.records import Heatmap, MethodRecord, StepEntry
from ..core.shield_set import ShieldSet, ShieldSetError
from . import range_search, shield_index, spell_math
from .latent_space import shields_in_model_space
from .method_patch import MethodPatch, MethodRun, memory_id_of
from .progress import progress_reporter

logger = logging.getLogger(__name__)

WHERE = "Sparse Repellency: shield_set"


# -- the record (what the Report, the frontend and the benches read) --------------------------------
class SpellStep(StepEntry):
    """One evaluation. Outside the window the per-sample lists other than sigma/touched are empty.

    shield_hits: shields within r per sample; batch_hits: other samples within r (intra-batch);
    relative_correction: ‖λΔ‖ / ‖x − x̂0‖ per sample, the correction against the denoising step (§4.5).
    """

    shield_hits: list[int]
    batch_hits: list[int]
    relative_correction: list[float]


class SpellSummary(TypedDict, total=False):
    steps: int
    active_steps: int
    first_active_step: Optional[int]
    last_active_step: Optional[int]
    touched_samples: list[int]
    max_relative_correction: float
    radius: float
    shields: int
    search: list[str]
    # the paper's calibration aid (appendix D), present when the batch had >= 2 samples
    median_pairwise_distance: float
    median_pairwise_relative: float
    radius_relative: float


def describe_spell(curves) -> list[str]:
    lines = []
    correction = curves.field("relative_correction")
    if correction is not None and np.isfinite(correction).any():
        lines.append(f"  max ‖λΔ‖ / ‖x − x̂0‖ {float(np.nanmax(correction)):.3g}")
    hits = curves.field("shield_hits")
    if hits is not None and np.isfinite(hits).any() and np.nanmax(hits) > 0:
        lines.append(f"  max shields within r at one step: {int(np.nanmax(hits))}")
    neighbours = curves.field("batch_hits")
    if neighbours is not None and np.isfinite(neighbours).any() and np.nanmax(neighbours) > 0:
        lines.append(f"  max other samples within r at one step: {int(np.nanmax(neighbours))}")
    return lines


SPELL_RECORD = MethodRecord(
    kind="sparse_repellency",
    title="Sparse Repellency",
    step=SpellStep,
    summary=SpellSummary,
    chart=Heatmap(value="relative_correction", label="‖λΔ‖ / ‖x − x̂0‖"),
    describe=describe_spell,
)
RECORD_KIND = SPELL_RECORD.kind


# -- the patch --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RepellencySettings:
    radius: float
    relative_radius: bool = True
    overcompensation: float = 1.6
    intra_batch: bool = True
    start_percent: float = 0.0
    end_percent: float = 1.0
    search_method: str = "auto"


@dataclasses.dataclass
class RunState(MethodRun):
    checked: bool = False
    radius: float = 0.0
    last_plain_x0: Optional[torch.Tensor] = None


class SparseRepellencyPatch(MethodPatch[RepellencySettings, RunState]):
    """One Sparse Repellency node execution: its shields (in the model's space), settings and hooks.

    Shield sets marked as a memory (settings["shield_memory_id"]) receive every run's final latents.
    """

    method = SPELL_RECORD

    def __init__(
        self,
        shield_sets: Sequence[ShieldSet],
        settings: RepellencySettings,
        label: str = "",
        patch_id: Optional[str] = None,
    ):
        super().__init__(settings, label, patch_id)
        self.shield_sets = list(shield_sets)
        self.searches: list = []
        self._searches_built = False
        self._build_lock = threading.Lock()

    # -- the contract -----------------------------------------------------------------------------
    def check_model(self, model_patcher) -> None:
        latent_format = type(model_patcher.get_model_object("latent_format")).__name__
        for shield_set in self.shield_sets:
            if len(shield_set):
                shield_set.check_compatible(shield_set.item_shape, latent_format, WHERE)

    def memory_ids(self) -> list[str]:
        return [memory_id_of(s) for s in self.shield_sets if memory_id_of(s)]

    def new_run(self, record, context) -> RunState:
        return RunState(record=record)

    def summarize(self, state: RunState) -> dict:
        steps = state.record.steps
        active = [index for index, step in enumerate(steps) if any(step["touched"])]
        summary = {
            "steps": len(steps),
            "active_steps": len(active),
            "first_active_step": active[0] if active else None,
            "last_active_step": active[-1] if active else None,
            "touched_samples": sorted({b for step in steps for b, moved in enumerate(step["touched"]) if moved}),
            "max_relative_correction": max(
                (max(step["relative_correction"], default=0.0) for step in steps), default=0.0
            ),
            "radius": state.radius,
            "shields": sum(len(search) for search in self.searches),
            "search": [search.name for search in self.searches],
        }
        summary.update(_calibration(state.last_plain_x0, state.radius))
        return summary

    def step(self, state: RunState, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if denoised.is_nested:
            return denoised
        if not state.checked:
            self._check_first_step(denoised, args["model"])
            state.radius = spell_math.absolute_radius(
                self.settings.radius, denoised[0].numel(), self.settings.relative_radius
            )
            state.checked = True
        sigma = args["sigma"].flatten().float()
        batch = denoised.shape[0]
        state.last_plain_x0 = denoised
        if not self.in_window(state, args["model"], float(sigma.max())):
            state.record.add_step(
                sigma=sigma.tolist(),
                in_window=False,
                touched=[False] * batch,
                shield_hits=[],
                batch_hits=[],
                relative_correction=[],
            )
            return denoised
        result = spell_math.sparse_repellency_step(
            denoised,
            self.searches,
            state.radius,
            self.settings.overcompensation,
            self.settings.intra_batch,
            fallback_direction=args["input"] - denoised,
        )
        result = _only_acting(result, denoised, self.acting_samples(args, batch))
        state.record.add_step(
            sigma=sigma.tolist(),
            in_window=True,
            touched=[norm > 0 for norm in result.delta_norm],
            shield_hits=result.shield_hits,
            batch_hits=result.batch_hits,
            relative_correction=spell_math.relative_magnitude(result.delta_norm, args["input"], denoised),
        )
        return result.denoised

    # -- the shields' range searches -------------------------------------------------------------
    def _check_first_step(self, denoised: torch.Tensor, model) -> None:
        self._ensure_searches(model)
        item_shape = tuple(denoised.shape[1:])
        latent_format = type(model.latent_format).__name__
        for shield_set in self.shield_sets:
            if len(shield_set):
                shield_set.check_compatible(item_shape, latent_format, WHERE)
        if not self.searches and denoised.shape[0] < 2 and self.settings.intra_batch:
            raise ShieldSetError(
                "Sparse Repellency: intra_batch is on but no shield set is connected (or it is empty) and "
                "the batch size is 1, so there is nothing to repel from. Raise batch_size (Empty Latent "
                "Image) or connect a shield_set."
            )

    def _ensure_searches(self, base_model) -> None:
        """Build the searches at the first step that needs them (lazily: patching a model is free, and an
        index is built once per set content, then cached in RAM and beside the set file)."""
        with self._build_lock:
            if not self._searches_built:
                self.searches = [self._build_search(base_model, s) for s in self.shield_sets if len(s)]
                self._searches_built = True

    def _build_search(self, base_model, shield_set: ShieldSet):
        # Shields are stored as LATENT (what VAE Encode gives); the sampler works in the model's space.
        rows = shields_in_model_space(shield_set, base_model.latent_format)
        method = shield_index.resolve_search_method(self.settings.search_method, len(shield_set))
        if method != "clustered":
            return shield_index.build_range_search(rows, method)
        dims = range_search.default_projection_dims(len(shield_set), method)

        def build() -> dict:
            return shield_index.ClusteredProjectionSearch.build_state(rows, dims, on_chunk=progress_reporter())

        # a loaded set's index is keyed by the file's identity too (an edit in place keeps names and hashes)
        file_key = ""
        if shield_set.file_rows is not None:
            file_key = shield_files.trusted_file_key(shield_set.source_path, shield_set.file_rows.descriptor)
        if file_key is None:  # the file changed in the last seconds: not cached, in RAM or beside it
            return shield_index.ClusteredProjectionSearch(rows, build())
        key = f"v{INDEX_VERSION}:{shield_set.content_hash}:{file_key}:{self.latent_format}:m{dims}"
        index_file = None if shield_set.source_path is None else shield_files.index_path_for(shield_set.source_path)
        state = shield_index.cached_state(
            key,
            build=build,
            load=None if index_file is None else lambda: shield_files.load_index(index_file, key),
            save=None if index_file is None else lambda built: _save_index_quietly(index_file, key, built),
        )
        return shield_index.ClusteredProjectionSearch(rows, state)


def _only_acting(
    result: spell_math.StepResult, denoised: torch.Tensor, acting: Optional[torch.Tensor]
) -> spell_math.StepResult:
    """The step with the samples a gate holds back left as they were (they still repel the others)."""
    if acting is None or bool(acting.all()):
        return result
    held = ~acting.to(denoised.device)
    moved = torch.where(held.reshape(-1, *[1] * (denoised.ndim - 1)), denoised, result.denoised)
    delta_norm = [0.0 if bool(held[b]) else norm for b, norm in enumerate(result.delta_norm)]
    return dataclasses.replace(result, denoised=moved, delta_norm=delta_norm)


INDEX_VERSION = 3  # 3: pooled sketch codes (samplers/pooled_sketch.py)


def _save_index_quietly(path, key: str, state: dict) -> None:
    """The index file is only a cache: a read-only folder must not stop the sampler."""
    try:
        shield_files.save_index(path, key, state)
    except OSError as error:
        logger.warning("could not save the shield index %s (%s); it will be rebuilt next time", path, error)


def _calibration(x0: Optional[torch.Tensor], radius: float) -> dict:
    """The paper's calibration aid (appendix D): median pairwise distance of the last step's x̂0 before that
    step's repellency. It lies on the repelled trajectory, so it is inflated when the patch acted; Radius
    Calibration on a plain batch is the calibration proper."""
    if x0 is None or x0.shape[0] < 2:
        return {}
    median = spell_math.median_pairwise_distance(x0)
    scale = x0[0].numel() ** 0.5
    return {
        "median_pairwise_distance": median,
        "median_pairwise_relative": median / scale,
        "radius_relative": radius / scale,
    }
