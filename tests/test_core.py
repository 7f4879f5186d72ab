"""Shared pieces: the ShieldSet container, run records, and per-run state through OUTER_SAMPLE."""

import nodes as comfy_nodes
import pytest
import torch

from comfyui_shield.core.records import RecordBook
from comfyui_shield.core.shield_set import ShieldSetError, from_latents
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers.run_state import RunStateHolder, attach_run_state


def test_shield_set_checks_shape_and_format():
    shields = from_latents(torch.randn(3, 4, 8, 8), "SD15")
    shields.check_compatible((4, 8, 8), "SD15", "shields")
    with pytest.raises(ShieldSetError, match="SDXL.*SD15|SD15.*SDXL"):
        shields.check_compatible((4, 8, 8), "SDXL", "shields")
    with pytest.raises(ShieldSetError, match="width and height"):
        shields.check_compatible((4, 16, 16), "SD15", "shields")


def test_shield_set_rejects_empty_and_nan():
    with pytest.raises(ShieldSetError, match="at least one"):
        from_latents(torch.zeros(0, 4, 8, 8), "SD15")
    bad = torch.zeros(2, 4, 8, 8)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ShieldSetError, match="NaN"):
        from_latents(bad, "SD15")


def test_concat_keeps_items_and_hash_changes():
    a = from_latents(torch.randn(2, 4, 8, 8), "SD15")
    b = from_latents(torch.randn(1, 4, 8, 8), "SD15", names=["x"])
    both = a.concat(b)
    assert len(both) == 3 and both.names[-1] == "x"
    assert both.content_hash != a.content_hash


def test_record_book_is_bounded():
    book = RecordBook(max_runs=2)
    for index in range(3):
        book.start("k", f"p{index}")
    assert [r.patch_id for r in book.runs()] == ["p1", "p2"]
    assert book.latest(patch_id="p1").patch_id == "p1"


def test_run_state_is_fresh_for_every_run(memorizer_items):
    finished = []
    holder = RunStateHolder(lambda context: {"steps": 0, "sigmas": len(context.sigmas)}, finished.append)

    def count_steps(args):
        holder.current["steps"] += 1
        return args["denoised"]

    model = build_memorizer(memorizer_items).clone()
    attach_run_state(model, "test", holder)
    attach_run_state(model, "test", holder)  # idempotent: still one wrapper
    model.set_model_sampler_post_cfg_function(count_steps)
    conditioning = subset_conditioning(len(memorizer_items))
    for _ in range(2):
        comfy_nodes.common_ksampler(
            model, 0, 5, 1.0, "euler", "normal", conditioning, conditioning, {"samples": torch.zeros(1, 4, 8, 8)}
        )
    assert finished == [{"steps": 5, "sigmas": 6}, {"steps": 5, "sigmas": 6}]
    assert holder.current is None
