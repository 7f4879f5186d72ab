"""Early Copy Redraw inside ComfyUI's sampler: a SAMPLER_SAMPLE wrapper that looks ahead, and a post-CFG hook.

Before the real run, the wrapper runs the first steps of the batch (a probe, `method_patch.PROBE_KEY`: every
Shield method on the model acts in it as in a fresh run and records nothing) up to the check point, where the
hook hands over the predicted x̂0. Samples whose decoded x̂0 embeds within `similarity` of a shield get a new
starting noise and the probe runs again, up to `max_attempts` checks; then the batch is sampled once, as
usual, from the accepted noises. Samples never within `similarity` keep their noise: when none is, the output
is bit-identical to sampling without the patch. Math in `redraw_math`; record schema `REDRAW_RECORD`.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import comfy.model_management
import comfy.patcher_extension
import torch
from typing_extensions import TypedDict

from ..core.records import Curves, MethodRecord, StepEntry
from . import embedding_spell_math as esm
from . import redraw_math as rm
from . import sample_subset as ss
from .embedded_shields import EmbeddedShieldsPatch, EmbeddedShieldsRun, shield_count
from .method_patch import NEW_START_KEY, PROBE_KEY, RUN_STATE_PREFIX, probe_options
from .procreate_hook import decode_images, embed_frames
from .progress import progress_reporter

NODE_TITLE = "Early Copy Redraw"
WRAPPER_PREFIX = f"{RUN_STATE_PREFIX}redraw_"  # SAMPLER_SAMPLE wrapper key: "shield_redraw_<patch id>"
_PROBE_NUMBERS = itertools.count(1)  # unique across runs and patches: a probe's state is keyed by it


def _indices(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(torch.nonzero(mask.cpu()).flatten().tolist())


def _stop_if_asked(*_step) -> None:
    """A probe's sampler callback: the Stop button ends a long look-ahead between two of its steps."""
    comfy.model_management.throw_exception_if_processing_interrupted()


# -- the record (what the Report, the frontend and the benches read) --------------------------------
class RedrawStep(StepEntry):
    """One entry per check (the last evaluation of a probe) and per evaluation of the real run.

    attempt: the check's number (1, 2, ...), 0 for the real run's evaluations;
    similarity: at a check, each sample's cosine to its nearest shield (empty in the real run);
    touched: at a check, the samples given a new noise after it; in the real run, the samples that start
    from a noise other than their own.
    """

    attempt: int
    similarity: list[float]


class RedrawSummary(TypedDict):
    attempts: list[int]  # checks each sample went through
    redrawn_samples: list[int]  # samples that start from a new noise
    exhausted_samples: list[int]  # samples still within `similarity` at every check (the least similar noise kept)
    check_similarity: list[float]  # per sample, the similarity at the check of the noise it was sampled from
    probe_steps: float  # sampler steps spent in probes, in whole batches (a probe of 2 of 8 samples: 1/4 a step)
    check_sigma: float
    shields: int
    similarity: float
    embedder: str
    memory_id: Optional[str]


REDRAW_RECORD = MethodRecord(
    kind="early_copy_redraw",
    title=NODE_TITLE,
    step=RedrawStep,
    summary=RedrawSummary,
    chart=Curves(value="similarity", label="cosine to nearest shield at each check"),
    headline=("shields", "probe_steps"),
)


@dataclasses.dataclass(frozen=True)
class RedrawSettings:
    similarity: float = 0.5  # heading into a shield: cosine of x̂0's embedding to it at or above this
    check_percent: float = 0.3  # where the check is, as a share of the schedule
    max_attempts: int = 32  # checks per sample, the first one included

    def validate(self) -> None:
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"{NODE_TITLE}: similarity must lie in [-1, 1], got {self.similarity}")
        if not 0.0 < self.check_percent < 1.0:
            raise ValueError(f"{NODE_TITLE}: check_percent must lie in (0, 1), got {self.check_percent}")
        if not 1 <= self.max_attempts <= 1000:
            raise ValueError(f"{NODE_TITLE}: max_attempts must lie in [1, 1000], got {self.max_attempts}")


@dataclasses.dataclass
class RunState(EmbeddedShieldsRun):
    checked: Optional[torch.Tensor] = None  # a probe's x̂0 at its last evaluation
    acting: Optional[torch.Tensor] = None  # a probe's per-sample gate at that evaluation (None: all samples)
    redrawn: Optional[torch.Tensor] = None  # bool [B], set before the real run
    summary: dict = dataclasses.field(default_factory=dict)


class EarlyCopyRedrawPatch(EmbeddedShieldsPatch[RedrawSettings, RunState]):
    """One node execution: the VAE that decodes x̂0, the embedder, the shields and the settings."""

    method = REDRAW_RECORD
    run_state = RunState

    def summarize(self, state: RunState) -> dict:
        looked_ahead = state.summary or dict(  # a run that did not look ahead (a nested guider, a nested batch)
            attempts=[], redrawn_samples=[], exhausted_samples=[], check_similarity=[], probe_steps=0,
            check_sigma=float("nan"),
        )  # fmt: skip
        return dict(
            **looked_ahead,
            shields=shield_count(state.shields),
            similarity=self.settings.similarity,
            embedder=self.embedder.key,
            memory_id=self.shields.memory_id or None,
        )

    def attach(self, model_patcher) -> None:
        super().attach(model_patcher)

        def shield_redraw_wrapper(executor, guider, sigmas, extra_args, callback, noise, *rest):
            options = extra_args.get("model_options") or {}
            if options.get(PROBE_KEY) is None and noise.ndim >= 4 and not noise.is_nested:
                state = self.current_run()
                noise = self._redraw(state, executor, guider, sigmas, extra_args, noise, rest)
                new_starts = (*options.get(NEW_START_KEY, ()), *_indices(state.redrawn))
                extra_args = {**extra_args, "model_options": {**options, NEW_START_KEY: new_starts}}
            return executor(guider, sigmas, extra_args, callback, noise, *rest)

        wrapper_type = comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE
        key = f"{WRAPPER_PREFIX}{self.patch_id}"
        model_patcher.remove_wrappers_with_key(wrapper_type, key)
        model_patcher.add_wrapper_with_key(wrapper_type, key, shield_redraw_wrapper)

    # -- the hook: hands a probe's last x̂0 to the wrapper, records the real run -----------------------
    def step(self, state: RunState, args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        if (args.get("model_options") or {}).get(PROBE_KEY) is not None:
            state.checked = denoised
            state.acting = self.acting_samples(args, denoised.shape[0])
            return denoised
        batch = denoised.shape[0]
        redrawn = state.redrawn.tolist() if state.redrawn is not None else [False] * batch
        state.record.add_step(
            sigma=args["sigma"].reshape(-1).float().tolist(),
            in_window=False,
            touched=redrawn[:batch],
            attempt=0,
            similarity=[],
        )
        return denoised

    # -- the look-ahead ------------------------------------------------------------------------------
    def _redraw(self, state: RunState, executor, guider, sigmas, extra_args, noise, rest) -> torch.Tensor:
        """The starting noise of each sample after the checks (its own unless it headed into a shield)."""
        settings, batch = self.settings, noise.shape[0]
        model_sampling = guider.model_patcher.get_model_object("model_sampling")
        check_sigma = float(model_sampling.percent_to_sigma(settings.check_percent))
        steps = rm.probe_length(sigmas, check_sigma)
        current = noise.clone()
        options = extra_args.get("model_options") or {}
        by_rows = len(rest) >= 2 and ss.subset_sampling(executor.class_obj, guider, options, batch, *rest[:2])
        sample_steps = 0  # probe steps times the samples probed
        best_noise, best_similarity = noise.clone(), torch.full((batch,), float("inf"))
        pending = torch.ones(batch, dtype=torch.bool)
        attempts, similarity = torch.zeros(batch, dtype=torch.long), torch.zeros(batch)
        on_check = progress_reporter()
        for attempt in range(1, settings.max_attempts + 1):
            on_check(attempt - 1, settings.max_attempts)
            rows = torch.nonzero(pending).flatten() if by_rows else torch.arange(batch)
            sample_steps += steps * len(rows)
            measured, acting = self._look_ahead(
                state, executor, guider, sigmas[: steps + 1], extra_args, current, rows, noise, rest
            )
            measured = similarity.index_put((rows,), measured)
            acting = torch.zeros(batch, dtype=torch.bool).index_put((rows,), acting)
            similarity = torch.where(pending, measured, similarity)
            attempts += pending.long()
            best_noise, best_similarity = rm.keep_best(best_noise, best_similarity, current, similarity)
            heading = rm.heading_into(measured, settings.similarity) & pending & acting
            again = heading if attempt < settings.max_attempts else torch.zeros_like(heading)
            state.record.add_step(
                sigma=[check_sigma] * batch, in_window=True, touched=again.tolist(), attempt=attempt,
                similarity=measured.tolist(),
            )  # fmt: skip
            pending = heading
            if not bool(again.any()):
                break
            fresh = rm.fresh_noise(tuple(noise.shape), int(extra_args.get("seed") or 0), attempt)
            current = torch.where(self._rows(again, noise), fresh.to(noise), current)
        on_check(settings.max_attempts, settings.max_attempts)
        exhausted = pending
        chosen = torch.where(self._rows(exhausted, noise), best_noise, current)
        final_similarity = torch.where(exhausted, best_similarity, similarity)
        state.redrawn = (chosen != noise).flatten(1).any(dim=1).cpu()
        state.summary = dict(
            attempts=attempts.tolist(),
            redrawn_samples=list(_indices(state.redrawn)),
            exhausted_samples=torch.nonzero(exhausted).flatten().tolist(),
            check_similarity=final_similarity.tolist(),
            probe_steps=round(sample_steps / batch, 3),
            check_sigma=check_sigma,
        )
        return chosen

    def _look_ahead(self, state: RunState, executor, guider, sigmas, extra_args, noise, rows, own_noise, rest):
        """Run `sigmas` (the steps up to the check) from `noise` as a probe of the samples `rows` (the whole
        batch unless `sample_subset.subset_sampling` allows fewer); returns each probed sample's similarity to its
        nearest shield at the last evaluation and whether the gates let the method act on it (bool [len(rows)])."""
        probe = next(_PROBE_NUMBERS)
        options = extra_args.get("model_options") or {}
        new_starts = (noise[rows] != own_noise[rows]).flatten(1).any(dim=1)
        new_starts = (*options.get(NEW_START_KEY, ()), *_indices(new_starts))
        probe_args = {**extra_args, "model_options": probe_options(options, probe, new_starts)}
        batch = noise.shape[0]
        if len(rows) == batch:
            executor(guider, sigmas, probe_args, _stop_if_asked, noise, *rest[:2], True)
        else:
            latent_image, denoise_mask = (ss.take_rows(tensor, rows) for tensor in rest[:2])
            with ss.rows_of(guider, rows, batch):
                executor(guider, sigmas, probe_args, _stop_if_asked, noise[rows], latent_image, denoise_mask, True)
        checked = self.probe_run(probe)
        if checked.checked is None:
            raise RuntimeError(f"{NODE_TITLE}: the look-ahead ran no model evaluation (another patch skipped it?)")
        measured = self._nearest_similarity(state, checked.checked, guider.inner_model)
        acting = checked.acting if checked.acting is not None else torch.ones_like(measured, dtype=torch.bool)
        return measured, acting

    # -- pieces -------------------------------------------------------------------------------------
    @staticmethod
    def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return mask.reshape(-1, *[1] * (like.ndim - 1)).to(like.device)

    def _nearest_similarity(self, state: RunState, x0: torch.Tensor, model) -> torch.Tensor:
        """Cosine of each sample's decoded x̂0 to its nearest shield ([B]; −1 without shields). Video: the most
        similar frame."""
        if state.shields is None or not state.shields.numel():
            return torch.full((x0.shape[0],), -1.0)
        comfy.model_management.load_models_gpu([self.vae.patcher])
        with torch.no_grad():
            images = decode_images(self.vae, self.vae.first_stage_model, model, x0.float())
            if images.ndim == 5:
                embedded = esm.unit_embeddings(embed_frames(self.embedder, images).flatten(0, 1))
                embedded = embedded.reshape(images.shape[0], images.shape[1], -1)
            else:
                embedded = esm.unit_embeddings(self.embedder.embed(images))[:, None]
            shields = state.shields.to(embedded.device, embedded.dtype)
            return (embedded @ shields.T).amax(dim=(1, 2)).float().cpu()
