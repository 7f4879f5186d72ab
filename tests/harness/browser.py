"""Runs tests/browser/ui_check.mjs (headless Debian Chromium via playwright-core) against a server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from .host import REPO_ROOT

UI_CHECK = REPO_ROOT / "tests" / "browser" / "ui_check.mjs"


class BrowserUnavailable(RuntimeError):
    pass


def node_modules() -> str:
    host_dir = os.environ.get("SHIELD_HOST_DIR", os.path.expanduser("~/.cache/shield-host"))
    return os.environ.get("SHIELD_NODE_MODULES", os.path.join(host_dir, "node", "node_modules"))


def check_browser_tools() -> None:
    modules = node_modules()
    missing = [
        what
        for what, present in (
            ("/usr/bin/chromium (apt-get install chromium)", os.path.exists("/usr/bin/chromium")),
            ("node", shutil.which("node") is not None),
            (
                "playwright-core in $SHIELD_NODE_MODULES (scripts/bootstrap.sh)",
                os.path.isdir(f"{modules}/playwright-core"),
            ),
        )
        if not present
    ]
    if missing:
        raise BrowserUnavailable("browser test needs: " + ", ".join(missing))


def run_ui_check(url: str, timeout: float = 300, **options) -> dict:
    check_browser_tools()
    completed = subprocess.run(
        ["node", str(UI_CHECK), json.dumps({"url": url, **options})],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, SHIELD_NODE_MODULES=node_modules()),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"ui_check failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
