"""The pack's V3 nodes and its single ComfyUI entrypoint."""

from comfy_api.v0_0_2 import ComfyExtension, io
from typing_extensions import override

from ..samplers import methods  # noqa: F401 (registers the methods' records for the Report and the frontend)
from .certificate import CERTIFICATE_NODES
from .copy_detector import NODES as COPY_DETECTOR_NODES
from .demo_model import ShieldDemoConditioning, ShieldDemoModelLoader, ShieldDemoTrainingSet
from .embedding_spell import EMBEDDING_SPELL_NODES
from .info import ShieldInfo
from .procreate import NODES as PROCREATE_NODES
from .redraw import REDRAW_NODES
from .reference import REFERENCE_NODES
from .report import ShieldReport
from .risk import RISK_NODES
from .run_summary import install as install_frontend_link
from .shield_sets import SHIELD_SET_NODES
from .spell import SPELL_NODES
from .transition_cfg import TransitionPointCFG
from .validation import install_raw_type_check

NODE_LIST: list[type[io.ComfyNode]] = [
    ShieldInfo,
    *SHIELD_SET_NODES,
    *SPELL_NODES,
    *EMBEDDING_SPELL_NODES,
    *REDRAW_NODES,
    TransitionPointCFG,
    *PROCREATE_NODES,
    *RISK_NODES,
    ShieldReport,
    *COPY_DETECTOR_NODES,
    *CERTIFICATE_NODES,
    *REFERENCE_NODES,
    ShieldDemoModelLoader,
    ShieldDemoConditioning,
    ShieldDemoTrainingSet,
]


class ShieldExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_LIST)


async def comfy_entrypoint() -> ShieldExtension:
    install_frontend_link()  # run summaries to the frontend, Shield Memory reset route
    install_raw_type_check(NODE_LIST)  # "false" for a BOOLEAN, "NaN" for a FLOAT: refused, not converted
    return ShieldExtension()
