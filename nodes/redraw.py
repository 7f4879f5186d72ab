"""Early Copy Redraw: samples heading into a shield at an early check start again from a new noise.

Not one of the three papers' methods (samplers/redraw_math.py says where it comes from); the hook is in
samplers/redraw_hook.py, the measurements in docs/redraw.md.
"""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..core.shield_set import ShieldSet, ShieldSetError
from ..samplers.redraw_hook import NODE_TITLE, EarlyCopyRedrawPatch, RedrawSettings
from .common import embedding_space_inputs
from .method_node import method_schema, patched_model
from .run_summary import node_id_of
from .validation import ShieldNode


class ShieldEarlyCopyRedraw(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return method_schema(
            node_id="ShieldEarlyCopyRedraw",
            display_name=NODE_TITLE,
            description="Looks ahead before sampling: runs the first steps of the batch, decodes each sample's "
            "predicted image at the check point and embeds it; a sample that is already that similar to a shield "
            "(it is becoming a copy) gets a new starting noise, and its first steps are run again, up to "
            "max_attempts checks. Then the batch is sampled once from the accepted noises. Nothing is edited: a "
            "redrawn sample is the model's own picture from another start, as clean and on-prompt as its other new "
            "items. Costs the look-ahead steps times the checks (about 1.1× when few samples head into a shield; "
            "several times more for a model that copies most of the time). Samples no check finds near a shield "
            "come out bit-identical to sampling without this node.",
            inputs=[
                *embedding_space_inputs("The space the check measures in"),
                io.Float.Input(
                    "similarity",
                    default=0.5,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="A sample is heading into a shield when the cosine similarity of its early predicted "
                    "image to the shield is at or above this. The early prediction is blurry: set it below the copy "
                    "threshold (demo detector: copies at 0.724; 0.5 at check 0.3 measured best, docs/redraw.md). 1 "
                    "redraws only exact matches.",
                ),
                io.Float.Input(
                    "check_percent",
                    default=0.3,
                    min=0.01,
                    max=0.99,
                    step=0.01,
                    tooltip="Where the check is, as a share of the schedule: later checks see the final picture "
                    "better and cost more steps per attempt. After Transition-Point CFG, put it after the transition "
                    "point (the copy is decided once guidance is on).",
                ),
                io.Int.Input(
                    "max_attempts",
                    default=32,
                    min=1,
                    max=1000,
                    step=1,
                    tooltip="Checks per sample, the first one included; a sample still heading into a shield at "
                    "the last one keeps the noise whose check was least similar (the Report lists it). 1 turns "
                    "the node off (one check could redraw nothing).",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, vae, embedder, shield_set, similarity, check_percent, max_attempts) -> io.NodeOutput:
        if not isinstance(shield_set, ShieldSet):
            raise ShieldSetError(f"{NODE_TITLE}: 'shield_set' is a {type(shield_set).__name__}, not a SHIELD_SET")
        settings = RedrawSettings(similarity=similarity, check_percent=check_percent, max_attempts=max_attempts)
        settings.validate()
        has_memory = bool(shield_set.settings.get("shield_memory_id"))
        off = max_attempts == 1 or not (len(shield_set) or has_memory)
        patch = None if off else EarlyCopyRedrawPatch(vae, embedder, shield_set, settings)
        return io.NodeOutput(patched_model(model, patch, node_id_of(cls)))


REDRAW_NODES = [ShieldEarlyCopyRedraw]
