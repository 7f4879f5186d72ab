"""Sparse Repellency (SPELL, arXiv 2410.06025) as a model patch and as a KSampler convenience node."""

from __future__ import annotations

import logging
from typing import Optional

import comfy.samplers
import nodes as comfy_nodes
from comfy_api.v0_0_2 import io

from ..core.shield_set import ShieldSet, ShieldSetError
from ..samplers.method_patch import window_problem
from ..samplers.range_search import SEARCH_METHODS
from ..samplers.spell_hook import RepellencySettings, SparseRepellencyPatch
from .common import CATEGORY, SHIELD_SET, require_latent_batch
from .method_node import method_schema, patched_model
from .run_summary import node_id_of
from .validation import ShieldNode

logger = logging.getLogger(__name__)

RADIUS_UNITS = ("relative", "absolute")
MAX_RELATIVE_RADIUS = 8.0  # 8·√D is several times the distance between independent unit-variance latents


def shield_inputs() -> list:
    return [
        SHIELD_SET.Input(
            "shield_set",
            optional=True,
            tooltip="Protected latents to keep away from (Shield Set from "
            "Images/Latents, Load Shield Set, Shield Memory). Leave empty for intra-batch only.",
        ),
        SHIELD_SET.Input(
            "shield_set_2",
            optional=True,
            tooltip="A second shield set (e.g. a Shield Memory beside a protected set); leave empty if not needed.",
        ),
        io.Float.Input(
            "radius",
            default=0.5,
            min=0.0,
            max=100000.0,
            step=0.01,
            tooltip="Shield radius r; 0 turns the "
            "patch off. In 'relative' units r = radius x sqrt(latent size) (try Shield Radius Calibration).",
        ),
        io.Combo.Input(
            "radius_unit",
            options=list(RADIUS_UNITS),
            default="relative",
            tooltip="relative: radius x "
            "sqrt(number of latent entries), transfers across resolutions; absolute: L2 in the model's latent space "
            "(the paper: r=20 for EDMv2's 4x32x32 latents, 200 for SD3 at 256 px).",
        ),
        io.Float.Input(
            "overcompensation",
            default=1.6,
            min=0.0,
            max=4.0,
            step=0.05,
            tooltip="lambda: the step goes to "
            "x0 + lambda*Delta (paper 1.6; 1 lands exactly on the shield sphere); 0 turns the patch off.",
        ),
        io.Boolean.Input(
            "intra_batch",
            default=True,
            tooltip="Also repel the samples of one batch from each other "
            "(diversity); off repels from the shield sets only.",
        ),
        io.Float.Input(
            "start_percent",
            default=0.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="Start of the active window (0 = first step); 0 with end 1 keeps it always active.",
        ),
        io.Float.Input(
            "end_percent",
            default=1.0,
            min=0.0,
            max=1.0,
            step=0.01,
            tooltip="End of the active window "
            "(1 = last step). The guarantee that outputs end outside the shields needs end 1.",
        ),
        io.Combo.Input(
            "search",
            options=list(SEARCH_METHODS),
            default="auto",
            tooltip="Shield range search: auto "
            "(exact below 4096 shields, else clustered), exact, clustered (projection codes in inverted lists, "
            "lists skipped only when provably out of reach; index cached beside the set file), projection "
            "(flat code scan), or faiss (flat code scan by FAISS). All return every shield within r.",
        ),
    ]


def validate_shield_settings(
    radius: float, radius_unit: str, start_percent: float, end_percent: float, **unused
) -> bool | str:
    if radius < 0:
        return f"Sparse Repellency: radius must be >= 0 (0 turns it off), got {radius}"
    if radius_unit == "relative" and radius > MAX_RELATIVE_RADIUS:
        return (
            f"Sparse Repellency: relative radius {radius} is absurdly large (max {MAX_RELATIVE_RADIUS}); independent "
            f"latents are about 1.4 apart in relative units. Use Shield Radius Calibration to pick it."
        )
    return window_problem("Sparse Repellency", start_percent, end_percent) or True


def repellency_model(
    model,
    shield_set: Optional[ShieldSet],
    shield_set_2: Optional[ShieldSet],
    radius: float,
    radius_unit: str,
    overcompensation: float,
    intra_batch: bool,
    start_percent: float,
    end_percent: float,
    search: str,
    label: str = "",
    node_id: Optional[str] = None,
):
    """The patched clone, or the model itself when the settings turn the patch off."""
    message = validate_shield_settings(radius, radius_unit, start_percent, end_percent)
    if message is not True:
        raise ValueError(message)
    sets = [s for s in (shield_set, shield_set_2) if s is not None]
    for index, s in enumerate(sets):
        if not isinstance(s, ShieldSet):
            raise ShieldSetError(
                f"Sparse Repellency: shield input {index + 1} is a {type(s).__name__}, not a SHIELD_SET"
            )
    has_memory = any(s.settings.get("shield_memory_id") for s in sets)
    has_shields = any(len(s) for s in sets)
    if radius == 0 or overcompensation == 0 or not (has_shields or intra_batch or has_memory):
        return patched_model(model, None, node_id)
    settings = RepellencySettings(
        radius=radius,
        relative_radius=radius_unit == "relative",
        overcompensation=overcompensation,
        intra_batch=intra_batch,
        start_percent=start_percent,
        end_percent=end_percent,
        search_method=search,
    )
    return patched_model(model, SparseRepellencyPatch(sets, settings, label=label), node_id)


class SparseRepellency(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return method_schema(
            node_id="ShieldSparseRepellency",
            display_name="Sparse Repellency (SPELL)",
            description="Keeps generations out of L2 balls of radius r around shield latents and around each other "
            "(SPELL, arXiv 2410.06025): after CFG, the denoised prediction x0 becomes x0 + lambda*Delta. Works with every "
            "sampler node, sampler and scheduler, EPS/V/flow models.",
            inputs=[io.Model.Input("model", tooltip="The model to patch.")] + shield_inputs(),
        )

    @classmethod
    def validate_inputs(cls, radius, radius_unit, start_percent, end_percent, **unused) -> bool | str:
        return validate_shield_settings(radius, radius_unit, start_percent, end_percent)

    @classmethod
    def execute(
        cls,
        model,
        radius,
        radius_unit,
        overcompensation,
        intra_batch,
        start_percent,
        end_percent,
        search,
        shield_set=None,
        shield_set_2=None,
    ) -> io.NodeOutput:
        return io.NodeOutput(
            repellency_model(
                model,
                shield_set,
                shield_set_2,
                radius,
                radius_unit,
                overcompensation,
                intra_batch,
                start_percent,
                end_percent,
                search,
                node_id=node_id_of(cls),
            )
        )


class SparseRepellencyKSampler(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldSparseRepellencyKSampler",
            display_name="Sparse Repellency KSampler",
            category=f"{CATEGORY}/sampling",
            description="KSampler with Sparse Repellency built in; bit-identical to KSampler whenever no shield is ever "
            "within the radius.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="The random seed used for creating the noise.",
                ),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Number of denoising steps."),
                io.Float.Input(
                    "cfg",
                    default=8.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    round=0.01,
                    tooltip="Classifier-free guidance scale.",
                ),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, tooltip="The sampling algorithm."
                ),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, tooltip="The noise schedule."),
                io.Conditioning.Input("positive", tooltip="Conditioning to include."),
                io.Conditioning.Input("negative", tooltip="Conditioning to exclude."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input(
                    "denoise", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Amount of denoising (1 = full)."
                ),
            ]
            + shield_inputs(),
            outputs=[io.Latent.Output()],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, radius, radius_unit, start_percent, end_percent, **unused) -> bool | str:
        return validate_shield_settings(radius, radius_unit, start_percent, end_percent)

    @classmethod
    def execute(
        cls,
        model,
        seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        positive,
        negative,
        latent_image,
        denoise,
        radius,
        radius_unit,
        overcompensation,
        intra_batch,
        start_percent,
        end_percent,
        search,
        shield_set=None,
        shield_set_2=None,
    ) -> io.NodeOutput:
        require_latent_batch(latent_image["samples"], "Sparse Repellency KSampler: 'latent_image'")
        patched = repellency_model(
            model,
            shield_set,
            shield_set_2,
            radius,
            radius_unit,
            overcompensation,
            intra_batch,
            start_percent,
            end_percent,
            search,
            node_id=node_id_of(cls),
        )
        (latent,) = comfy_nodes.common_ksampler(
            patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise
        )
        return io.NodeOutput(latent)


SPELL_NODES = [SparseRepellency, SparseRepellencyKSampler]
