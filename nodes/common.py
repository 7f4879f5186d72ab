"""What every node of the pack shares: the category root, the id prefix, custom socket types."""

from comfy_api.v0_0_2 import io

CATEGORY = "shield"
NODE_ID_PREFIX = "Shield"

SHIELD_SET = io.Custom("SHIELD_SET")
EMBEDDER = io.Custom("SHIELD_EMBEDDER")
RISK = io.Custom("SHIELD_RISK")
