"""The pack in the real ComfyUI frontend, in headless Chromium (playwright-core, Debian chromium).

One browser session: every example workflow loads with no missing node; the Shield Memory reset
button empties the memory through the server route; the SPELL demo workflow is queued from the UI and
the per-node run summary and the shield-set thumbnails appear. A screenshot is saved (and copied to
$SHIELD_BROWSER_SCREENSHOT when set).
"""

import os
import pathlib
import re
import shutil

from comfyui_shield.nodes import NODE_LIST
from comfyui_shield.nodes.risk import DROP_PROBE_STEPS, DROP_PROMPT_THRESHOLD
from harness.browser import run_ui_check

REPO = pathlib.Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))


def test_frontend_shows_what_the_shield_did(server, tmp_path):
    screenshot = tmp_path / "frontend.png"
    result = run_ui_check(
        server.url,
        screenshot=str(screenshot),
        expectNodes=[node.GET_SCHEMA().node_id for node in NODE_LIST],
        workflows=[str(path) for path in WORKFLOWS],
        pressButton={
            "workflow": str(REPO / "example_workflows" / "shield_demo_memory.json"),
            "nodeType": "ShieldMemory",
            "widget": "shield_reset_memory",
            "expectSelector": ".shield-summary",
            "expectText": "emptied",
        },
        runWorkflow=str(REPO / "example_workflows" / "shield_demo_spell.json"),
        waitForSelector=".shield-run-summary",
        waitForText="touched",
        waitForPreviewOf="SaveImage",
        viewScale=0.62,
        waitTimeout=120000,
    )
    assert result["registeredMissing"] == [], result
    assert "shield.ExecutedSummary" in result["extensions"]
    assert len(result["workflows"]) == len(WORKFLOWS) >= 11
    assert [w for w in result["workflows"] if w["missingTypes"]] == [], result["workflows"]
    assert result["button"] == {"found": True, "label": "Reset memory now", "effect": True}, result["button"]
    assert result["selectorFound"], result
    assert "Sparse Repellency: touched" in result["selectorText"] and "/8 samples" in result["selectorText"]
    assert result["previews"].get("ShieldSetFromImages", 0) >= 1, result["previews"]
    assert result["previews"].get("SaveImage", 0) == 8, result["previews"]
    assert result["consoleErrors"] == [], result["consoleErrors"]
    assert screenshot.stat().st_size > 10_000
    if os.environ.get("SHIELD_BROWSER_SCREENSHOT"):  # keep a copy (e.g. for docs/)
        shutil.copy(screenshot, os.environ["SHIELD_BROWSER_SCREENSHOT"])


def test_frontend_shows_each_images_certificate_on_the_save_node(server, tmp_path):
    """The check-then-shield workflow queued from the UI: Save Image with Shield Certificate shows, as text,
    each image's risk, nearest protected item and what each shield did (#12 item 3)."""
    screenshot = tmp_path / "certificate.png"
    result = run_ui_check(
        server.url,
        screenshot=str(screenshot),
        runWorkflow=str(REPO / "example_workflows" / "shield_demo_check_then_shield.json"),
        waitForSelector=".shield-summary",
        waitForText="nearest protected (latent L2)",
        waitForPreviewOf="ShieldSaveImageWithCertificate",
        viewScale=0.5,
        waitTimeout=180000,
    )
    assert result["selectorFound"], result
    text = result["selectorText"]
    assert "image 1/8" in text and "image 8/8" in text and "Transition-Point CFG: " in text, text
    assert f"Memorization risk, {DROP_PROBE_STEPS} probe step(s), score drop" in text, text  # it gates on the drop
    found = re.search(
        r"flagged per prompt \(batch mean\): the mean of the 8 sample\(s\), ([0-9.]+), is at or above", text
    )
    assert found and float(found[1]) >= DROP_PROMPT_THRESHOLD, text  # star: at risk
    assert text.count(f"(AT RISK per prompt: batch mean {found[1]}") == 8 and "not flagged" not in text, text
    assert f"per-prompt threshold {DROP_PROMPT_THRESHOLD:g})" in text, text
    assert result["previews"].get("ShieldSaveImageWithCertificate", 0) == 8, result["previews"]
    assert result["consoleErrors"] == [], result["consoleErrors"]
    if os.environ.get("SHIELD_CERTIFICATE_SCREENSHOT"):
        shutil.copy(screenshot, os.environ["SHIELD_CERTIFICATE_SCREENSHOT"])
