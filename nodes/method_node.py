"""The node side of the method contract: one schema shape and one way to hand back a patched model.

Every method node (SPELL, Transition-Point CFG, ProCreate, and any later one) builds its schema with
`method_schema` (category shield/patches, the hidden node id, a MODEL output, node id prefixed
"Shield"), validates its numbers and combos through the pack's validator, and returns
`patched_model(model, patch, node_id_of(cls))`: the input model itself when the settings turn the method off
(patch None), else the patched clone, linked to the graph node for the frontend's run summary.
"""

from __future__ import annotations

from typing import Optional

from comfy_api.v0_0_2 import io

from ..samplers.method_patch import MethodPatch
from .common import CATEGORY, NODE_ID_PREFIX
from .run_summary import node_id_of, register_patch  # noqa: F401 (node_id_of: for the method nodes)

PATCH_CATEGORY = f"{CATEGORY}/patches"


def method_schema(node_id: str, display_name: str, description: str, inputs: list, **extra) -> io.Schema:
    """The schema of a method node that patches a MODEL (the first input must be the model)."""
    if not node_id.startswith(NODE_ID_PREFIX):
        raise ValueError(f"method node ids start with {NODE_ID_PREFIX!r}, got {node_id!r}")
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category=PATCH_CATEGORY,
        description=description,
        inputs=inputs,
        outputs=[io.Model.Output(tooltip="The model with the method attached (the input model when it is off).")],
        hidden=[io.Hidden.unique_id],
        **extra,
    )


def patched_model(model, patch: Optional[MethodPatch], node_id: Optional[str]):
    """The model to hand on: `model` itself when the method is off (patch None), else a patched clone
    whose runs the frontend reports on graph node `node_id` (`node_id_of(cls)` in execute)."""
    if patch is None:
        return model
    patched = patch.patch(model)
    register_patch(patch.patch_id, node_id)
    return patched
