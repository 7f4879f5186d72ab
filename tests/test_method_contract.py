"""The method contract: a new method is one MethodPatch subclass plus one registered MethodRecord, and
the Report, the frontend run summary and the records show it without an edit of theirs. Also: every
real method's record feeds the Report (no field the Report reads goes unwritten), and the per-sample
gate holds a sample back in every method."""

from __future__ import annotations

import dataclasses
import re

import comfy.sd
import nodes as comfy_nodes
import numpy as np
import pytest
import torch
from typing_extensions import TypedDict

from comfyui_shield.core.records import (
    RECORDS,
    Curves,
    MethodRecord,
    StepEntry,
    register_method,
    registered_methods,
    touched_summary,
    unregister_method,
)
from comfyui_shield.core.report import latest_runs
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes import run_summary
from comfyui_shield.nodes.method_node import patched_model
from comfyui_shield.nodes.report import ShieldReport
from comfyui_shield.nodes.spell import repellency_model
from comfyui_shield.nodes.transition_cfg import TransitionPointCFG
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers.embedders import PixelEmbedder
from comfyui_shield.samplers.embedding_spell_hook import EmbeddingRepellencyPatch, EmbeddingRepellencySettings
from comfyui_shield.samplers.method_patch import MethodPatch, MethodRun
from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings
from comfyui_shield.samplers.redraw_hook import EarlyCopyRedrawPatch, RedrawSettings
from comfyui_shield.samplers.spell_hook import RepellencySettings, SparseRepellencyPatch
from comfyui_shield.samplers.transition_hook import TransitionCfgPatch, TransitionSettings
from harness.procreate_parts import pooled_projection_embedder, rgb_items, to_images

FORMAT = "LatentFormat"


# -- a toy method, as a newcomer would add one (docs/adding_a_method.md) ---------------------------
class ShrinkStep(StepEntry):
    scale: list[float]


class ShrinkSummary(TypedDict):
    shrunk_steps: int


TOY = MethodRecord(
    kind="toy_shrink",
    title="Toy Shrink",
    step=ShrinkStep,
    summary=ShrinkSummary,
    chart=Curves(value="scale", label="x̂0 scale"),
    describe=lambda curves: [f"  smallest scale {float(np.nanmin(curves.field('scale'))):.3g}"],
)


@dataclasses.dataclass(frozen=True)
class ShrinkSettings:
    factor: float = 0.5
    start_percent: float = 0.0
    end_percent: float = 0.5


class ShrinkPatch(MethodPatch[ShrinkSettings, MethodRun]):
    """Scales x̂0 towards 0 inside the window: the smallest method that changes a sampler's output."""

    method = TOY

    def new_run(self, record, context):
        return MethodRun(record=record)

    def step(self, run, args):
        denoised = args["denoised"]
        batch = denoised.shape[0]
        sigma = args["sigma"].reshape(-1)
        inside = self.in_window(run, args["model"], float(sigma.max()))
        acting = self.acting_samples(args, batch)
        touched = torch.full((batch,), inside) & (torch.ones(batch, dtype=torch.bool) if acting is None else acting)
        scale = torch.where(touched, self.settings.factor, 1.0)
        run.record.add_step(sigma=sigma.tolist(), in_window=inside, touched=touched.tolist(), scale=scale.tolist())
        return denoised * scale.reshape(-1, *[1] * (denoised.ndim - 1)).to(denoised)

    def summarize(self, run):
        return {"shrunk_steps": sum(any(step["touched"]) for step in run.record.steps)}


@pytest.fixture
def toy_method():
    register_method(TOY)
    RECORDS.clear()
    yield TOY
    unregister_method(TOY.kind)
    RECORDS.clear()


def ksample(model, items, batch=2, seed=0, steps=8, cfg=1.0, subset=None):
    """Sample the memorizer; `subset` restricts the positive to some items (a real cond/uncond difference)."""
    negative = subset_conditioning(len(items))
    positive = negative if subset is None else subset_conditioning(len(items), subset)
    latent = {"samples": torch.zeros(batch, *items.shape[1:])}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]


def test_a_toy_method_shows_up_in_the_report_and_the_run_summary(toy_method, memorizer_items):
    model = build_memorizer(memorizer_items)
    plain = ksample(model, memorizer_items)
    patched = patched_model(model, ShrinkPatch(ShrinkSettings(), label="half"), node_id="42")
    assert patched is not model and torch.equal(ksample(model, memorizer_items), plain)  # the input is untouched
    assert not torch.equal(ksample(patched, memorizer_items), plain)
    assert patched_model(model, None, node_id="42") is model  # "off" hands back the input model

    record = RECORDS.latest("toy_shrink")
    assert record.finished and record.summary == {"shrunk_steps": 4}
    message = run_summary.run_message(record)
    assert message["node"] == "42" and message["title"] == "Toy Shrink"
    assert (message["samples"], message["samples_touched"], message["steps"], message["steps_touched"]) == (2, 2, 8, 4)

    charts, text = ShieldReport.execute(latent={"samples": plain}).result
    assert re.search(r"Toy Shrink \(run #\d+, half\): 8 steps recorded", text), text
    assert "touched 8 step-samples in 4 steps, last at step 3; samples touched: [0, 1]" in text
    assert "smallest scale 0.5" in text
    (runs,) = [run for run in latest_runs(RECORDS) if run.method is TOY]
    assert runs.field("scale")[:, 0].tolist() == [0.5] * 4 + [1.0] * 4
    unregister_method(TOY.kind)
    without = ShieldReport.execute(latent={"samples": plain}).result[0]
    assert charts.shape[1] * charts.shape[2] > without.shape[1] * without.shape[2]  # the toy's panel


def test_the_registry_lists_the_five_methods():
    kinds = [method.kind for method in registered_methods()]
    assert kinds[:5] == [
        "sparse_repellency", "embedding_repellency", "early_copy_redraw", "transition_cfg", "procreate"
    ]  # fmt: skip


# -- every real method's run feeds the Report -----------------------------------------------------------
def test_the_report_reads_real_runs_of_every_method():
    """Defect 12: the Report read fields no method wrote. Build it from real sampling runs."""
    RECORDS.clear()
    items = rgb_items(6)
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    model = build_memorizer(items)
    shields = from_latents(items[:3], FORMAT, images=to_images(items[:3]))
    model = repellency_model(model, from_latents(items, FORMAT), None, 10.0, "absolute", 1.6, True, 0.0, 1.0, "auto")
    (model,) = TransitionPointCFG.execute(model, "dynamic", 0.5, 0.0, "unconditional", 2.0, 1.0).result
    procreate = ProCreateGuidance(
        vae, pooled_projection_embedder(), shields, ProCreateSettings(gamma=80.0, gradient_mode="fast")
    )
    model = patched_model(model, procreate, node_id=None)
    embedding_settings = EmbeddingRepellencySettings(similarity=0.95)
    embedding_spell = EmbeddingRepellencyPatch(vae, PixelEmbedder(16), shields, embedding_settings)
    model = patched_model(model, embedding_spell, node_id=None)
    # outermost: its look-ahead runs every method above, which must record only the real run (8 steps)
    redraw = EarlyCopyRedrawPatch(vae, PixelEmbedder(16), shields, RedrawSettings(similarity=0.9, check_percent=0.5))
    model = patched_model(model, redraw, node_id=None)
    out = ksample(model, items, batch=3, cfg=3.0, subset=[0, 1])

    spell, transition, guidance = (
        RECORDS.latest(kind) for kind in ("sparse_repellency", "transition_cfg", "procreate")
    )
    charts, text = ShieldReport.execute(latent={"samples": out}).result
    hits = max(max(step["shield_hits"], default=0) for step in spell.steps)
    correction = max(max(step["relative_correction"], default=0.0) for step in spell.steps)
    assert hits > 0 and f"max shields within r at one step: {hits}" in text
    assert f"max ‖λΔ‖ / ‖x − x̂0‖ {correction:.3g}" in text
    switch_steps = transition.summary["switch_step"]
    assert (
        f"switched to normal CFG: {sum(s is not None for s in switch_steps)}/3 samples, at steps {switch_steps}" in text
    )
    assert f"8 steps recorded, {guidance.summary['references']} references" in text
    for record in (spell, transition, guidance):
        touched = touched_summary(record)
        assert f"samples touched: {np.flatnonzero(np.any(record.touched_matrix(), axis=0)).tolist()}" in text
        assert touched["steps"] == 8
    report_runs = latest_runs(RECORDS)
    embedded = RECORDS.latest("embedding_repellency")
    assert "Sparse Repellency (embedding space)" in text and embedded.summary["shields"] == 3
    redrawn = RECORDS.latest("early_copy_redraw")
    assert "Early Copy Redraw" in text and redrawn.summary["shields"] == 3
    assert len([step for step in redrawn.steps if step["attempt"] == 0]) == 8
    kinds = ["sparse_repellency", "embedding_repellency", "early_copy_redraw", "transition_cfg", "procreate"]
    assert [run.method.kind for run in report_runs] == kinds
    assert all(run.method.chart.value in run.fields for run in report_runs)  # every panel has its data
    assert charts.shape[1] >= 2 * 300 and charts.shape[2] >= 2 * 500  # summary + three method panels: 2 x 2


# -- the per-sample gate ------------------------------------------------------------------------------------
def hold_back_first(args):
    batch = args["input"].shape[0]
    return torch.arange(batch) != 0


@pytest.mark.parametrize("method", ["spell", "embedding_spell", "redraw", "transition", "procreate"])
def test_a_gate_holds_a_sample_back_in_every_method(method):
    items = rgb_items(6)
    model = build_memorizer(items)
    shields = from_latents(items[:3], FORMAT, images=to_images(items[:3]))
    if method == "spell":
        patch = SparseRepellencyPatch([shields], RepellencySettings(radius=6.0, relative_radius=False))
    elif method == "embedding_spell":
        vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        patch = EmbeddingRepellencyPatch(vae, PixelEmbedder(16), shields, EmbeddingRepellencySettings(similarity=0.9))
    elif method == "redraw":
        vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        patch = EarlyCopyRedrawPatch(vae, PixelEmbedder(16), shields, RedrawSettings(similarity=0.7, check_percent=0.3))
    elif method == "transition":
        patch = TransitionCfgPatch(TransitionSettings("static", "unconditional", 0.0, transition_sigma=0.5))
    else:
        vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
        settings = ProCreateSettings(gamma=80.0, gradient_mode="fast")
        patch = ProCreateGuidance(vae, pooled_projection_embedder(), shields, settings)
    patch.add_sample_gate(hold_back_first)
    ksample(patch.patch(model), items, batch=3, cfg=3.0)
    touched = np.array(RECORDS.latest(patch.method.kind, patch.patch_id).touched_matrix())
    assert not touched[:, 0].any() and touched[:, 1:].any()
