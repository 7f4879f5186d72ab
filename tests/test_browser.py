"""The pack in the real ComfyUI frontend, in headless Chromium: nodes registered, page renders."""

from comfyui_shield.nodes import NODE_LIST
from harness.browser import run_ui_check


def test_frontend_registers_pack_nodes(server, tmp_path):
    screenshot = tmp_path / "frontend.png"
    result = run_ui_check(
        server.url,
        screenshot=str(screenshot),
        expectNodes=[node.GET_SCHEMA().node_id for node in NODE_LIST],
    )
    assert result["registeredMissing"] == [], result
    assert screenshot.stat().st_size > 10_000
    assert result["consoleErrors"] == [], result["consoleErrors"]
