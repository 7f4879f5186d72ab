"""ProCreate energy guidance as a ComfyUI post-CFG hook (paper §4; math in `procreate_math`).

At each step inside the active window, for every sample whose one-step x̂0 is more similar to its
nearest reference than the threshold, the hook computes ∇_x g of g = γ·max_i cos(f(decode(x̂0)), f(ref_i))
and returns the guided denoised D' (see `procreate_math` for the derivation). Two gradient modes:

- exact: autograd through the look-ahead (the model with the sampler's conds and CFG), the VAE
  decoder and the embedder, as the paper. The weights a ComfyUI loader node built are inference
  tensors, which autograd cannot save; `embedders.autograd_through` gives the diffusion model and the
  decoder normal tensors on the same storage for the duration of the gradient, so no weight is copied
  (BENCHMARKS.md: peak memory of exact vs fast vs plain on the Flux fixture). Saved activations are
  copied as they are saved (`embedders.saved_tensors_copied`): ComfyUI's Flux updates some in place.
- fast: x̂0 (one-step or look-ahead) without gradient, then ∂g/∂x̂0 through decoder and embedder
  only, with ∂x̂0/∂x ≈ I/a (the Jacobian of D = (x − s·ε)/a at fixed ε). No backward through the UNet.

A sample whose gradient is NaN/inf is left unguided for that step and counted in the run record.
Look-ahead calls the model through `calc_cond_batch` and plain CFG (or the model's single-slot
`sampler_cfg_function` if set), not through other patches' pre/post-CFG hooks: those keep per-step
state that extra evaluations must not disturb.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from contextlib import nullcontext
from typing import Any, Optional

import comfy.model_management
import comfy.samplers
import numpy as np
import torch
from typing_extensions import TypedDict

from ..core.bounded_cache import BoundedCache
from ..core.records import Curves, MethodRecord, StepEntry
from ..core.shield_set import ShieldSet, ShieldSetError
from . import procreate_math as pm
from .embedders import Embedder, autograd_through, saved_tensors_copied
from .latent_space import from_model_space
from .method_patch import MethodPatch, MethodRun, memory_id_of, read_memory, window_problem
from .run_state import RunContext

logger = logging.getLogger(__name__)


# -- the record (what the Report, the frontend and the benches read) --------------------------------
class ProCreateStep(StepEntry, total=False):
    """One evaluation; `touched` marks the samples the guidance moved. Fields present once measured:

    similarity: cosine of each sample's x̂0 to its nearest reference; nearest: that reference's index;
    references: 0 when the run had no references (and no intra-batch) so nothing was measured;
    skipped_nonfinite: samples whose gradient was NaN/inf (left unguided); grad_norm / clipped_norm:
    the gradient's norm per sample before and after clipping (at guided steps).
    """

    similarity: list[float]
    nearest: list[int]
    references: int
    skipped_nonfinite: list[bool]
    grad_norm: list[float]
    clipped_norm: list[float]


class ProCreateSummary(TypedDict):
    guided_steps: int
    skipped_nonfinite: int
    references: int
    memory_id: Optional[str]
    embedder: str
    settings: dict


def describe_procreate(curves) -> list[str]:
    similarity = curves.field("similarity")
    if similarity is None or not np.isfinite(similarity).any():
        return []
    measured = [row for row in similarity if np.isfinite(row).any()]
    first, last = np.nanmax(measured[0]), np.nanmax(measured[-1])
    return [f"  max nearest-reference similarity: first measured step {first:.3g}, last {last:.3g}"]


PROCREATE_RECORD = MethodRecord(
    kind="procreate",
    title="ProCreate",
    step=ProCreateStep,
    summary=ProCreateSummary,
    chart=Curves(value="similarity", label="cosine to nearest reference", marker_label="dot: guided"),
    describe=describe_procreate,
    headline=("references",),
)

GRADIENT_MODES = ("exact", "fast")
MIN_SIGNAL_SCALE = 1e-3  # flow models at σ = 1 have no signal left: eq. 4 would divide by zero


@dataclasses.dataclass(frozen=True)
class ProCreateSettings:
    gamma: float = 100.0
    element_clip: float = 1.0
    max_grad_norm: float = 0.5
    look_ahead_steps: int = 0
    start_percent: float = 0.0
    end_percent: float = 1.0
    gradient_mode: str = "exact"
    similarity_threshold: float = -1.0
    intra_batch: bool = False

    def validate(self) -> None:
        if self.gamma < 0:
            raise ValueError(f"ProCreate Energy Guidance: strength (γ) must be ≥ 0, got {self.gamma}; 0 turns it off")
        if self.gradient_mode not in GRADIENT_MODES:
            raise ValueError(
                f"ProCreate Energy Guidance: gradient_mode must be one of {GRADIENT_MODES}, got {self.gradient_mode!r}"
            )
        window = window_problem("ProCreate Energy Guidance", self.start_percent, self.end_percent)
        if window:
            raise ValueError(window)
        if self.look_ahead_steps < 0:
            raise ValueError(f"ProCreate Energy Guidance: look_ahead_steps must be ≥ 0, got {self.look_ahead_steps}")


# -- reference embeddings, cached per (embedder, item) so a growing set only embeds its new items --
EMBEDDING_CACHE: BoundedCache[tuple[str, str], torch.Tensor] = BoundedCache(8192)


def reference_embeddings(
    reference: ShieldSet,
    embedder: Embedder,
    batch_size: int = 8,
    decode=None,
    where: str = "ProCreate Energy Guidance: the reference set",
) -> torch.Tensor:
    """[K, D] embeddings of the set's items: from the set itself, the cache, or computed once.

    Items without images (a Shield Memory holds only latents) are decoded with `decode(latents) -> IMAGE`
    when it is given. The cache is keyed by (embedder, item hash), so a growing set embeds only its new items.
    `where` names the node and input in the error for a set that cannot be embedded.
    """
    stored = reference.embeddings.get(embedder.key)
    if stored is not None:
        return stored.float()
    if reference.images is None and decode is None:
        raise ShieldSetError(
            f"{where} ({reference.describe()}) has no images and no "
            f"embeddings for embedder {embedder.key!r}. Build it from images (Shield Reference Set from "
            f"Images, or Shield Set from Images with images kept) using this embedder."
        )
    cached = {h: EMBEDDING_CACHE.get((embedder.key, h)) for h in reference.hashes}
    missing = [i for i, h in enumerate(reference.hashes) if cached[h] is None]
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        with torch.no_grad():
            images = reference.images[chunk] if reference.images is not None else decode(reference.latents[chunk])
            embedded = embedder.embed(images).float().cpu()
        for index, embedding in zip(chunk, embedded, strict=True):
            EMBEDDING_CACHE.put((embedder.key, reference.hashes[index]), embedding)
            cached[reference.hashes[index]] = embedding
    if not reference.hashes:
        return torch.zeros(0, 0)
    return torch.stack([cached[h] for h in reference.hashes])


def cached_embedding_count(embedder_key: str, hashes) -> int:
    """How many of these items already have a cached embedding (for tests and logs)."""
    return sum((embedder_key, h) in EMBEDDING_CACHE for h in hashes)


def check_model_compatibility(
    model_patcher, vae, reference: ShieldSet, node: str = "ProCreate Energy Guidance", set_input: str = "reference_set"
) -> None:
    """Errors naming the input to fix when the VAE or the reference set belongs to another model family.

    What can be told apart: latent channels and dimensions of the VAE vs the model's latent format
    (an SD1.5/SDXL VAE on an SD3/Flux model, an image VAE on a video model) and the latent format
    recorded in the reference set. Two VAEs of one architecture (SD1.5 vs SDXL, both 4-channel) differ
    only in weights and scale, which nothing here can see: use the VAE of the checkpoint. `node` and
    `set_input` name the node and its set input in the errors.
    """
    latent_format = model_patcher.get_model_object("latent_format")
    format_name = type(latent_format).__name__
    model_channels = int(getattr(latent_format, "latent_channels", 0) or 0)
    vae_channels = int(getattr(vae, "latent_channels", model_channels))
    if model_channels and vae_channels != model_channels:
        raise ValueError(
            f"{node}: the 'vae' input works on {vae_channels}-channel latents but the model "
            f"({format_name}) samples {model_channels}-channel latents. Connect the VAE that belongs to this model "
            f"(e.g. the checkpoint's own VAE, not an SD1.5/SDXL VAE on an SD3/Flux model)."
        )
    model_dims = int(getattr(latent_format, "latent_dimensions", 2))
    vae_dims = int(getattr(vae, "latent_dim", model_dims))
    if vae_dims != model_dims:
        raise ValueError(
            f"{node}: the 'vae' input makes {vae_dims}-D latents but the model ({format_name}) "
            f"samples {model_dims}-D latents (image vs video). Connect the VAE that belongs to this model."
        )
    named_family = reference.latent_format and not reference.latent_format.startswith("VAE")
    if len(reference) and named_family and reference.latent_format != format_name:
        raise ShieldSetError(
            f"{node}: the '{set_input}' holds {reference.latent_format} latents but the model "
            f"makes {format_name} latents. Rebuild the reference set with this model's VAE and model connected."
        )
    if len(reference) and model_channels and reference.latents.shape[1] != model_channels:
        raise ShieldSetError(
            f"{node}: the '{set_input}' latents have {reference.latents.shape[1]} channels but "
            f"the model ({format_name}) uses {model_channels}. Rebuild the reference set with this model's VAE."
        )


# -- pieces of one guidance step ------------------------------------------------------------------
def signal_and_noise_scale(model_sampling, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) per sample of x = a·y + s·n, read from the model's own noise_scaling."""
    sigma = sigma.reshape(-1).float()
    ones, zeros = torch.ones(sigma.shape[0], 1), torch.zeros(sigma.shape[0], 1)
    ones, zeros = ones.to(sigma.device), zeros.to(sigma.device)
    signal = model_sampling.noise_scaling(sigma, zeros.clone(), ones.clone()).reshape(-1)
    noise = model_sampling.noise_scaling(sigma, ones.clone(), zeros.clone()).reshape(-1)
    return signal.float(), noise.float()


def cfg_denoised(model, x: torch.Tensor, sigma: torch.Tensor, cond, uncond, cond_scale: float, model_options: dict):
    """The sampler's CFG prediction of `denoised` (conds, scale and model wrappers as the sampler).

    At cfg 1 the uncond is skipped as ComfyUI's sampler skips it (its cfg-1 optimization): on a
    guidance-distilled model (Flux dev) an unconditional pass is not the model's guidance and would only
    double the cost of the look-ahead."""
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond = None
    cond_pred, uncond_pred = comfy.samplers.calc_cond_batch(model, [cond, uncond], x, sigma, model_options)
    if "sampler_cfg_function" in model_options:
        args = {
            "cond": x - cond_pred,
            "uncond": x - uncond_pred,
            "cond_scale": cond_scale,
            "timestep": sigma,
            "input": x,
            "sigma": sigma,
            "cond_denoised": cond_pred,
            "uncond_denoised": uncond_pred,
            "model": model,
            "model_options": model_options,
            "input_cond": cond,
            "input_uncond": uncond,
        }
        return x - model_options["sampler_cfg_function"](args)
    if uncond is None:
        return cond_pred
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def embedder_modules(embedder) -> list[torch.nn.Module]:
    """The torch modules an embedder holds (their weights are never copied by `saved_tensors_copied`)."""
    return [value for value in vars(embedder).values() if isinstance(value, torch.nn.Module)]


def decode_images(vae, first_stage: torch.nn.Module, model, latent: torch.Tensor) -> torch.Tensor:
    """Sampler-space latent -> IMAGE [B, H, W, C] in [0, 1], differentiable (VAE.decode without tiling).
    A video latent [B, C, T, H, W] gives its frames, [B, T', H, W, C]."""
    vae_latent = from_model_space(latent, model.latent_format)
    parameter = next(first_stage.parameters(), None)
    device = parameter.device if parameter is not None else vae_latent.device
    pixels = first_stage.decode(vae_latent.to(device=device, dtype=vae.vae_dtype))
    return vae.process_output(pixels.float()).movedim(1, -1)


def embed_frames(embedder: Embedder, frames: torch.Tensor) -> torch.Tensor:
    """Embed each frame of decoded clips [B, T, H, W, C] -> [B, T, D]."""
    return embedder.embed(frames.flatten(0, 1)).reshape(*frames.shape[:2], -1)


@dataclasses.dataclass
class RunState(MethodRun):
    guided_steps: int = 0
    skipped_nonfinite: int = 0
    schedule: Optional[torch.Tensor] = None
    references: Optional[torch.Tensor] = None  # [K, D] for this run (a memory grows between runs)
    reference_count: int = 0

    def remaining_steps(self, sigma: float) -> Optional[int]:
        """Sampler steps left after the one at `sigma` (None outside a run: no cap)."""
        if self.schedule is None:
            return None
        return int((self.schedule < sigma * (1 - 1e-5)).sum())


class ProCreateGuidance(MethodPatch[ProCreateSettings, RunState]):
    """One ProCreate patch: the settings, the decoder, the embedder and the references."""

    method = PROCREATE_RECORD

    def __init__(
        self,
        vae,
        embedder: Embedder,
        reference: ShieldSet,
        settings: ProCreateSettings,
        patch_id: Optional[str] = None,
    ):
        settings.validate()
        super().__init__(settings, label=embedder.key, patch_id=patch_id)
        self.vae = vae
        self.embedder = embedder
        self.reference = reference
        self.memory_id = memory_id_of(reference)
        # a Shield Memory is read afresh at every run start; a fixed set is embedded once, here
        self.references = None if self.memory_id else reference_embeddings(reference, embedder)
        self.latent_format = reference.latent_format

    # -- the contract -----------------------------------------------------------------------------
    def check_model(self, model_patcher) -> None:
        check_model_compatibility(model_patcher, self.vae, self.reference)

    def memory_ids(self) -> list[str]:
        return [self.memory_id] if self.memory_id else []

    def new_run(self, record, context: Optional[RunContext]) -> RunState:
        schedule = context.sigmas.detach().float().cpu().clone() if context is not None else None
        references = self._run_references()
        state = RunState(record=record, schedule=schedule)
        state.references, state.reference_count = references, int(references.shape[0])
        return state

    def summarize(self, state: RunState) -> dict:
        return dict(
            guided_steps=state.guided_steps,
            skipped_nonfinite=state.skipped_nonfinite,
            references=state.reference_count,
            memory_id=self.memory_id or None,
            embedder=self.embedder.key,
            settings=dataclasses.asdict(self.settings),
        )

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Remembered latents -> one IMAGE per item; a remembered clip is represented by its middle frame."""
        images = self.vae.decode(latents.to(torch.float32))[..., :3].float().cpu()
        return images[:, images.shape[1] // 2] if images.ndim == 5 else images

    def _run_references(self) -> torch.Tensor:
        if not self.memory_id:
            return self.references
        snapshot = read_memory(self.memory_id)
        return reference_embeddings(snapshot, self.embedder, decode=self._decode_latents)

    # -- the hook -------------------------------------------------------------------------------
    def step(self, state: RunState, args: dict[str, Any]) -> torch.Tensor:
        denoised = args["denoised"]
        model = args["model"]
        sigma_row = args["sigma"].reshape(-1)
        if not self.in_window(state, model, float(sigma_row.max())):
            state.record.add_step(sigma=sigma_row.tolist(), touched=[False] * denoised.shape[0], in_window=False)
            return denoised
        self._check_channels(args["input"])
        comfy.model_management.load_models_gpu([self.vae.patcher])
        first_stage = self.vae.first_stage_model
        with torch.inference_mode(False), torch.enable_grad(), autograd_through(first_stage):
            guided = self._guide(state, args, first_stage)
        return denoised if guided is None else guided.to(denoised.dtype)

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.ndim not in (4, 5):
            raise ValueError(
                f"ProCreate Energy Guidance supports image latents [B, C, H, W] and video latents [B, C, T, H, W]; "
                f"got shape {tuple(x.shape)}"
            )
        if x.ndim == 5 and self.settings.intra_batch:
            raise ValueError(
                "ProCreate Energy Guidance: intra_batch is not supported for video clips (frames of one clip are "
                "alike by design). Turn intra_batch off, and use Sparse Repellency's intra_batch for diverse clips."
            )
        vae_channels = getattr(self.vae, "latent_channels", x.shape[1])
        if vae_channels != x.shape[1]:
            raise ValueError(
                f"ProCreate Energy Guidance: the VAE input decodes {vae_channels}-channel latents but the model "
                f"samples {x.shape[1]}-channel latents. Connect the VAE that belongs to this model."
            )

    def _guide(self, state: RunState, args: dict[str, Any], first_stage: torch.nn.Module) -> Optional[torch.Tensor]:
        model, settings = args["model"], self.settings
        x, denoised = args["input"].clone().float(), args["denoised"].clone().float()
        sigma = args["sigma"].clone().float().reshape(-1).expand(x.shape[0]).contiguous()
        signal, noise = signal_and_noise_scale(model.model_sampling, sigma)
        if state.reference_count == 0 and not (settings.intra_batch and x.shape[0] > 1):
            state.record.add_step(sigma=sigma.tolist(), touched=[False] * x.shape[0], in_window=True, references=0)
            return None
        with torch.no_grad():
            embeddings = self._embed(decode_images(self.vae, first_stage, model, denoised), video=x.ndim == 5)
        references = (
            state.references.to(embeddings.device)
            if state.reference_count
            else embeddings.new_zeros(0, embeddings.shape[-1])
        )
        with torch.no_grad():
            if x.ndim == 5:  # a clip is as close to a reference as its closest frame
                similarity, nearest = pm.nearest_reference_over_frames(embeddings, references)
            else:
                similarity, nearest = pm.nearest_reference(embeddings, references, batch=settings.intra_batch)
        # a non-finite similarity goes on to the gradient, where it is skipped and reported
        above = (similarity > settings.similarity_threshold) | ~torch.isfinite(similarity)
        active = above & (signal > MIN_SIGNAL_SCALE)
        acting = self.acting_samples(args, x.shape[0])
        if acting is not None:
            active = active & acting.to(active.device)
        entry = {"sigma": sigma.tolist(), "similarity": similarity.tolist(), "nearest": nearest.tolist()}
        if not bool(active.any()):
            state.record.add_step(**entry, touched=active.tolist(), in_window=True)
            return None

        grad_x = self._gradient(state, args, x, sigma, denoised, signal, active, references, first_stage)
        finite = torch.isfinite(grad_x.flatten(1)).all(dim=1)
        skipped = active & ~finite
        active = active & finite
        per_sample = active.reshape(-1, *[1] * (x.ndim - 1))
        grad_x = torch.where(per_sample, grad_x, torch.zeros_like(grad_x))
        grad_vp = pm.to_vp_gradient(grad_x, signal, noise)
        clipped = pm.clip_gradient(grad_vp, settings.gamma, settings.element_clip, settings.max_grad_norm)
        guided = pm.guided_denoised(denoised, clipped, signal, noise)
        guided = torch.where(per_sample, guided, args["denoised"].float())
        state.guided_steps += 1
        state.skipped_nonfinite += int(skipped.sum())
        if bool(skipped.any()):
            logger.warning(
                "ProCreate: non-finite gradient for samples %s at sigma %.4g; step left unguided",
                skipped.nonzero().flatten().tolist(),
                float(sigma.max()),
            )
        state.record.add_step(
            **entry,
            touched=active.tolist(),
            in_window=True,
            skipped_nonfinite=skipped.tolist(),
            grad_norm=grad_vp.flatten(1).norm(dim=1).tolist(),
            clipped_norm=clipped.flatten(1).norm(dim=1).tolist(),
        )
        return guided.detach()

    def _gradient(self, state, args, x, sigma, denoised, signal, active, references, first_stage) -> torch.Tensor:
        """∇_x of Σ_{active b} g_b (samples are independent, so each row is that sample's own ∇g)."""
        model, settings = args["model"], self.settings
        mask = active.float()

        video = x.ndim == 5

        def energy_of(latent):
            embeddings = self._embed(decode_images(self.vae, first_stage, model, latent), video)
            if video:
                g = pm.energy_over_frames(embeddings, references, settings.gamma)
            else:
                g, _ = pm.energy(embeddings, references, settings.gamma, batch=settings.intra_batch)
            return (g * mask).sum()

        if settings.gradient_mode == "fast":
            with torch.no_grad():
                x0 = self._look_ahead(state, args, x, sigma, first_denoised=denoised)
            x0 = x0.detach().requires_grad_(True)
            with saved_tensors_copied(first_stage, *embedder_modules(self.embedder)) if video else nullcontext():
                (grad_x0,) = torch.autograd.grad(energy_of(x0), x0)
            return grad_x0 / signal.reshape(-1, *[1] * (x.ndim - 1))

        x_var = x.detach().requires_grad_(True)
        modules = [model.diffusion_model, first_stage] + embedder_modules(self.embedder)
        with autograd_through(model.diffusion_model), saved_tensors_copied(*modules):
            x0 = self._look_ahead(state, args, x_var, sigma, first_denoised=None)
            (grad_x,) = torch.autograd.grad(energy_of(x0), x_var)
        return grad_x

    def _embed(self, images: torch.Tensor, video: bool) -> torch.Tensor:
        """[B, D] for images [B, H, W, C]; [B, T, D] for the frames of clips [B, T, H, W, C]."""
        return embed_frames(self.embedder, images) if video else self.embedder.embed(images)

    def _look_ahead(self, state, args, x, sigma, first_denoised):
        model = args["model"]
        steps = self.settings.look_ahead_steps
        remaining = state.remaining_steps(float(sigma.max()))
        if remaining is not None:
            steps = min(steps, max(remaining, 1))
        sampling = model.model_sampling
        cond, uncond = args["cond"], args["uncond"]
        cond_scale, model_options = args["cond_scale"], args["model_options"]

        def denoise(latent, level):
            return cfg_denoised(model, latent, level, cond, uncond, cond_scale, model_options).float()

        return pm.look_ahead(
            x,
            sigma,
            steps,
            denoise,
            percent_to_sigma=lambda p: float(sampling.percent_to_sigma(p)),
            scales=lambda s: signal_and_noise_scale(sampling, s),
            first_denoised=first_denoised,
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
        )
