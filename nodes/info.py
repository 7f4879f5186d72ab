"""Shield Info: the pack's version and which optional dependencies this ComfyUI can import."""

from comfy_api.v0_0_2 import io

from ..optional_deps import INSTALL_HINTS, is_available
from ..version import __version__
from .common import CATEGORY
from .validation import ShieldNode


def describe_installation() -> str:
    lines = [f"Shield {__version__}"]
    for module_name, hint in INSTALL_HINTS.items():
        state = "available" if is_available(module_name) else f"missing ({hint})"
        lines.append(f"{module_name}: {state}")
    return "\n".join(lines)


class ShieldInfo(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldInfo",
            display_name="Shield Info",
            category=f"{CATEGORY}/utils",
            description="Reports the Shield pack's version and whether its optional packages (faiss, dreamsim, matplotlib, redis) can be imported.",
            inputs=[],
            outputs=[io.String.Output("info", tooltip="Version and optional-dependency status, one per line.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        text = describe_installation()
        return io.NodeOutput(text, ui={"text": [text]})
