"""The real ComfyUI server loads the pack: nodes listed, no import failure, a graph runs."""

from conftest import BROKEN_PACK_NAME

from comfyui_shield.nodes import NODE_LIST
from comfyui_shield.version import __version__


def test_import_failure_check_sees_a_broken_pack(server):
    failures = server.import_failures()
    assert any(path.endswith(BROKEN_PACK_NAME) for path in failures), server.log_tail()


def test_pack_imports_without_failure(server):
    failures = [path for path in server.import_failures() if not path.endswith(BROKEN_PACK_NAME)]
    assert failures == [], server.log_tail()


def test_object_info_lists_every_pack_node(server):
    info = server.object_info()
    expected = {node.GET_SCHEMA().node_id for node in NODE_LIST}
    assert expected <= set(info), sorted(expected - set(info))
    assert info["ShieldInfo"]["category"].startswith("shield")


def test_info_node_runs_in_a_graph(server):
    outputs = server.run({"1": {"class_type": "ShieldInfo", "inputs": {}}})
    text = "".join(outputs["1"]["text"])
    assert f"Shield {__version__}" in text
    assert "faiss: available" in text and "dreamsim: available" in text
