"""The pack's V3 nodes and its single ComfyUI entrypoint."""

from comfy_api.v0_0_2 import ComfyExtension, io
from typing_extensions import override

from .info import ShieldInfo
from .transition_cfg import TransitionPointCFG

NODE_LIST: list[type[io.ComfyNode]] = [
    ShieldInfo,
    TransitionPointCFG,
]


class ShieldExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> ShieldExtension:
    return ShieldExtension()
