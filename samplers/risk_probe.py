"""Memorization Risk inside ComfyUI: a short probe of the model at the start of the schedule, and the
per-sample gate that lets the Shield methods act only on the samples the probe flags.

The probe (Wen et al., ICLR 2024, §3; the score is risk_math.step_magnitude) reproduces the start of
the KSampler run it stands for: the same noise (`comfy.sample.prepare_noise` with the run's seed and
latent, `batch_index` included), the same sigma schedule (sampler, scheduler, steps, denoise, as
`comfy.samplers.KSampler` computes it) and the same conditioning path (ComfyUI's own sampling code,
through `comfy.sample.sample_custom`). It evaluates the cond and uncond predictions at the schedule's
first N sigmas and records ‖D_c − D_u‖/σ per sample at each. The first evaluation is, for every
sampler, the very one the KSampler makes; between evaluations the probe takes an Euler step of the
CFG prediction, so with N > 1 the later evaluations equal the KSampler's for `euler` and approximate
them for other samplers. Cost: N model calls on the batch of cond + uncond, i.e. 2N model evaluations
per sample (a 20-step run costs 40).

The gate (`RiskGate`) is stored in the model's options by the Shield Gate node; every MethodPatch reads
it (method_patch.acting_samples) and acts only on the flagged samples. It checks that the sampler
starts from the noise the probe saw (‖x‖ of each sample at σ_0), so a seed that differs between the
risk node and the sampler is an error, not a silently wrong gate.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import comfy.model_management
import comfy.sample
import comfy.samplers
import torch

from .method_patch import new_start_samples, without_shield_patches
from .risk_math import FLAG_RULES, flags, prompt_score, sample_score, step_magnitude

FIRST_INPUT_RTOL = 1e-4  # the gate's check that the sampler's first input is the probe's


@dataclasses.dataclass(frozen=True)
class RiskResult:
    """The probe's answer for one batch (the SHIELD_RISK socket's value).

    scores: per sample, the `statistic` of the per-step ‖D_c − D_u‖/σ (risk_math.sample_score: their
    mean, "magnitude", or first over last, "drop"); flagged: by `flag_rule` (risk_math.flags), "per sample"
    score >= threshold (core/metrics.py's detector convention), or "per prompt (batch mean)" every sample
    flagged when the batch's mean score (`batch_mean`, risk_math.prompt_score) >= threshold.
    step_scores: [steps][samples]; sigmas: the probed sigmas; model_evaluations: per sample (cond +
    uncond at each probed step). first_input_norms / first_sigma: ‖x‖ per sample at the first evaluation,
    so the gate can check that a sampler starts from the same noise.
    """

    scores: tuple[float, ...]
    flagged: tuple[bool, ...]
    threshold: float
    step_scores: tuple[tuple[float, ...], ...]
    sigmas: tuple[float, ...]
    model_evaluations: int
    first_input_norms: tuple[float, ...]
    first_sigma: float
    seed: int
    statistic: str = "magnitude"
    flag_rule: str = FLAG_RULES[0]

    @property
    def batch_size(self) -> int:
        return len(self.scores)

    @property
    def per_prompt(self) -> bool:
        return self.flag_rule == FLAG_RULES[1]

    @property
    def batch_mean(self) -> float:
        """The batch's prompt score: the mean of its samples' scores (risk_math.prompt_score)."""
        return prompt_score(torch.tensor(self.scores, dtype=torch.float64), self.batch_size)

    def text(self) -> str:
        flagged = sum(self.flagged)
        head = (
            f"Memorization risk, {len(self.sigmas)} probe step(s), score {self.statistic}, "
            f"{self.model_evaluations} model evaluations per sample: "
        )
        if self.per_prompt:
            where = "at or above" if flagged else "below"
            head += (
                f"flagged per prompt (batch mean): the mean of the {self.batch_size} sample(s), "
                f"{self.batch_mean:.4g}, is {where} the per-prompt threshold {self.threshold:g}, "
                f"{flagged}/{self.batch_size} sample(s) flagged"
            )
        else:
            head += f"{flagged}/{self.batch_size} sample(s) at or above {self.threshold:g}"
        lines = [head]
        for sample, (score, flag) in enumerate(zip(self.scores, self.flagged, strict=True)):
            lines.append(f"  sample {sample}: {score:.4g}{'  AT RISK' if flag else ''}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def undefined_score_error(reason: str) -> ValueError:
    return ValueError(
        f"Memorization Risk: the score is undefined here: {reason}. The score is ‖D_cond − D_uncond‖/σ, the "
        "difference between the prediction with the prompt and without it (Wen et al. §3); a run at cfg 1 never "
        "evaluates the unconditional prediction (ComfyUI skips it), and guidance-distilled models such as Flux are "
        "run exactly that way, with the guidance baked into the model and no negative pass. Use it with a model "
        "sampled at cfg > 1 with a negative prompt (an empty prompt works), or leave this node out for this model."
    )


def check_defined(cfg: float, negative, model_patcher) -> None:
    """Raise the clear error when the run the probe stands for has no unconditional prediction."""
    if math.isclose(cfg, 1.0):
        distilled = _guidance_distilled(model_patcher)
        extra = " (and this model is guidance-distilled)" if distilled else ""
        raise undefined_score_error(f"'cfg' is 1{extra}, so the sampler evaluates no unconditional prediction")
    if not negative:
        raise undefined_score_error("'negative' holds no conditioning, so there is no unconditional prediction")


def _guidance_distilled(model_patcher) -> bool:
    """Whether the model embeds a guidance scale instead of running a negative pass (Flux dev)."""
    config = getattr(getattr(model_patcher.model, "model_config", None), "unet_config", {}) or {}
    return bool(config.get("guidance_embed", False))


def schedule_sigmas(model_patcher, steps: int, sampler_name: str, scheduler: str, denoise: float) -> torch.Tensor:
    """The sigmas a KSampler with these settings uses (ComfyUI's own computation)."""
    sampler = comfy.samplers.KSampler(
        model_patcher,
        steps=steps,
        device="cpu",
        sampler=sampler_name,
        scheduler=scheduler,
        denoise=denoise,
        model_options=model_patcher.model_options,
    )
    return sampler.sigmas.detach().to("cpu", torch.float32)


class _Recorder:
    """The probe's pre-CFG hook: records the score of every evaluation, leaves the predictions alone."""

    def __init__(self):
        self.step_scores: list[list[float]] = []
        self.sigmas: list[float] = []
        self.first_input_norms: Optional[list[float]] = None

    def __call__(self, args: dict) -> list:
        conds_out = args["conds_out"]
        if len(conds_out) < 2 or args["conds"][1] is None:
            raise undefined_score_error("the sampler ran without an unconditional prediction")
        sigma = args["sigma"].reshape(-1)
        self.step_scores.append(step_magnitude(conds_out[0], conds_out[1], sigma).tolist())
        self.sigmas.append(float(sigma.max()))
        if self.first_input_norms is None:
            self.first_input_norms = input_norms(args["input"])
        return conds_out


def input_norms(x: torch.Tensor) -> list[float]:
    return x.detach().to("cpu", torch.float64).flatten(1).norm(dim=1).tolist()


def _euler_probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """A sampler function (k-diffusion signature): evaluate at each sigma but the last, Euler in between."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@dataclasses.dataclass(frozen=True)
class KSamplerSettings:
    """What the probed KSampler run is sampled with (the KSampler node's widgets)."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str = "euler"
    scheduler: str = "normal"
    denoise: float = 1.0


def probe(
    model_patcher,
    positive,
    negative,
    latent: dict,
    run: KSamplerSettings,
    probe_steps: int,
    threshold: float,
    statistic: str = "magnitude",
    flag_rule: str = FLAG_RULES[0],
) -> RiskResult:
    """Score every sample of the batch the KSampler with these settings would sample (module doc)."""
    seed, cfg = run.seed, run.cfg
    if flag_rule not in FLAG_RULES:
        raise ValueError(f"Memorization Risk: unknown flag rule {flag_rule!r}; expected one of {FLAG_RULES}")
    check_defined(cfg, negative, model_patcher)
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    if latent_image.is_nested:
        raise ValueError("Memorization Risk: nested (multi-part) latents are not supported; connect an image latent")
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = schedule_sigmas(model_patcher, run.steps, run.sampler_name, run.scheduler, run.denoise)
    if len(sigmas) < 2 or float(sigmas[0]) <= 0:
        raise ValueError(
            f"Memorization Risk: steps {run.steps} with denoise {run.denoise} leave no step to probe; raise "
            "'denoise' or 'steps'"
        )
    probe_sigmas = sigmas[: min(probe_steps, len(sigmas) - 1) + 1]
    if statistic == "drop" and len(probe_sigmas) < 3:
        raise ValueError(
            f"Memorization Risk: the 'drop' score needs at least 2 probe steps, and probe_steps {probe_steps} with "
            f"{run.steps} steps gives {len(probe_sigmas) - 1}; raise 'probe_steps' (and 'steps'), or use 'magnitude'"
        )
    recorder = _Recorder()
    model = without_shield_patches(model_patcher.clone())  # a probe is not a run: no records, no memory writes
    model.model_options["sampler_pre_cfg_function"] = [recorder] + list(
        model.model_options.get("sampler_pre_cfg_function", [])
    )
    model.model_options["disable_cfg1_optimization"] = True
    comfy.sample.sample_custom(
        model,
        noise,
        cfg,
        comfy.samplers.KSAMPLER(_euler_probe),
        probe_sigmas,
        positive,
        negative,
        latent_image,
        noise_mask=latent.get("noise_mask"),
        disable_pbar=True,
        seed=seed,
    )
    per_step = torch.tensor(recorder.step_scores, dtype=torch.float64)  # [steps, B]
    scores = sample_score(per_step, statistic).tolist()
    return RiskResult(
        scores=tuple(scores),
        flagged=flags(tuple(scores), threshold, flag_rule),
        threshold=float(threshold),
        step_scores=tuple(tuple(row) for row in recorder.step_scores),
        sigmas=tuple(recorder.sigmas),
        model_evaluations=2 * len(recorder.sigmas),
        first_input_norms=tuple(recorder.first_input_norms or ()),
        first_sigma=float(probe_sigmas[0]),
        seed=int(seed),
        statistic=statistic,
        flag_rule=flag_rule,
    )


# -- the gate --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RiskGate:
    """A SampleGate (method_patch.py) from a probe: the Shield methods act on the flagged samples only.
    A plain frozen dataclass, so the deep copy of model options in ModelPatcher.clone() copies it whole."""

    risk: RiskResult

    def __call__(self, args: dict) -> torch.Tensor:
        x = args["input"]
        if x.shape[0] != self.risk.batch_size:
            raise ValueError(
                f"Shield Gate: the risk was measured on a batch of {self.risk.batch_size} but the sampler runs "
                f"{x.shape[0]} samples; connect the same latent to Memorization Risk and to the sampler"
            )
        sigma = float(args["sigma"].reshape(-1).max())
        if math.isclose(sigma, self.risk.first_sigma, rel_tol=1e-5):
            self._check_same_noise(x, new_start_samples(args))
        return torch.tensor(self.risk.flagged, dtype=torch.bool)

    def _check_same_noise(self, x: torch.Tensor, new_starts: tuple[int, ...]) -> None:
        """Every sample but those a look-ahead gave a new start (Early Copy Redraw) must start from its noise."""
        same = torch.ones(x.shape[0], dtype=torch.bool)
        same[list(new_starts)] = False
        expected = torch.tensor(self.risk.first_input_norms, dtype=torch.float64)[same]
        found = torch.tensor(input_norms(x), dtype=torch.float64)[same]
        if not torch.allclose(found, expected, rtol=FIRST_INPUT_RTOL, atol=0.0):
            raise ValueError(
                "Shield Gate: the sampler does not start from the noise the risk was measured on (seed "
                f"{self.risk.seed}); give Memorization Risk the sampler's seed, latent, steps, scheduler, sampler "
                "and denoise (convert the KSampler's seed to an input and link both to one seed value, with "
                "control_after_generate fixed)"
            )
