"""README's node reference is generated from the node schemas; this fails when they drift apart."""

import importlib.util

from comfyui_shield.nodes import NODE_LIST
from harness.host import REPO_ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("node_reference", REPO_ROOT / "scripts" / "node_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_node_reference_matches_the_schemas():
    generator = load_generator()
    readme = (REPO_ROOT / "README.md").read_text()
    expected = generator.replace_section(readme, generator.reference_text(NODE_LIST))
    assert readme == expected, "README's node reference is stale: run `$SHIELD_PYTHON scripts/node_reference.py`"


def test_every_node_is_in_the_readme():
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [node.GET_SCHEMA().node_id for node in NODE_LIST if f"`{node.GET_SCHEMA().node_id}`" not in readme]
    assert missing == []
