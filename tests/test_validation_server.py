"""Every number, switch and choice of every pack node is checked (issue #11, defects 2-4), in the real
server: out of range, NaN (JSON and string), wrong types and bogus combo values are refused before
anything runs, with a message naming the node, the input and the allowed values; a linked value is
checked when it arrives."""

from __future__ import annotations

import math
import re

import pytest

from comfyui_shield.nodes import NODE_LIST
from comfyui_shield.nodes.validation import ShieldNode, widget_inputs
from harness.server import ServerError


def refused(server, graph: dict) -> str:
    """The server's answer to a graph it must refuse at validation (HTTP 400), as text."""
    with pytest.raises(ServerError, match="400") as error:
        server.queue(graph)
    return str(error.value)


def node_graph(node_class, **values) -> dict:
    """The node with default widget values (overridden by `values`) and its first output previewed."""
    schema = node_class.GET_SCHEMA()
    inputs = {}
    for name, socket in widget_inputs(schema).items():
        default = socket.default
        if default is None and getattr(socket, "options", None):
            default = socket.options[0]
        if default is not None:
            inputs[name] = default
    inputs.update(values)
    graph = {"node": {"class_type": schema.node_id, "inputs": inputs}}
    graph["preview"] = {"class_type": "PreviewAny", "inputs": {"source": ["node", 0]}}
    return graph


HUGE = 10**400  # valid JSON; Python reads it as an int that float() cannot hold


def hostile_values(socket) -> list:
    """Values the socket must refuse: outside min/max, non-finite, wrong types (JSON null included: core
    hands a node None for it, as for a linked input), unknown options."""
    from comfy_api.v0_0_2 import io

    if isinstance(socket, io.Boolean.Input):
        return ["false", 0, "true", None]
    if isinstance(socket, io.Combo.Input):
        return ["bogus-option", 3, None]
    if isinstance(socket, io.String.Input):
        return [5, None, {"a": 1}]
    if isinstance(socket, (io.Int.Input, io.Float.Input)):
        values = ["abc", "NaN", True, None, HUGE, -HUGE]
        values += [socket.max * 10 + 1] if socket.max is not None else []
        values += [socket.min - 1 - abs(socket.min)] if socket.min is not None else []
        values += [math.nan, math.inf] if isinstance(socket, io.Float.Input) else [2.5]
        return values
    return []


CASES = [
    (node, name, value)
    for node in NODE_LIST
    for name, socket in widget_inputs(node.GET_SCHEMA()).items()
    for value in hostile_values(socket)
]


def test_every_pack_node_is_a_shield_node():
    assert all(issubclass(node, ShieldNode) for node in NODE_LIST)
    assert len(CASES) > 250  # every node's numbers, switches, choices and texts are walked


def test_every_hostile_value_of_every_input_is_refused(server):
    """Walk every pack node's schema; post each hostile value alone; expect a clear refusal."""
    silent = []
    for node, name, value in CASES:
        try:
            answer = refused(server, node_graph(node, **{name: value}))
        except BaseException as error:  # not refused: collect, report all at the end
            silent.append(f"{node.__name__}.{name}={value!r}: {error}")
            continue
        display_name = node.GET_SCHEMA().display_name
        if f"'{name}' must" not in answer or display_name not in answer:
            silent.append(f"{node.__name__}.{name}={value!r}: unclear answer {answer[:300]}")
    assert not silent, "\n".join(silent)


# -- the cases the outside battery found, one by one ------------------------------------------------------
DEFECTS = [
    ("ShieldSparseRepellency", {"overcompensation": 1e6}, r"'overcompensation' must be in \[0, 4\], got 1e\+06"),
    ("ShieldSparseRepellency", {"overcompensation": -1}, r"'overcompensation' must be in \[0, 4\], got -1"),
    ("ShieldSparseRepellency", {"radius": math.nan}, r"'radius' must be a finite number in \[0, 100000\], got nan"),
    ("ShieldSparseRepellency", {"radius": "NaN"}, r"'radius' must be a finite number .*got 'NaN' \(str\)"),
    ("ShieldSparseRepellency", {"radius": "abc"}, r"'radius' must be a finite number .*got 'abc' \(str\)"),
    ("ShieldSparseRepellency", {"overcompensation": "NaN"}, r"'overcompensation' must be a finite number"),
    ("ShieldSparseRepellency", {"radius_unit": "bogus"}, r"'radius_unit' must be one of \['relative', 'absolute'\]"),
    ("ShieldSparseRepellency", {"start_percent": math.nan}, r"'start_percent' must be a finite number"),
    ("ShieldSparseRepellency", {"end_percent": math.nan}, r"'end_percent' must be a finite number"),
    ("ShieldSparseRepellency", {"intra_batch": "false"}, r"'intra_batch' must be true or false, got 'false'"),
    ("ShieldSparseRepellencyKSampler", {"steps": 0}, r"'steps' must be in \[1, 10000\], got 0"),
    ("ShieldSparseRepellencyKSampler", {"denoise": 5}, r"'denoise' must be in \[0, 1\], got 5"),
    ("ShieldSparseRepellencyKSampler", {"cfg": -50}, r"'cfg' must be in \[0, 100\], got -50"),
    ("ShieldSparseRepellencyKSampler", {"seed": -1}, r"'seed' must be in \[0, 1\.8\d*e\+19\], got -1"),
    ("ShieldSparseRepellencyKSampler", {"sampler_name": "bogus"}, r"'sampler_name' must be one of"),
    ("ShieldProCreateGuidance", {"strength": 1e6}, r"'strength' must be in \[0, 10000\], got 1e\+06"),
    ("ShieldProCreateGuidance", {"strength": math.nan}, r"'strength' must be a finite number"),
    ("ShieldProCreateGuidance", {"element_clip": -1}, r"'element_clip' must be in \[0, 100\], got -1"),
    ("ShieldProCreateGuidance", {"max_grad_norm": -0.5}, r"'max_grad_norm' must be in \[0, 100\], got -0\.5"),
    ("ShieldProCreateGuidance", {"similarity_threshold": 5}, r"'similarity_threshold' must be in \[-1, 1\], got 5"),
    ("ShieldProCreateGuidance", {"gradient_mode": "slow"}, r"'gradient_mode' must be one of \['exact', 'fast'\]"),
    ("ShieldTransitionPointCFG", {"opposite_scale": 1000}, r"'opposite_scale' must be in \[0, 30\], got 1000"),
    ("ShieldTransitionPointCFG", {"transition_sigma": math.nan}, r"'transition_sigma' must be a finite number"),
    ("ShieldSetFromImages", {"width": 0}, r"'width' must be in \[16, 16384\], got 0"),
    ("ShieldSetFromImages", {"width": -32}, r"'width' must be in \[16, 16384\], got -32"),
    ("ShieldSetFromImages", {"height": 100000}, r"'height' must be in \[16, 16384\], got 100000"),
    ("ShieldDreamSimLoader", {"variant": "bogus"}, r"'variant' must be one of \['synclr_vitb16'"),
    ("ShieldReport", {"radius": math.nan}, r"'radius' must be a finite number"),
    ("ShieldPixelEmbedder", {"size": 1}, r"'size' must be in \[2, 256\], got 1"),
]


# found by the hostile battery (tests/harness/hostile.py) after the schema validator
DEFECTS += [
    (
        "ShieldSparseRepellency",
        {"radius_unit": None},
        r"'radius_unit' must be one of \['relative', 'absolute'\], got null",
    ),
    ("ShieldSparseRepellency", {"search": None}, r"'search' must be one of .*got null"),
    ("ShieldSparseRepellencyKSampler", {"sampler_name": None}, r"'sampler_name' must be one of .*got null"),
    ("ShieldSaveShieldSet", {"filename": None}, r"'filename' must be text, got null"),
    ("ShieldSaveShieldSet", {"filename": 5}, r"'filename' must be text, got 5"),
    ("ShieldMemory", {"store": None}, r"'store' must be one of \['server', 'file', 'redis'\], got null"),
    (
        "ShieldMemorizationRisk",
        {"flag": "per batch"},
        r"'flag' must be one of \['per sample', 'per prompt \(batch mean\)'\], got 'per batch'",
    ),
    ("ShieldMemorizerConditioning", {"n_items": HUGE}, r"'n_items' must be in \[1, 4096\], got a 401-digit integer"),
    ("ShieldSparseRepellency", {"radius": HUGE}, r"'radius' must be in \[0, 100000\], got a 401-digit integer"),
]


@pytest.mark.parametrize("node_id, values, message", DEFECTS, ids=lambda v: v if isinstance(v, str) else None)
def test_the_battery_cases_are_refused_by_name(server, node_id, values, message):
    (node,) = [n for n in NODE_LIST if n.GET_SCHEMA().node_id == node_id]
    answer = refused(server, node_graph(node, **values))
    assert re.search(message, answer), answer


@pytest.mark.parametrize(
    "node_id, values, message",
    [
        (
            "ShieldSparseRepellency",
            {"start_percent": 0.8, "end_percent": 0.2},
            "start_percent (0.8) must not exceed end_percent",
        ),
        ("ShieldProCreateGuidance", {"start_percent": 0.8, "end_percent": 0.2}, "must not exceed end_percent"),
        (
            "ShieldTransitionPointCFG",
            {"before_guidance": "opposite", "opposite_scale": 0},
            "opposite_scale must be > 0",
        ),
        ("ShieldSparseRepellency", {"radius": 9.0, "radius_unit": "relative"}, "absurdly large"),
    ],
)
def test_relations_between_inputs_are_refused(server, node_id, values, message):
    (node,) = [n for n in NODE_LIST if n.GET_SCHEMA().node_id == node_id]
    assert message in refused(server, node_graph(node, **values))


def test_a_bad_value_in_one_node_does_not_let_another_through(server):
    """The raw-type check runs on every node of the prompt, whatever another node holds: a huge integer in
    one node used to stop it, so "false" in the next node was read as True and the prompt ran."""
    spell = next(node for node in NODE_LIST if node.__name__ == "SparseRepellency")
    conditioning = next(node for node in NODE_LIST if node.__name__ == "ShieldMemorizerConditioning")
    first = {f"c_{k}": v for k, v in node_graph(conditioning, n_items=HUGE).items()}
    first["c_preview"]["inputs"]["source"] = ["c_node", 0]
    answer = refused(server, {**first, **node_graph(spell, intra_batch="false")})
    assert "'intra_batch' must be true or false, got 'false'" in answer
    assert "'n_items' must be in [1, 4096], got a 401-digit integer" in answer


def test_a_linked_value_is_checked_when_it_arrives(server, memorizer_items):
    """A FLOAT from another node is unknown at validation: the node refuses it at execution."""
    server.write_input_latent("validation_items", memorizer_items)
    spell = next(node for node in NODE_LIST if node.__name__ == "SparseRepellency")
    graph = node_graph(spell, model=["memorizer", 0], overcompensation=["huge", 0])
    graph["items"] = {"class_type": "LoadLatent", "inputs": {"latent": "validation_items.latent"}}
    graph["memorizer"] = {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}}
    graph["huge"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 1e6}}
    with pytest.raises(ServerError, match=r"'overcompensation' must be in \[0, 4\], got 1e\+06"):
        server.run(graph)
    graph["huge"]["inputs"]["value"] = 2.0
    assert "preview" in server.run(graph)  # the same graph with a value in range runs


# -- in-process: the same checks without a server (no conversion by core) ---------------------------------
def test_in_process_calls_are_checked_too(memorizer_items):
    from comfyui_shield.nodes.spell import SparseRepellency
    from comfyui_shield.reference_models.memorizer import build_memorizer

    defaults = node_graph(SparseRepellency)["node"]["inputs"]
    assert SparseRepellency.validate_inputs(**defaults) is True
    assert "got 'false' (str)" in SparseRepellency.validate_inputs(**{**defaults, "intra_batch": "false"})
    assert "got '0.5' (str)" in SparseRepellency.validate_inputs(**{**defaults, "radius": "0.5"})
    assert SparseRepellency.validate_inputs(**{**defaults, "radius": None}) is True  # linked: known at execution
    with pytest.raises(ValueError, match=r"Sparse Repellency \(SPELL\): 'radius' must be a finite number"):
        SparseRepellency.execute(build_memorizer(memorizer_items), **{**defaults, "radius": math.inf})


def test_empty_flat_and_nan_latents_are_refused_by_name(server, memorizer_items):
    """An empty batch into the Sparse Repellency KSampler gave "integer modulo by zero"; a 3-D tensor into
    Shield Radius Calibration gave a number for a shape no sampler makes."""
    import torch

    server.write_input_latent("validation_items", memorizer_items)
    server.write_input_latent("validation_empty", torch.zeros(0, 4, 8, 8))
    server.write_input_latent("validation_flat", torch.randn(4, 8, 8))
    sampler = next(node for node in NODE_LIST if node.__name__ == "SparseRepellencyKSampler")
    graph = node_graph(sampler, model=["memorizer", 0], positive=["memorizer", 1], negative=["memorizer", 1])
    graph["node"]["inputs"].update(latent_image=["empty", 0], steps=2, radius=0.3)
    graph["items"] = {"class_type": "LoadLatent", "inputs": {"latent": "validation_items.latent"}}
    graph["empty"] = {"class_type": "LoadLatent", "inputs": {"latent": "validation_empty.latent"}}
    graph["memorizer"] = {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}}
    with pytest.raises(ServerError, match=r"'latent_image' is an empty batch \(0 latents\)"):
        server.run(graph, timeout=60)
    calibration = {
        "flat": {"class_type": "LoadLatent", "inputs": {"latent": "validation_flat.latent"}},
        "items": graph["items"],
        "memorizer": graph["memorizer"],
        "node": {"class_type": "ShieldRadiusCalibration", "inputs": {"latent": ["flat", 0], "model": ["memorizer", 0]}},
    }
    with pytest.raises(ServerError, match=r"'latent' has shape \[4, 8, 8\]; it must be a batch of latents"):
        server.run(calibration, timeout=60)
    # NaN latents: Radius Calibration printed "median pairwise distance nan", the Report "a: contains NaN or inf"
    server.write_input_latent("validation_nan", torch.full((2, 4, 8, 8), float("nan")))
    calibration["flat"]["inputs"]["latent"] = "validation_nan.latent"
    with pytest.raises(ServerError, match=r"Shield Radius Calibration: 'latent' contains NaN or inf"):
        server.run(calibration, timeout=60)
    calibration["node"] = {"class_type": "ShieldReport", "inputs": {"latent": ["flat", 0], "radius": 0.0}}
    calibration["node"]["inputs"]["include_run_records"] = False
    calibration["node"]["inputs"]["similarity_threshold"] = 0.0
    with pytest.raises(ServerError, match=r"Shield Report: 'latent' contains NaN or inf"):
        server.run(calibration, timeout=60)
