"""Writes example_workflows/*.json (UI format) and their .jpg thumbnails from a running ComfyUI.

    $SHIELD_PYTHON scripts/build_workflows.py

Each workflow is built against the server's `/object_info` (widget order, defaults, socket types),
so the files load in the frontend as saved graphs. Method variants (Sparse Repellency, Transition-Point
CFG, ProCreate) are one entry each in METHODS: their patch node is wired by socket type, and a
variant whose node type this server lacks is skipped with a message. Thumbnails come from a real run
of the demo model on the server.
"""

from __future__ import annotations

import io as bytes_io
import json
import pathlib
import sys
import tempfile
from dataclasses import dataclass, field

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from workflow_validation import input_specs, is_widget, spec_options, spec_type, ui_to_api  # noqa: E402

from harness.server import ComfyServer  # noqa: E402

WORKFLOW_DIR = REPO_ROOT / "example_workflows"
IMAGE_SIZE = 32
COLUMN_WIDTH, ROW_GAP = 330, 40


@dataclass(frozen=True)
class Socket:
    node_id: int
    slot: int
    type: str


@dataclass
class UIWorkflow:
    """A UI-format workflow built node by node against /object_info."""

    object_info: dict
    nodes: list = field(default_factory=list)
    links: list = field(default_factory=list)

    def add(self, node_type: str, **values) -> list[Socket]:
        """Add a node; Socket values become links, the rest widget values (others keep their default)."""
        info = self.object_info[node_type]
        node_id = len(self.nodes) + 1
        widgets, inputs = [], []
        for name, spec in input_specs(info):
            value = values.pop(name, None)
            if is_widget(spec):
                widgets.append(widget_default(spec) if value is None else value)
                if spec_options(spec).get("control_after_generate"):
                    widgets.append("fixed")
            elif value is not None:
                link_id = len(self.links) + 1
                self.links.append([link_id, value.node_id, value.slot, node_id, len(inputs), value.type])
                self.nodes[value.node_id - 1]["outputs"][value.slot]["links"].append(link_id)
                inputs.append({"name": name, "type": spec_type(spec), "link": link_id})
        if values:
            raise ValueError(f"{node_type} has no inputs {sorted(values)}")
        outputs = [
            {"name": name, "type": kind, "slot_index": slot, "links": []}
            for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))
        ]
        self.nodes.append({
            "id": node_id, "type": node_type, "pos": [0, 0],
            "size": [300, 60 + 24 * (len(widgets) + max(len(inputs), len(outputs)))],
            "flags": {}, "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node_type}, "widgets_values": widgets,
        })
        return [Socket(node_id, slot, output["type"]) for slot, output in enumerate(outputs)]

    def to_json(self) -> dict:
        self._layout()
        return {
            "id": "00000000-0000-4000-8000-000000000000", "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": self.nodes, "links": self.links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4,
        }

    def _layout(self) -> None:
        """Columns by longest path from a source node, stacked top to bottom."""
        depth = {}
        for node in self.nodes:  # nodes are added after their inputs, so one pass suffices
            sources = [link[1] for link in self.links if link[3] == node["id"]]
            depth[node["id"]] = 1 + max((depth[s] for s in sources), default=-1)
        heights: dict[int, float] = {}
        for node in self.nodes:
            column = depth[node["id"]]
            node["pos"] = [40 + column * COLUMN_WIDTH, 40 + heights.get(column, 0)]
            heights[column] = heights.get(column, 0) + node["size"][1] + ROW_GAP


def widget_default(spec: list):
    options = spec_options(spec)
    if "default" in options:
        return options["default"]
    if spec_type(spec) == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False}.get(spec_type(spec), "")


# -- the methods, one entry each -------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    key: str
    label: str
    node_types: tuple[str, ...] = ()  # MODEL -> MODEL patch candidates, first available wins; () = plain
    widgets: dict = field(default_factory=dict)


METHODS = (
    Method("plain", "Plain sampling"),
    Method("spell", "Sparse Repellency (SPELL)", ("ShieldSparseRepellency",)),
    Method("tpcfg", "Transition-Point CFG", ("ShieldTransitionPointCFG",)),
    Method("procreate", "ProCreate", ("ShieldProCreate", "ShieldProCreateEnergyGuidance", "ShieldProCreateGuidance")),
)

# Stock or pack nodes that can supply a socket type a patch node needs, with their widget overrides.
PROVIDERS = {
    "SHIELD_SET": ("ShieldSetFromImages", {"width": IMAGE_SIZE, "height": IMAGE_SIZE}),
}


def method_node_type(method: Method, object_info: dict) -> str | None:
    return next((node_type for node_type in method.node_types if node_type in object_info), None)


def autowire(workflow: UIWorkflow, node_type: str, available: dict[str, Socket], widgets: dict) -> list[Socket]:
    """Add `node_type`, connecting every socket input from `available` by type (providers on demand)."""
    values = dict(widgets)
    wired_optional: set[str] = set()  # one optional socket per type (e.g. shield_set, not shield_set_2)
    for section in ("required", "optional"):
        for name, spec in workflow.object_info[node_type]["input"].get(section, {}).items():
            kind = spec_type(spec)
            if is_widget(spec) or name in values or (section == "optional" and kind in wired_optional):
                continue
            if section == "optional":
                wired_optional.add(kind)
            if kind not in available and kind in PROVIDERS and PROVIDERS[kind][0] in workflow.object_info:
                provider, provider_widgets = PROVIDERS[kind]
                known = {k: v for k, v in provider_widgets.items() if k in dict(input_specs(workflow.object_info[provider]))}
                outputs = autowire(workflow, provider, available, known)
                available[kind] = next(socket for socket in outputs if socket.type == kind)
            if kind in available:
                values[name] = available[kind]
            elif section == "required":
                raise LookupError(f"{node_type}.{name} needs a {kind} and no node here provides one")
    return workflow.add(node_type, **values)


def demo_workflow(object_info: dict, method: Method, class_name: str = "star", batch: int = 8, seed: int = 1,
                  steps: int = 20, cfg: float = 3.0, prefix: str = "shield_demo") -> UIWorkflow:
    """The demo model sampled with one method; the duplicated training items of the class beside it."""
    workflow = UIWorkflow(object_info)
    (model,) = workflow.add("ShieldDemoModelLoader")
    positive, negative = workflow.add("ShieldDemoConditioning", class_name=class_name)
    (vae,) = workflow.add("VAELoader", vae_name="pixel_space")
    shields, _ = workflow.add("ShieldDemoTrainingSet", items="duplicated", class_name=class_name)
    node_type = method_node_type(method, object_info)
    if method.node_types and node_type is None:
        raise LookupError(f"{method.label}: none of the node types {method.node_types} is loaded")
    if node_type is not None:
        available = {"MODEL": model, "VAE": vae, "IMAGE": shields}
        model = next(s for s in autowire(workflow, node_type, available, method.widgets) if s.type == "MODEL")
    (latent,) = workflow.add("EmptyChromaRadianceLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=batch)
    (samples,) = workflow.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                              seed=seed, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0)
    (images,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add("SaveImage", images=images, filename_prefix=f"{prefix}_{method.key}")
    workflow.add("PreviewImage", images=shields)
    return workflow


def workflow_name(method: Method) -> str:
    return f"shield_demo_{method.key}"


# -- thumbnails ------------------------------------------------------------------------------------
def thumbnail_jpg(paths: list[pathlib.Path], columns: int = 4, cell: int = 96) -> bytes:
    from PIL import Image

    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (24, 24, 24))
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            tile = image.convert("RGB").resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, ((index % columns) * cell, (index // columns) * cell))
    buffer = bytes_io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_all(server: ComfyServer, out_dir: pathlib.Path = WORKFLOW_DIR) -> list[str]:
    object_info = server.object_info()
    out_dir.mkdir(exist_ok=True)
    written = []
    for method in METHODS:
        try:
            workflow = demo_workflow(object_info, method).to_json()
        except LookupError as missing:
            print(f"[workflows] skipped {workflow_name(method)}: {missing}", flush=True)
            continue
        path = out_dir / f"{workflow_name(method)}.json"
        path.write_text(json.dumps(workflow, indent=1) + "\n")
        outputs = server.run(ui_to_api(workflow, object_info), timeout=600)
        save_id = next(str(n["id"]) for n in workflow["nodes"] if n["type"] == "SaveImage")
        images = [server.output_path(info) for info in outputs[save_id]["images"]]
        path.with_suffix(".jpg").write_bytes(thumbnail_jpg(images))
        written.append(path.name)
        print(f"[workflows] wrote {path.relative_to(REPO_ROOT)} and its thumbnail", flush=True)
    return written


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="shield-workflows-") as base:
        server = ComfyServer(pathlib.Path(base))
        try:
            print("[workflows] starting ComfyUI", flush=True)
            server.start()
            build_all(server)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
