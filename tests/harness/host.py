"""Where the ComfyUI host lives and how this process imports it and the pack.

scripts/bootstrap.sh writes host.env; scripts/test.sh exports it. SHIELD_COMFYUI_DIR may point the
tests at any other ComfyUI checkout.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_shield"


def comfyui_dir() -> pathlib.Path:
    configured = os.environ.get("SHIELD_COMFYUI_DIR")
    default = pathlib.Path.home() / ".cache" / "shield-host" / "ComfyUI"
    path = pathlib.Path(configured) if configured else default
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI found at {path}: run `bash scripts/bootstrap.sh` or set SHIELD_COMFYUI_DIR")
    return path


def link_pack(directory: pathlib.Path) -> pathlib.Path:
    """Link the repo into `directory` under the pack's fixed name, whatever the checkout is called."""
    link = directory / PACK_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def import_comfyui_in_process() -> pathlib.Path:
    """Make `import comfy`, `import nodes` and `import comfyui_shield` work in this process, CPU-only."""
    root = comfyui_dir()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    import comfy.model_management  # noqa: F401  (reads args.cpu once, at import)

    package_root = pathlib.Path(tempfile.mkdtemp(prefix="shield-pack-"))
    link_pack(package_root)
    sys.path.append(str(package_root))
    return root
