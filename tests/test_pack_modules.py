"""Every module of the pack imports, and every node follows the pack's conventions.

ComfyUI swallows a custom node's import error (it only logs it), so these in-process imports are
what makes a broken module fail the suite.
"""

import importlib
import pkgutil

import pytest

import comfyui_shield
from comfyui_shield.nodes import NODE_LIST
from comfyui_shield.nodes.common import CATEGORY, NODE_ID_PREFIX

PACK_MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(comfyui_shield.__path__, prefix="comfyui_shield.")
    if not name.startswith(("comfyui_shield.tests", "comfyui_shield.bench", "comfyui_shield.scripts"))
)


@pytest.mark.parametrize("module_name", PACK_MODULES)
def test_module_imports(module_name):
    importlib.import_module(module_name)


def test_the_walk_finds_the_pack_modules():
    assert "comfyui_shield.nodes.info" in PACK_MODULES
    assert "comfyui_shield.reference_models.memorizer" in PACK_MODULES


def test_entrypoint_only():
    assert not hasattr(comfyui_shield, "NODE_CLASS_MAPPINGS")
    assert callable(comfyui_shield.comfy_entrypoint)


@pytest.mark.parametrize("node", NODE_LIST, ids=lambda node: node.__name__)
def test_node_conventions(node):
    schema = node.GET_SCHEMA()
    assert schema.node_id.startswith(NODE_ID_PREFIX)
    assert schema.category.split("/")[0] == CATEGORY
    assert schema.display_name
    for socket in schema.inputs:
        assert getattr(socket, "tooltip", None), f"{schema.node_id}.{socket.id} has no tooltip"


def test_node_ids_are_unique():
    ids = [node.GET_SCHEMA().node_id for node in NODE_LIST]
    assert len(ids) == len(set(ids))
