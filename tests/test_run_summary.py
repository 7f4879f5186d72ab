"""What the frontend is told: per-run touched counts, the patch -> graph node link, the memory routes."""

import pytest
from test_spell import FORMAT, RADIUS, sample

from comfyui_shield.core.records import RECORDS, touched_summary
from comfyui_shield.core.shield_set import from_latents
from comfyui_shield.nodes import run_summary
from comfyui_shield.nodes.spell import repellency_model
from comfyui_shield.nodes.transition_cfg import TransitionPointCFG
from comfyui_shield.reference_models.memorizer import build_memorizer
from harness.server import ServerError


def test_repellency_run_counts_exactly_the_samples_and_steps_it_moved(memorizer_items):
    model = build_memorizer(memorizer_items)
    # sample 0 starts on a shield's noise-free path, far shields never act: count what the record shows
    patched = repellency_model(
        model,
        from_latents(memorizer_items, FORMAT),
        None,
        RADIUS,
        "absolute",
        1.6,
        False,
        0.0,
        1.0,
        "auto",
        node_id="17",
    )
    sample(patched, memorizer_items, batch=3, seed=3)
    record = RECORDS.latest("sparse_repellency")
    summary = touched_summary(record)
    moved_steps = [step for step in record.steps if any(step["touched"])]
    assert summary["steps"] == 8 and summary["samples"] == 3
    assert 0 < summary["steps_touched"] == len(moved_steps) < 8  # sparse: late steps are left alone
    moved_samples = {b for step in moved_steps for b, moved in enumerate(step["touched"]) if moved}
    assert summary["samples_touched"] == len(moved_samples) > 0
    assert run_summary.run_message(record)["node"] == "17"


def test_far_shields_touch_nothing(memorizer_items):
    model = build_memorizer(memorizer_items)
    patched = repellency_model(
        model, from_latents(memorizer_items + 1000.0, FORMAT), None, RADIUS, "absolute", 1.6, False, 0.0, 1.0, "auto"
    )
    sample(patched, memorizer_items, batch=2)
    summary = touched_summary(RECORDS.latest("sparse_repellency"))
    assert (summary["samples_touched"], summary["steps_touched"], summary["steps"]) == (0, 0, 8)
    assert run_summary.run_message(RECORDS.latest("sparse_repellency")) is None  # no graph node made it


@pytest.mark.parametrize("percent, touched_steps", [(0.5, 4), (1.0, 8)])
def test_transition_cfg_counts_the_steps_before_the_transition(memorizer_items, percent, touched_steps):
    model = build_memorizer(memorizer_items)
    (patched,) = TransitionPointCFG.execute(model, "static", percent, 0.0, "unconditional", 2.0, 1.0).result
    sample(patched, memorizer_items, batch=2, cfg=2.0)
    summary = touched_summary(RECORDS.latest("transition_cfg"))
    assert summary["samples_touched"] == 2 and summary["steps"] == 8
    assert summary["steps_touched"] == touched_steps


def test_listeners_hear_each_finished_run_once(memorizer_items):
    heard = []
    RECORDS.add_listener(heard.append)
    try:
        model = build_memorizer(memorizer_items)
        patched = repellency_model(model, None, None, RADIUS, "absolute", 1.6, True, 0.0, 1.0, "auto")
        sample(patched, memorizer_items, batch=2)
        sample(patched, memorizer_items, batch=2, seed=1)
    finally:
        RECORDS._listeners.remove(heard.append)
    assert len(heard) == 2 and all(record.finished for record in heard) and heard[0] is not heard[1]


def test_memory_routes_on_the_server(server):
    assert server.get("/shield/memory/route-test") == {"memory_id": "route-test", "size": 0, "version": "0"}
    answer = server.post("/shield/memory/reset", {"memory_id": "route-test"})
    assert answer["memory_id"] == "route-test" and answer["size"] == 0 and answer["version"] == "1"
    with pytest.raises(ServerError, match="400"):
        server.post("/shield/memory/reset", {"memory_id": "  "})
    # a file memory: the store travels with the request, as the node's widgets say
    folder = server.base_dir / "models" / "shield_sets" / "memories"
    assert server.get("/shield/memory/route-file?store=file")["size"] == 0
    answer = server.post("/shield/memory/reset", {"memory_id": "route-file", "store": "file"})
    assert answer["size"] == 0 and not (folder / "route-file.shield-memory").exists()
    with pytest.raises(ServerError, match=r"400.*needs an id of letters"):
        server.post("/shield/memory/reset", {"memory_id": "../escape", "store": "file"})
