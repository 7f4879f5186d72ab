"""Shield for ComfyUI: diverse, copy-safe sampling without training.

Sparse repellency (SPELL), ProCreate energy guidance and transition-point CFG as model patches
that work with every sampler ComfyUI runs. ComfyUI finds the nodes through `comfy_entrypoint`
(V3 node API); a V1 node mapping beside it would make ComfyUI ignore the entrypoint.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
