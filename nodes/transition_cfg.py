"""Transition-Point CFG: no (or opposite) guidance until each sample leaves the memorization
attraction basin, then the sampler's own CFG (papers/transition-point-cfg.txt, §5, §5.1, Algorithm 1)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..samplers.transition_hook import DYNAMIC, MODES, STATIC, TransitionCfgPatch, TransitionSettings
from ..samplers.transition_math import BEFORE_GUIDANCE_CHOICES, OPPOSITE, UNCONDITIONAL, before_guidance_scale
from .common import NODE_ID_PREFIX
from .method_node import method_schema, patched_model
from .run_summary import node_id_of
from .validation import ShieldNode


def check_settings(mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent):
    """The relations between the inputs (each input's range is checked against the schema first);
    returns a message naming the input to fix, or None."""
    if before_guidance == OPPOSITE and not opposite_scale > 0:
        return (
            f"opposite_scale must be > 0 when before_guidance is 'opposite' (Eq. 5 needs λ > 0), got {opposite_scale}"
        )
    if mode == STATIC and transition_sigma == 0 and cap_percent < transition_percent:
        return (
            f"cap_percent ({cap_percent}) is before the static transition_percent ({transition_percent}): the cap would "
            "always win. Set cap_percent ≥ transition_percent, or 1.0 for no cap"
        )
    return None


class TransitionPointCFG(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return method_schema(
            node_id=f"{NODE_ID_PREFIX}TransitionPointCFG",
            display_name="Transition-Point CFG",
            description=(
                "Memorization mitigation (Jain et al., 'Classifier-Free Guidance inside the Attraction Basin May Cause "
                "Memorization'): until each sample's transition point, use unconditional, conditional-only or "
                "opposite guidance; afterwards the sampler's own cfg. Needs a negative conditioning and cfg ≠ 1: at cfg 1 "
                "(Flux dev with FluxGuidance, BasicGuider) there is no CFG to transition, and the run records a no-op "
                "saying so."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch; chain it with other model patches freely."),
                io.Combo.Input(
                    "mode",
                    options=list(MODES),
                    default=DYNAMIC,
                    tooltip="dynamic: each sample switches at the first local minimum of ‖ε_cond − ε_uncond‖² "
                    "(Algorithm 1). static: every sample switches at transition_percent (or transition_sigma).",
                ),
                io.Float.Input(
                    "transition_percent",
                    default=0.5,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Static mode: the point of the schedule where normal CFG starts (0 = from the start, "
                    "which turns the patch off; 1 = never). Ignored in dynamic mode.",
                ),
                io.Float.Input(
                    "transition_sigma",
                    default=0.0,
                    min=0.0,
                    max=10000.0,
                    step=0.001,
                    tooltip="Static mode: switch once sigma ≤ this value, instead of transition_percent. "
                    "0 turns it off (transition_percent is used). Ignored in dynamic mode.",
                ),
                io.Combo.Input(
                    "before_guidance",
                    options=list(BEFORE_GUIDANCE_CHOICES),
                    default=UNCONDITIONAL,
                    tooltip="Guidance before the transition: unconditional = the uncond prediction only (the paper's "
                    "'zero CFG', scale 0); conditional = the cond prediction only (scale 1, what some official scripts "
                    "call 'no guidance'); opposite = uncond − λ·(cond − uncond) (§5.1).",
                ),
                io.Float.Input(
                    "opposite_scale",
                    default=2.0,
                    min=0.0,
                    max=30.0,
                    step=0.1,
                    tooltip="λ of opposite guidance (used only when before_guidance is 'opposite'; must be > 0 there).",
                ),
                io.Float.Input(
                    "cap_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Latest point of the schedule at which CFG is forced on for samples that have not switched "
                    "yet, so none ends unguided. 1 turns the cap off; 0 forces CFG from the start (patch off).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent):
        message = check_settings(
            mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent
        )
        return True if message is None else f"Transition-Point CFG: {message}"

    @classmethod
    def execute(
        cls, model, mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent
    ) -> io.NodeOutput:
        message = check_settings(
            mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent
        )
        if message is not None:
            raise ValueError(f"Transition-Point CFG: {message}")
        static_from_start = mode == STATIC and transition_sigma == 0 and transition_percent == 0
        if static_from_start or cap_percent == 0:  # CFG from the first step: plain CFG, nothing to patch
            return io.NodeOutput(patched_model(model, None, node_id_of(cls)))
        settings = build_settings(
            model.get_model_object("model_sampling"),
            mode,
            transition_percent,
            transition_sigma,
            before_guidance,
            opposite_scale,
            cap_percent,
        )
        patch = TransitionCfgPatch(settings, label=f"{mode}, {before_guidance}")
        return io.NodeOutput(patched_model(model, patch, node_id_of(cls)))


def build_settings(
    model_sampling, mode, transition_percent, transition_sigma, before_guidance, opposite_scale, cap_percent
) -> TransitionSettings:
    """Convert the node's percents (ComfyUI's convention: 0 = first step, 1 = end) to sigmas."""
    static_sigma = transition_sigma if transition_sigma > 0 else model_sampling.percent_to_sigma(transition_percent)
    cap_sigma = None if cap_percent >= 1.0 else model_sampling.percent_to_sigma(cap_percent)
    if mode == STATIC and cap_sigma is not None and cap_sigma > static_sigma:
        raise ValueError(
            f"Transition-Point CFG: cap_percent {cap_percent} (sigma {cap_sigma:.4g}) comes before the static "
            f"transition_sigma {static_sigma:.4g}; raise cap_percent or lower transition_sigma"
        )
    return TransitionSettings(
        mode=mode,
        before_guidance=before_guidance,
        before_scale=before_guidance_scale(before_guidance, opposite_scale),
        transition_sigma=float(static_sigma),
        cap_sigma=None if cap_sigma is None else float(cap_sigma),
    )
