"""Transition-point CFG inside ComfyUI's sampler: a pre-CFG list hook plus per-run state.

How it plugs in. ComfyUI computes the cond and uncond *denoised* predictions D_c, D_u, passes them
through every `sampler_pre_cfg_function`, then combines them with the sampler's cfg function
(default `D_u + cfg·(D_c − D_u)`, or whatever occupies the single `sampler_cfg_function` slot, such as
RescaleCFG). This hook does not take that slot. For each sample still before its transition it
rewrites the cond prediction so that the sampler's own combination yields the before-guidance g:

    D_c' = D_u + (g / cfg)·(D_c − D_u)   ⇒   D_u + cfg·(D_c' − D_u) = D_u + g·(D_c − D_u).

Because ε = (x − D)/σ (EPS, and likewise the velocity of V-prediction and flow models) is affine in
D, this is ε̂ = ε_u + g·(ε_c − ε_u) exactly in exact arithmetic (to float rounding in practice; g = 0 is
bit-exact) (Algorithm 1 line 9; Eq. 5 for g = −λ). Samples after
their transition are left untouched, so the sampler's cfg (and any cfg function) applies as usual. A
cfg function that is not the plain linear combination (RescaleCFG) sees the rewritten cond before the
transition, so it acts on the before-guidance as it would on normal CFG (RescaleCFG rescales to the
std of the rewritten cond).
At cfg = 0 both predictions of a not-yet-switched sample are replaced by the target (see
`replacement_cond`). Consequence for later hooks: post-CFG functions see the rewritten
`cond_denoised` (the real `uncond_denoised` is kept).

d_t (Algorithm 1 line 5) is ‖ε_c − ε_u‖² per sample with ε = (x − D)/σ, i.e. ‖D_u − D_c‖²/σ².

Which evaluations are steps: multistage samplers (heun, dpm_2, ...) call the model several times per
step. An evaluation counts as a new detector step t only if its sigma is strictly below the sigma of
the last counted step; repeated or higher sigmas (second stages at the same sigma, restarts) reuse
the current switch state and leave the detector's history unchanged.

cfg 1 (guidance-distilled models such as Flux dev with FluxGuidance, or any sampling at cfg 1):
ComfyUI skips the unconditional pass there (its cfg-1 optimization), so there is no CFG to transition
from: D_u + 1·(D_c − D_u) = D_c whatever the uncond is. The patch therefore does not ask for the uncond
(no extra model pass) and leaves such a run as it is, recording it: every step untouched, d_t NaN and
the summary's `note` saying why, which the Report and the node's run summary show (docs/families.md).
BasicGuider (no negative conditioning at all) samples at cfg 1 too and is treated the same way. An
unconditional prediction missing at any other cfg raises a ValueError that says so.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional

import numpy as np
import torch
from typing_extensions import TypedDict

from ..core.records import Curves, MethodRecord, RunRecord, StepEntry
from .method_patch import MethodPatch, MethodRun
from .transition_math import TransitionDetector, guidance_distance, reached_sigma, replacement_cond

logger = logging.getLogger(__name__)

STATIC = "static"
DYNAMIC = "dynamic"
MODES = (STATIC, DYNAMIC)


# -- the record (what the Report, the frontend and the benches read) --------------------------------
class TransitionStep(StepEntry):
    """One evaluation; `touched` marks the samples still before their transition (not normal CFG).

    d_t: ‖ε_c − ε_u‖² per sample; guidance: the scale applied per sample; switched: normal CFG is on;
    counted: the evaluation counted as a detector step (see the module doc); cfg: the sampler's scale.
    """

    d_t: list[float]
    guidance: list[float]
    switched: list[bool]
    counted: list[bool]
    cfg: float


class TransitionSummary(TypedDict):
    """risk_score: per sample, √d_t = ‖ε_c − ε_u‖ at the first counted step: the Memorization Risk score
    with one probe step (samplers/risk_math.py; Wen et al. §3), for the same seed the same number."""

    mode: str
    before_guidance: str
    before_scale: float
    switch_step: list[Optional[int]]
    switch_sigma: list[Optional[float]]
    never_switched: list[int]
    d_t_curves: list[list[float]]
    sigma_curves: list[list[float]]
    note: str
    risk_score: list[Optional[float]]


def describe_transition(curves) -> list[str]:
    lines = []
    switched = curves.field("switched")
    if switched is not None:
        steps = first_true_steps(np.nan_to_num(switched) > 0)
        done = sum(step is not None for step in steps)
        lines.append(f"  switched to normal CFG: {done}/{len(steps)} samples, at steps {steps}")
    d_t = curves.field("d_t")
    if d_t is not None and np.isfinite(d_t).any():
        lines.append(f"  d_t range {float(np.nanmin(d_t)):.3g} .. {float(np.nanmax(d_t)):.3g}")
    return lines


def first_true_steps(matrix: np.ndarray) -> list[Optional[int]]:
    """Per column of a [steps, samples] bool matrix, the first step that is True (None if never)."""
    steps = []
    for column in matrix.T:
        hits = np.flatnonzero(column)
        steps.append(int(hits[0]) if hits.size else None)
    return steps


TRANSITION_RECORD = MethodRecord(
    kind="transition_cfg",
    title="Transition-Point CFG",
    step=TransitionStep,
    summary=TransitionSummary,
    chart=Curves(
        value="d_t",
        label="d_t = ‖ε_cond − ε_uncond‖²",
        markers="last_touched",
        marker_label="circle: switch to normal CFG",
    ),
    describe=describe_transition,
)
KIND = TRANSITION_RECORD.kind


# -- the patch --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TransitionSettings:
    """What one Transition-Point CFG patch does.

    transition_sigma: static mode's point, in sigma (reached when σ ≤ it); unused in dynamic mode.
    cap_sigma: guidance is forced on once σ ≤ cap_sigma (None: no cap).
    before_scale: g before the transition (0 unconditional, 1 conditional, −λ opposite).
    """

    mode: str
    before_guidance: str
    before_scale: float
    transition_sigma: float = 0.0
    cap_sigma: Optional[float] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")


class TransitionRun(MethodRun):
    """The state of one sampling run: the detector, the switch flags, and the run's record."""

    def __init__(self, settings: TransitionSettings, record: RunRecord):
        super().__init__(record)
        self.settings = settings
        self.batch_size: Optional[int] = None
        self.switch_step: list[Optional[int]] = []
        self.switch_sigma: list[Optional[float]] = []
        self.note = ""

    def _allocate(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.detector = TransitionDetector(batch_size)
        self.switched = torch.zeros(batch_size, dtype=torch.bool)
        self.last_counted_sigma = torch.full((batch_size,), math.inf, dtype=torch.float64)
        self.steps_counted = torch.zeros(batch_size, dtype=torch.long)
        self.switch_step: list[Optional[int]] = [None] * batch_size
        self.switch_sigma: list[Optional[float]] = [None] * batch_size

    def update(self, sigma: torch.Tensor, distance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance by one model evaluation; returns (switched, counted) per sample."""
        if self.batch_size is None:
            self._allocate(sigma.shape[0])
        elif sigma.shape[0] != self.batch_size:
            raise ValueError(
                f"Transition-Point CFG: the batch changed from {self.batch_size} to {sigma.shape[0]} samples "
                "within one sampling run; this patch tracks each sample and needs a fixed batch"
            )
        counted = sigma < self.last_counted_sigma
        self.last_counted_sigma = torch.where(counted, sigma, self.last_counted_sigma)
        self.steps_counted += counted.long()
        switched = self.switched.clone()
        if self.settings.mode == DYNAMIC:
            switched |= self.detector.observe(distance, counted)
        else:
            switched |= reached_sigma(sigma, self.settings.transition_sigma)
        if self.settings.cap_sigma is not None:
            switched |= reached_sigma(sigma, self.settings.cap_sigma)
        for sample in torch.nonzero(switched & ~self.switched).flatten().tolist():
            self.switch_step[sample] = int(self.steps_counted[sample]) - 1
            self.switch_sigma[sample] = float(sigma[sample])
        self.switched = switched
        return switched, counted

    def counted_curves(self, key: str) -> list[list[float]]:
        """Per sample, the values of `key` at the evaluations that counted as detector steps."""
        return [
            [step[key][sample] for step in self.record.steps if step["counted"][sample]]
            for sample in range(self.batch_size or 0)
        ]

    def summary(self) -> dict:
        d_t_curves = self.counted_curves("d_t")
        return dict(
            mode=self.settings.mode,
            before_guidance=self.settings.before_guidance,
            before_scale=self.settings.before_scale,
            switch_step=list(self.switch_step),
            switch_sigma=list(self.switch_sigma),
            never_switched=[sample for sample, step in enumerate(self.switch_step) if step is None],
            d_t_curves=d_t_curves,
            sigma_curves=self.counted_curves("sigma"),
            note=self.note,
            risk_score=[math.sqrt(curve[0]) if curve else None for curve in d_t_curves],
        )


def missing_uncond_error() -> ValueError:
    return ValueError(
        "Transition-Point CFG needs the unconditional (negative) prediction, but this sampler has no negative "
        "conditioning (e.g. BasicGuider). Use KSampler or CFGGuider and connect a negative prompt "
        "(an empty prompt works), or remove the Transition-Point CFG node."
    )


CFG1_NOTE = (
    "inactive: sampled at cfg 1 (a guidance-distilled model such as Flux dev, or no negative), where ComfyUI "
    "skips the unconditional pass and there is no CFG to transition; the run was left as it was"
)


def no_cfg_step(run: TransitionRun, args: dict) -> list:
    """cfg 1: nothing to transition (module doc). Record the step as untouched and say why, once."""
    conds_out = args["conds_out"]
    batch = conds_out[0].shape[0]
    sigma = args["sigma"].detach().to("cpu", torch.float64).reshape(-1).expand(batch)
    if not run.note:
        run.note = CFG1_NOTE
        logger.warning("Transition-Point CFG %s", CFG1_NOTE)
    run.record.add_step(
        sigma=sigma.tolist(),
        in_window=True,
        touched=[False] * batch,
        d_t=[math.nan] * batch,
        guidance=[1.0] * batch,
        switched=[False] * batch,
        counted=[False] * batch,
        cfg=float(args["cond_scale"]),
    )
    return conds_out


def transition_step(run: TransitionRun, args: dict, acting: Optional[torch.Tensor] = None) -> list:
    """The pre-CFG hook body: rewrite the cond of the samples before their transition (module doc).
    Samples a gate holds back (`acting` False) get the sampler's normal CFG."""
    conds_out = args["conds_out"]
    if len(conds_out) < 2 or args["conds"][1] is None:
        if math.isclose(float(args["cond_scale"]), 1.0):
            return no_cfg_step(run, args)
        raise missing_uncond_error()
    cond, uncond = conds_out[0], conds_out[1]
    sigma = args["sigma"].detach().to("cpu", torch.float64).reshape(-1)
    distance = guidance_distance(cond, uncond).cpu() / (sigma * sigma)  # ‖ε_c − ε_u‖², ε = (x − D)/σ
    switched, counted = run.update(sigma, distance)
    normal_cfg = switched if acting is None else switched | ~acting
    cfg = float(args["cond_scale"])
    guidance = torch.where(normal_cfg, torch.tensor(cfg, dtype=torch.float64), run.settings.before_scale)
    new_cond, new_uncond = replacement_cond(cond, uncond, guidance, cfg)
    run.record.add_step(
        sigma=sigma.tolist(),
        in_window=True,
        touched=(~normal_cfg).tolist(),
        d_t=distance.tolist(),
        guidance=guidance.tolist(),
        switched=switched.tolist(),
        counted=counted.tolist(),
        cfg=cfg,
    )
    return [new_cond, new_uncond] + list(conds_out[2:])


class TransitionCfgPatch(MethodPatch[TransitionSettings, TransitionRun]):
    """One Transition-Point CFG node execution: a pre-CFG list hook and a keyed per-run state wrapper."""

    method = TRANSITION_RECORD
    hook_point = "pre_cfg"
    # At cfg ≠ 1 ComfyUI always computes the uncond; at cfg 1 there is no CFG to transition, so the
    # patch must not force an extra unconditional pass there (module doc).
    disable_cfg1_optimization = False

    def new_run(self, record, context) -> TransitionRun:
        return TransitionRun(self.settings, record)

    def current_run(self) -> TransitionRun:
        if self.holder.current is None:
            raise RuntimeError(
                "Transition-Point CFG: the model was evaluated outside a sampling run (no OUTER_SAMPLE wrapper "
                "ran); sample it through a ComfyUI sampler node"
            )
        return self.holder.current

    def step(self, run: TransitionRun, args: dict) -> list:
        return transition_step(run, args, self.acting_samples(args, args["conds_out"][0].shape[0]))

    def summarize(self, run: TransitionRun) -> dict:
        return run.summary()
