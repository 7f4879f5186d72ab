"""The frontend extension is served by the real server and uses the current frontend API only.

(The browser test, which loads it in Chromium, comes with the frontend issue.)
"""

import pathlib
import re
import urllib.request

WEB_DIR = pathlib.Path(__file__).resolve().parents[1] / "web"


def test_server_lists_and_serves_the_extension(server):
    extensions = server.get("/extensions")
    script = next(path for path in extensions if path.endswith("/shield.js"))
    with urllib.request.urlopen(server.url + script, timeout=30) as response:
        served = response.read().decode()
    assert served == (WEB_DIR / "shield.js").read_text()


def test_extension_uses_the_current_api_and_a_prefixed_name():
    source = (WEB_DIR / "shield.js").read_text()
    assert "window.comfyAPI.app" in source
    assert not re.search(r"""from\s+["'][./]*scripts/""", source), "deprecated /scripts/*.js import"
    names = re.findall(r"""name:\s*["']([^"']+)["']""", source)
    assert names and all(name.startswith("shield.") for name in names)
