"""Memorization Risk (Wen et al., ICLR 2024, §3) and the Shield Gate that acts on what it flags.

Memorization Risk probes the model at the start of the schedule of the KSampler it stands for (same
seed, latent, steps, sampler, scheduler, denoise) and scores each sample; Shield Gate puts the flags on
the model, and every Shield method on that model (Sparse Repellency, Transition-Point CFG, ProCreate, ...)
then acts on the flagged samples only: the others are sampled exactly as without the methods.
"""

from __future__ import annotations

import comfy.samplers
from comfy_api.v0_0_2 import io

from ..samplers.method_patch import add_model_gate
from ..samplers.risk_math import FLAG_RULES, SCORES
from ..samplers.risk_probe import KSamplerSettings, RiskGate, RiskResult, probe
from .common import CATEGORY, RISK, require_latent_batch
from .validation import ShieldNode

# Calibrated on the bundled demo model (bench/risk_bench.py --record; docs/risk.md): the lowest score that
# flags at most 1 % of the calibration seeds' samples of control prompts (0.8333 and 1.413 on 576 of them),
# rounded up to the widget's 0.01 step so the rate stays at most 1 %. A threshold belongs to one model,
# one resolution and one score: DEFAULT_THRESHOLD to "magnitude" at N = 1 (the node's defaults), DROP_THRESHOLD
# to "drop" at N = DROP_PROBE_STEPS (of a 20-step schedule; the N chosen on the calibration seeds).
DEFAULT_THRESHOLD = 0.84
DROP_PROBE_STEPS = 8
DROP_THRESHOLD = 1.42
# The per-prompt threshold of the drop at N = DROP_PROBE_STEPS for flag "per prompt (batch mean)" on batches of
# PROMPT_BATCH generations of one prompt: the lowest batch mean that flags at most 1 % of the calibration seeds'
# control batches (0.915 on 72 of them; held-out AUC 1.000), rounded up to the widget's 0.01 step.
PROMPT_BATCH = 8
DROP_PROMPT_THRESHOLD = 0.92
MAX_PROBE_STEPS = 50


class ShieldMemorizationRisk(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldMemorizationRisk",
            display_name="Memorization Risk",
            category=f"{CATEGORY}/risk",
            description=(
                "Scores each sample of the KSampler run it mirrors for memorization before sampling (Wen et al., "
                "'Detecting, Explaining, and Mitigating Memorization in Diffusion Models', §3): the mean of "
                "‖D_cond − D_uncond‖/σ over the first probe_steps steps, from a short probe (2 model evaluations "
                "per sample and step); flags each sample by its score, or the whole batch by its mean score ('flag'). Give "
                "it the sampler's model, prompts, latent, seed and schedule; connect 'risk' to Shield Gate to shield "
                "only the samples at risk."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model the sampler uses (Shield patches on it are ignored)."),
                io.Conditioning.Input("positive", tooltip="The sampler's positive prompt."),
                io.Conditioning.Input(
                    "negative",
                    tooltip="The sampler's negative prompt: the unconditional prediction the score is measured "
                    "against (an empty prompt works).",
                ),
                io.Latent.Input(
                    "latent_image", tooltip="The sampler's latent (its batch size is the number of samples)."
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The sampler's seed: the probe uses the noise the sampler will use. Link both to one "
                    "value (control_after_generate fixed), or the Shield Gate refuses the mismatch.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The sampler's steps (sets the schedule)."),
                io.Float.Input(
                    "cfg",
                    default=8.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="The sampler's cfg (used between probe steps). At cfg 1 the score is undefined: the "
                    "sampler evaluates no unconditional prediction.",
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=list(comfy.samplers.KSampler.SAMPLERS),
                    tooltip="The sampler's sampler (some change the schedule; between probe steps the probe steps "
                    "with Euler).",
                ),
                io.Combo.Input(
                    "scheduler", options=list(comfy.samplers.KSampler.SCHEDULERS), tooltip="The sampler's scheduler."
                ),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="The sampler's denoise."),
                io.Int.Input(
                    "probe_steps",
                    default=1,
                    min=1,
                    max=MAX_PROBE_STEPS,
                    tooltip="N: the score averages the first N steps (Wen et al. find the first step enough). Cost: "
                    "2N model evaluations per sample.",
                ),
                io.Float.Input(
                    "threshold",
                    default=DEFAULT_THRESHOLD,
                    min=0.0,
                    max=1.0e6,
                    step=0.01,
                    tooltip="Samples scoring at or above it are flagged at risk (with flag 'per prompt (batch mean)': the "
                    "whole batch when its mean score is, a per-prompt threshold). The default is calibrated on the bundled "
                    "demo model (docs/risk.md); calibrate it for your model and resolution (the score grows with "
                    "the latent size). 0 flags every sample.",
                ),
                io.Combo.Input(
                    "score",
                    options=list(SCORES),
                    default="magnitude",
                    optional=True,  # prompts saved before this input existed keep working (magnitude)
                    tooltip="magnitude: the mean of ‖D_cond − D_uncond‖/σ over the N probe steps (Wen et al. §3). drop: "
                    "that magnitude at the first step over the last (its fall, Transition-Point CFG §4), for models "
                    "whose unconditional side knows the memorized images too; needs probe_steps >= 2 (demo model: "
                    f"N = {DROP_PROBE_STEPS}, threshold {DROP_THRESHOLD:g}). The threshold belongs to the score.",
                ),
                io.Combo.Input(
                    "flag",
                    options=list(FLAG_RULES),
                    default=FLAG_RULES[0],
                    optional=True,  # prompts saved before this input existed keep working (per sample)
                    tooltip="per sample: each sample is flagged when its own score is at or above threshold. per prompt "
                    "(batch mean): the batch must be n generations of one prompt (one positive, Wen et al. §4); every "
                    "sample gets the same flag, set when the mean of the batch's scores is at or above threshold, "
                    "which is then a per-prompt threshold for that batch size (demo model: drop, "
                    f"N = {DROP_PROBE_STEPS}, batch {PROMPT_BATCH}: {DROP_PROMPT_THRESHOLD:g}). On the demo model the "
                    "per-prompt drop separates prompts far better (held-out AUC 1.000 at batch 8 against 0.892 per "
                    "sample; docs/risk.md). 'scores' stays per sample.",
                ),
            ],
            outputs=[
                RISK.Output(
                    "risk", tooltip="Scores and flags of this batch: connect to Shield Gate or the certificate."
                ),
                io.Float.Output("scores", is_output_list=True, tooltip="The score of each sample (a list)."),
                io.Boolean.Output(
                    "at_risk",
                    is_output_list=True,
                    tooltip="Per sample: flagged by the 'flag' rule (a list; per prompt every sample alike).",
                ),
                io.String.Output("text", tooltip="The scores and flags as text."),
            ],
        )

    @classmethod
    def execute(
        cls,
        model,
        positive,
        negative,
        latent_image,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        denoise,
        probe_steps,
        threshold,
        score="magnitude",
        flag=FLAG_RULES[0],
    ) -> io.NodeOutput:
        require_latent_batch(latent_image["samples"], "Memorization Risk: 'latent_image'")
        run = KSamplerSettings(seed, steps, cfg, sampler_name, scheduler, denoise)
        risk = probe(model, positive, negative, latent_image, run, probe_steps, threshold, score, flag)
        text = risk.text()
        return io.NodeOutput(risk, list(risk.scores), list(risk.flagged), text, ui={"text": [text]})


class ShieldGate(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldGate",
            display_name="Shield Gate",
            category=f"{CATEGORY}/risk",
            description=(
                "Makes every Shield method on the model (Sparse Repellency, Transition-Point CFG, ProCreate) act only "
                "on the samples Memorization Risk flagged; the other samples are sampled exactly as without them "
                "(bit-identical). Put it anywhere on the model path before the sampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model with Shield methods attached (before or after this node)."),
                RISK.Input(
                    "risk",
                    tooltip="From Memorization Risk, run with the sampler's seed, latent and schedule (checked at the "
                    "first step).",
                ),
                io.Boolean.Input(
                    "enabled",
                    default=True,
                    tooltip="Off: the model passes through and the methods act on every sample.",
                ),
            ],
            outputs=[io.Model.Output(tooltip="The model whose Shield methods act on the flagged samples only.")],
        )

    @classmethod
    def execute(cls, model, risk: RiskResult, enabled: bool) -> io.NodeOutput:
        if not enabled:
            return io.NodeOutput(model)
        gated = model.clone()
        add_model_gate(gated, RiskGate(risk))
        return io.NodeOutput(gated)


RISK_NODES = [ShieldMemorizationRisk, ShieldGate]
