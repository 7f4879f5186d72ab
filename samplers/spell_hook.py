"""Sparse repellency inside ComfyUI's sampler: a post-CFG function that edits `denoised`.

ComfyUI's samplers step from the denoised prediction x̂0 (for EPS, V-prediction and flow/CONST models
alike), so replacing x̂0 by x̂0 + λΔ after CFG is exactly SPELL's "take a step towards x̂0 + λΔ"
(appendix D, Algorithm 1) on every sampler. Only this module touches comfy; the math is in
`spell_math`. Per-run state (the step record) comes from `attach_run_state`, so runs never share it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from typing import Callable, Optional, Sequence

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import torch

from ..core import shield_files
from ..core.records import RECORDS, RunRecord
from ..core.shield_set import ShieldSet, ShieldSetError, latent_format_name
from . import shield_index, spell_math
from .run_state import RunStateHolder, attach_run_state

logger = logging.getLogger(__name__)

RECORD_KIND = "sparse_repellency"
WHERE = "Sparse Repellency: shield_set"


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
class RunState:
    record: RunRecord
    checked: bool = False
    radius: float = 0.0
    last_plain_x0: Optional[torch.Tensor] = None


class SparseRepellencyPatch:
    """One Sparse Repellency node execution: its shields (in the model's space), settings and hooks.

    `on_output(shield_set, latents)` is called after every run with the run's final latents (LATENT
    space) for each shield set marked as a memory (settings["shield_memory_id"]).
    """

    def __init__(
        self,
        shield_sets: Sequence[ShieldSet],
        settings: RepellencySettings,
        on_output: Optional[Callable[[ShieldSet, torch.Tensor], None]] = None,
        label: str = "",
    ):
        self.shield_sets = list(shield_sets)
        self.settings = settings
        self.on_output = on_output
        self.label = label
        self.patch_id = f"spell-{uuid.uuid4().hex[:12]}"
        self.holder: RunStateHolder[RunState] = RunStateHolder(self._start_run, self._finish_run)
        self.searches: list = []
        self._searches_built = False
        self._build_lock = threading.Lock()
        self.latent_format = ""
        self.sigma_start = float("inf")
        self.sigma_end = 0.0

    # -- attaching --------------------------------------------------------------------------------
    def patch(self, model_patcher):
        """A clone of the model with the repellency hooks; the input model is left as it was."""
        model = model_patcher.clone()
        self.latent_format = latent_format_name(model)
        for shield_set in self.shield_sets:
            if len(shield_set):
                shield_set.check_compatible(shield_set.item_shape, self.latent_format, WHERE)
        model_sampling = model.get_model_object("model_sampling")
        self.sigma_start = float(model_sampling.percent_to_sigma(self.settings.start_percent))
        self.sigma_end = float(model_sampling.percent_to_sigma(self.settings.end_percent))

        # Plain closures, not bound methods: clone() deep-copies model_options, and deepcopy of a bound
        # method copies its instance (and with it the run-state holder and the shields).
        def spell_post_cfg(args):
            return self.post_cfg(args)

        def spell_memory_wrapper(executor, *args, **kwargs):
            return self._memory_wrapper(executor, *args, **kwargs)

        model.set_model_sampler_post_cfg_function(spell_post_cfg)
        attach_run_state(model, f"shield_{self.patch_id}", self.holder)
        if self.on_output is not None and any(_memory_id(s) for s in self.shield_sets):
            wrapper_type = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
            model.add_wrapper_with_key(wrapper_type, f"shield_memory_{self.patch_id}", spell_memory_wrapper)
        return model

    def _ensure_searches(self, base_model) -> None:
        """Build the searches at the first step that needs them (lazily: patching a model is free, and an
        index is built once per set content, then cached in RAM and beside the set file)."""
        with self._build_lock:
            if not self._searches_built:
                self.searches = [self._build_search(base_model, s) for s in self.shield_sets if len(s)]
                self._searches_built = True

    def _build_search(self, base_model, shield_set: ShieldSet):
        # Shields are stored as LATENT (what VAE Encode gives); the sampler works in the model's space.
        # process_latent_in is per entry, so it is applied to the rows as they are read.
        item_shape = shield_set.item_shape

        def to_model_space(rows: torch.Tensor) -> torch.Tensor:
            return base_model.process_latent_in(rows.reshape(-1, *item_shape)).reshape(rows.shape[0], -1).float()

        rows = spell_math.ShieldRows(shield_set.latents, to_model_space)
        method = resolve_search_method(self.settings.search_method, len(shield_set))
        if method != "clustered":
            return spell_math.build_range_search(rows, method)
        dims = spell_math.default_projection_dims(len(shield_set), method)
        key = f"v{INDEX_VERSION}:{shield_set.content_hash}:{self.latent_format}:m{dims}"
        index_file = None if shield_set.source_path is None else shield_files.index_path_for(shield_set.source_path)
        state = shield_index.cached_state(
            key,
            build=lambda: shield_index.ClusteredProjectionSearch.build_state(rows, dims, on_chunk=_progress_reporter()),
            load=None if index_file is None else lambda: shield_files.load_index(index_file, key),
            save=None if index_file is None else lambda built: _save_index_quietly(index_file, key, built),
        )
        return shield_index.ClusteredProjectionSearch(rows, state)

    def _memory_wrapper(self, executor, *args, **kwargs):
        output = executor(*args, **kwargs)
        if isinstance(output, torch.Tensor) and not output.is_nested:
            for shield_set in self.shield_sets:
                if _memory_id(shield_set):
                    self.on_output(shield_set, output.detach().to("cpu", torch.float32))
        return output

    # -- per run ----------------------------------------------------------------------------------
    def _start_run(self, context) -> RunState:
        return RunState(record=RECORDS.start(RECORD_KIND, self.patch_id, self.label))

    def _finish_run(self, state: RunState) -> None:
        steps = state.record.steps
        active = [index for index, step in enumerate(steps) if step["touched"]]
        summary = {
            "steps": len(steps),
            "active_steps": len(active),
            "first_active_step": active[0] if active else None,
            "last_active_step": active[-1] if active else None,
            "touched_samples": sorted({b for step in steps for b in step["touched"]}),
            "max_relative_correction": max(
                (max(step["relative_correction"], default=0.0) for step in steps), default=0.0
            ),
            "radius": state.radius,
            "shields": sum(len(search) for search in self.searches),
            "search": [search.name for search in self.searches],
        }
        summary.update(_calibration(state.last_plain_x0, state.radius))
        state.record.summary.update(summary)
        RECORDS.finish(state.record)

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

    # -- the hook ---------------------------------------------------------------------------------
    def post_cfg(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        if denoised.is_nested:
            return denoised
        state = self.holder.current
        if state is None:  # sampled without the OUTER_SAMPLE wrapper: keep a throwaway record
            state = self.holder.current = self._start_run(None)
        if not state.checked:
            self._check_first_step(denoised, args["model"])
            state.radius = spell_math.absolute_radius(
                self.settings.radius, denoised[0].numel(), self.settings.relative_radius
            )
            state.checked = True
        sigma = args["sigma"].flatten().float()
        state.last_plain_x0 = denoised
        if not self._in_window(float(sigma.max())):
            state.record.add_step(
                sigma=sigma.tolist(), active=False, shield_hits=[], batch_hits=[], relative_correction=[], touched=[]
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
        state.record.add_step(
            sigma=sigma.tolist(),
            active=True,
            shield_hits=result.shield_hits,
            batch_hits=result.batch_hits,
            relative_correction=spell_math.relative_magnitude(result.delta_norm, args["input"], denoised),
            touched=result.touched,
        )
        return result.denoised

    def _in_window(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start


INDEX_VERSION = 2


def resolve_search_method(method: str, count: int) -> str:
    """`auto`: exact below AUTO_PROJECTION_MIN_SHIELDS shields, else the clustered projection index."""
    if method not in spell_math.SEARCH_METHODS:
        raise ValueError(f"search method must be one of {spell_math.SEARCH_METHODS}, got {method!r}")
    if method == "auto":
        return "exact" if count < spell_math.AUTO_PROJECTION_MIN_SHIELDS else "clustered"
    return method


def _progress_reporter():
    progress = None

    def on_chunk(done: int, total: int) -> None:
        nonlocal progress
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is None:
            progress = comfy.utils.ProgressBar(total)
        progress.update_absolute(done, total)

    return on_chunk


def _save_index_quietly(path, key: str, state: dict) -> None:
    """The index file is only a cache: a read-only folder must not stop the sampler."""
    try:
        shield_files.save_index(path, key, state)
    except OSError as error:
        logger.warning("could not save the shield index %s (%s); it will be rebuilt next time", path, error)


def _memory_id(shield_set: ShieldSet) -> str:
    return str(shield_set.settings.get("shield_memory_id", ""))


def _calibration(x0: Optional[torch.Tensor], radius: float) -> dict:
    """The paper's calibration aid (appendix D): median pairwise distance of the last plain x̂0 batch."""
    if x0 is None or x0.shape[0] < 2:
        return {}
    median = spell_math.median_pairwise_distance(x0)
    scale = x0[0].numel() ** 0.5
    return {
        "median_pairwise_distance": median,
        "median_pairwise_relative": median / scale,
        "radius_relative": radius / scale,
    }
