"""Writes example_workflows/*.json (UI format) and their .jpg thumbnails from a running ComfyUI.

    $SHIELD_PYTHON scripts/build_workflows.py [NAME ...]   (NAME: only these workflows, e.g. shield_demo_check_then_shield)

Each workflow is built against the server's `/object_info` (widget order, defaults, socket types),
so the files load in the frontend as saved graphs. Method variants (Sparse Repellency, Transition-Point
CFG, ProCreate) are one entry each in METHODS: their patch node is wired by socket type, and a
variant whose node type this server lacks is skipped with a message. Thumbnails come from a real run
of the demo model on the server.
"""

from __future__ import annotations

import io as bytes_io
import json
import logging
import pathlib
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from workflow_validation import input_specs, is_widget, spec_options, spec_type, ui_to_api  # noqa: E402

from harness.server import ComfyServer  # noqa: E402

logger = logging.getLogger("build_workflows")
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
        self.nodes.append(
            {
                "id": node_id,
                "type": node_type,
                "pos": [0, 0],
                "size": [300, 60 + 24 * (len(widgets) + max(len(inputs), len(outputs)))],
                "flags": {},
                "order": node_id - 1,
                "mode": 0,
                "inputs": inputs,
                "outputs": outputs,
                "properties": {"Node name for S&R": node_type},
                "widgets_values": widgets,
            }
        )
        return [Socket(node_id, slot, output["type"]) for slot, output in enumerate(outputs)]

    def to_json(self) -> dict:
        self._layout()
        return {
            "id": "00000000-0000-4000-8000-000000000000",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4,
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


# -- the demo model's classes (read from its weights, never hard-coded) -----------------------------
DEMO_WEIGHTS = REPO_ROOT / "reference_models" / "weights" / "demo_unet.safetensors"
DEMO_DATASET = REPO_ROOT / "reference_models" / "demo_dataset.py"


def demo_class_names(path: pathlib.Path = DEMO_WEIGHTS) -> list[str]:
    """The class names stored in the bundled weights' metadata, in class-id order."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as handle:
        names = json.loads((handle.metadata() or {}).get("class_names", "[]"))
    if not names:
        raise ValueError(f"{path} has no class_names in its metadata: retrain it with scripts/train_demo_model.py")
    return list(names)


# A memorizable class: plain sampling often copies one of its duplicated items, which the methods remove.
DEFAULT_DEMO_CLASS = "star"


def has_duplicates(class_name: str) -> bool:
    """Whether the class holds duplicated training items (reference_models/demo_dataset.py, read as a file:
    it imports neither ComfyUI nor the pack)."""
    import importlib.util

    module = sys.modules.get("shield_demo_dataset")
    if module is None:
        spec = importlib.util.spec_from_file_location("shield_demo_dataset", DEMO_DATASET)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
    return module.has_duplicates(class_name)


def default_demo_class() -> str:
    names = demo_class_names()
    return DEFAULT_DEMO_CLASS if DEFAULT_DEMO_CLASS in names else names[0]


# -- the methods, one entry each -------------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    key: str
    label: str
    node_types: tuple[str, ...] = ()  # MODEL -> MODEL patch candidates, first available wins; () = plain
    widgets: dict = field(default_factory=dict)
    setting: str = ""  # one line for the picture: what the row does
    then: tuple["Method", ...] = ()  # further patches applied after this one, in order (a recipe of nodes)


# The documented settings (docs/effects.md "Targets"; bench/effect_bench.py DOCUMENTED), chosen on tuning
# seeds with the copy detector, class agreement and quality. Shields/references: the class's duplicated items.
METHODS = (
    Method("plain", "Plain sampling", setting="KSampler, no patch"),
    Method(
        "spell",
        "Sparse Repellency (SPELL)",
        ("ShieldSparseRepellency",),
        {"radius": 16.0, "radius_unit": "absolute", "intra_batch": False},
        "shield: the class's duplicated items, L2 r = 16, shields only",
    ),
    Method(
        "embedding_spell",
        "SPELL, copy-detector space",
        ("ShieldEmbeddingRepellency",),
        {"similarity": 0.7},
        "shield: the duplicated items, detector similarity 0.7",
    ),
    Method(
        "tpcfg",
        "Transition-Point CFG",
        ("ShieldTransitionPointCFG",),
        {"mode": "static", "transition_percent": 0.1, "before_guidance": "opposite", "opposite_scale": 2.0},
        "static 10 %; opposite guidance (scale 2) before",
    ),
    Method(
        "procreate",
        "ProCreate",
        ("ShieldProCreateGuidance",),
        {"strength": 30.0, "similarity_threshold": 0.5},
        "copy-detector embedder, strength 30, threshold 0.5",
    ),
)
# The recipe docs/effects.md documents for "not a copy, on the prompt, clean": TPCFG spreads the samples in the
# first steps, embedding-space SPELL removes what the detector still calls a copy, pixel-L2 SPELL at the
# copy distance keeps every output off the shields' pixels.
RECIPE = Method(
    "tpcfg_embedding_spell",
    "TPCFG + SPELL (detector space)",
    METHODS[3].node_types,
    METHODS[3].widgets,
    "TPCFG as above, then SPELL: detector space 0.7, pixel L2 r = 6",
    then=(
        METHODS[2],
        Method("pixel_spell", "SPELL, pixel L2", METHODS[1].node_types, {**METHODS[1].widgets, "radius": 6.0}),
    ),
)
# Not a method of the papers (docs/redraw.md): samples heading into a duplicated item at 30 % of the schedule start
# again from a new noise; nothing is edited.
REDRAW = Method(
    "redraw",
    "Early Copy Redraw",
    ("ShieldEarlyCopyRedraw",),
    {"similarity": 0.5, "check_percent": 0.3, "max_attempts": 32},
    "detector similarity 0.5 at 30 %: new start, up to 32 checks",
)
METHODS = METHODS + (RECIPE, REDRAW)

# Stock or pack nodes that can supply a socket type a patch node needs, with their widget overrides.
PROVIDERS = {
    "SHIELD_SET": ("ShieldSetFromImages", {"width": IMAGE_SIZE, "height": IMAGE_SIZE}),
    "SHIELD_EMBEDDER": ("ShieldCopyDetectorLoader", {}),
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
                known = {
                    k: v for k, v in provider_widgets.items() if k in dict(input_specs(workflow.object_info[provider]))
                }
                outputs = autowire(workflow, provider, available, known)
                available[kind] = next(socket for socket in outputs if socket.type == kind)
            if kind in available:
                values[name] = available[kind]
            elif section == "required":
                raise LookupError(f"{node_type}.{name} needs a {kind} and no node here provides one")
    return workflow.add(node_type, **values)


def demo_workflow(
    object_info: dict,
    method: Method,
    class_name: str | None = None,
    batch: int = 8,
    seed: int = 1,
    steps: int = 20,
    cfg: float = 3.0,
    prefix: str = "shield_demo",
    extra_shield: str = "",
) -> UIWorkflow:
    """The demo model sampled with one method; the class's training items are the shield and the comparison.

    extra_shield="memory" adds a Shield Memory as the patch's second shield set (repel from previous batches).
    """
    class_name = class_name or default_demo_class()
    workflow = UIWorkflow(object_info)
    (model,) = workflow.add("ShieldDemoModelLoader")
    positive, negative = workflow.add("ShieldDemoConditioning", class_name=class_name)
    (vae,) = workflow.add("VAELoader", vae_name="pixel_space")
    items = "duplicated" if has_duplicates(class_name) else "all"  # the items a copy would reproduce
    shields, _ = workflow.add("ShieldDemoTrainingSet", items=items, class_name=class_name)
    node_type = method_node_type(method, object_info)
    if method.node_types and node_type is None:
        raise LookupError(f"{method.label}: none of the node types {method.node_types} is loaded")
    if node_type is not None:
        available = {"MODEL": model, "VAE": vae, "IMAGE": shields}
        widgets = dict(method.widgets)
        if extra_shield == "memory":
            (widgets["shield_set_2"],) = workflow.add("ShieldMemory", memory_id=f"demo_{class_name}")
        model = next(s for s in autowire(workflow, node_type, available, widgets) if s.type == "MODEL")
        for step in method.then:
            available["MODEL"] = model
            step_type = method_node_type(step, object_info)
            if step_type is None:
                raise LookupError(f"{step.label}: none of the node types {step.node_types} is loaded")
            model = next(s for s in autowire(workflow, step_type, available, dict(step.widgets)) if s.type == "MODEL")
    (latent,) = workflow.add("EmptyChromaRadianceLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=batch)
    (samples,) = workflow.add(
        "KSampler",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=seed,
        steps=steps,
        cfg=cfg,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    (images,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add("SaveImage", images=images, filename_prefix=f"{prefix}_{method.key}")
    return workflow


def protect_references_workflow(object_info: dict, class_name: str | None = None) -> UIWorkflow:
    """Protect a set of reference images (here: the duplicated items of every class, the ones the model
    copies) with Sparse Repellency and no intra-batch term: only the references repel."""
    class_name = class_name or default_demo_class()
    workflow = UIWorkflow(object_info)
    (model,) = workflow.add("ShieldDemoModelLoader")
    positive, negative = workflow.add("ShieldDemoConditioning", class_name=class_name)
    (vae,) = workflow.add("VAELoader", vae_name="pixel_space")
    references, _ = workflow.add("ShieldDemoTrainingSet", items="duplicated", class_name="all classes")
    (shield_set,) = workflow.add(
        "ShieldSetFromImages", images=references, vae=vae, model=model, width=IMAGE_SIZE, height=IMAGE_SIZE
    )
    (model,) = workflow.add(
        "ShieldSparseRepellency", model=model, shield_set=shield_set, radius=0.25, intra_batch=False
    )
    (latent,) = workflow.add("EmptyChromaRadianceLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=8)
    (samples,) = workflow.add(
        "KSampler",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=1,
        steps=20,
        cfg=3.0,
        sampler_name="euler",
        scheduler="normal",
        denoise=1.0,
    )
    (images,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add("SaveImage", images=images, filename_prefix="shield_demo_protect_references")
    return workflow


# The detector the risk bench finds best on the demo model: the drop, flagged per prompt (the mean over the
# batch of 8 generations of one prompt), at its calibrated per-prompt threshold (bench/recorded/risk.md;
# nodes/risk.py DROP_PROBE_STEPS, DROP_PROMPT_THRESHOLD and PROMPT_BATCH, which a test compares).
RISK_GATE = {"probe_steps": 8, "threshold": 0.92, "score": "drop", "flag": "per prompt (batch mean)"}


def check_then_shield_workflow(object_info: dict, class_name: str | None = None) -> UIWorkflow:
    """Memorization Risk probes the batch (8 generations of one prompt) first and flags it as a whole by its
    mean score; Shield Gate makes Transition-Point CFG (its documented setting) act only on a flagged batch
    (an unflagged one is plain sampling, bit for bit); every saved PNG carries its certificate. Risk node and
    sampler share seed, latent and schedule."""
    class_name = class_name or default_demo_class()
    seed, steps, cfg = 1, 20, 3.0
    workflow = UIWorkflow(object_info)
    (model,) = workflow.add("ShieldDemoModelLoader")
    positive, negative = workflow.add("ShieldDemoConditioning", class_name=class_name)
    (vae,) = workflow.add("VAELoader", vae_name="pixel_space")
    items, _ = workflow.add("ShieldDemoTrainingSet", items="duplicated", class_name="all classes")
    (protected,) = workflow.add(
        "ShieldSetFromImages", images=items, vae=vae, model=model, width=IMAGE_SIZE, height=IMAGE_SIZE
    )
    (latent,) = workflow.add("EmptyChromaRadianceLatentImage", width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=8)
    schedule = {
        "seed": seed,
        "steps": steps,
        "cfg": cfg,
        "sampler_name": "euler",
        "scheduler": "normal",
        "denoise": 1.0,
    }
    risk, *_ = workflow.add(
        "ShieldMemorizationRisk",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        **schedule,
        **RISK_GATE,
    )
    tpcfg = next(method for method in METHODS if method.key == "tpcfg")
    (shielded,) = workflow.add("ShieldTransitionPointCFG", model=model, **tpcfg.widgets)
    (gated,) = workflow.add("ShieldGate", model=shielded, risk=risk)
    (samples,) = workflow.add(
        "KSampler", model=gated, positive=positive, negative=negative, latent_image=latent, **schedule
    )
    (images,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add(
        "ShieldSaveImageWithCertificate",
        images=images,
        filename_prefix="shield_demo_check_then_shield",
        model=gated,
        risk=risk,
        latent=samples,
        shield_set=protected,
    )
    return workflow


SAVE_NODES = ("SaveImage", "ShieldSaveImageWithCertificate")


def demo_workflows(object_info: dict) -> dict[str, UIWorkflow]:
    """Every runnable demo-model workflow by file name (a method whose node is missing is left out)."""
    workflows = {}
    for method in METHODS:
        if method.node_types and method_node_type(method, object_info) is None:
            logger.info("skipped %s: %s not loaded", workflow_name(method), method.node_types)
            continue
        workflows[workflow_name(method)] = demo_workflow(object_info, method)
    spell = next(method for method in METHODS if method.key == "spell")
    if method_node_type(spell, object_info) is not None:
        workflows["shield_demo_memory"] = demo_workflow(
            object_info, spell, extra_shield="memory", prefix="shield_demo_memory"
        )
        workflows["shield_demo_protect_references"] = protect_references_workflow(object_info)
    if "ShieldGate" in object_info:
        workflows["shield_demo_check_then_shield"] = check_then_shield_workflow(object_info)
    return workflows


def workflow_name(method: Method) -> str:
    return f"shield_demo_{method.key}"


# -- workflows for real checkpoints (they validate here; they run where the checkpoints exist) -----------
def _text_prompts(workflow: UIWorkflow, clip: Socket, positive: str, negative: str = "") -> tuple[Socket, Socket]:
    (pos,) = workflow.add("CLIPTextEncode", clip=clip, text=positive)
    (neg,) = workflow.add("CLIPTextEncode", clip=clip, text=negative)
    return pos, neg


def _sample_and_save(
    workflow, model, positive, negative, latent, vae, prefix, steps=25, cfg=7.0, sampler="dpmpp_2m", scheduler="karras"
) -> None:
    (samples,) = workflow.add(
        "KSampler",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=42,
        steps=steps,
        cfg=cfg,
        sampler_name=sampler,
        scheduler=scheduler,
        denoise=1.0,
    )
    (images,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add("SaveImage", images=images, filename_prefix=prefix)


def sd15_spell(object_info: dict) -> UIWorkflow:
    workflow = UIWorkflow(object_info)
    model, clip, vae = workflow.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    (protected,) = workflow.add("ShieldLoadShieldSet", filename="my_protected_set.safetensors")
    (memory,) = workflow.add("ShieldMemory", memory_id="sd15")
    (model,) = workflow.add(
        "ShieldSparseRepellency", model=model, shield_set=protected, shield_set_2=memory, radius=0.5, intra_batch=True
    )
    positive, negative = _text_prompts(workflow, clip, "a watercolor lighthouse on a cliff at dawn", "blurry")
    (latent,) = workflow.add("EmptyLatentImage", width=512, height=512, batch_size=4)
    _sample_and_save(workflow, model, positive, negative, latent, vae, "shield_sd15_spell")
    return workflow


def sdxl_tpcfg(object_info: dict) -> UIWorkflow:
    workflow = UIWorkflow(object_info)
    model, clip, vae = workflow.add("CheckpointLoaderSimple", ckpt_name="sd_xl_base_1.0.safetensors")
    (model,) = workflow.add(
        "ShieldTransitionPointCFG", model=model, mode="dynamic", before_guidance="opposite", opposite_scale=6.0
    )
    positive, negative = _text_prompts(workflow, clip, "the famous painting of a starry night over a village")
    (latent,) = workflow.add("EmptyLatentImage", width=1024, height=1024, batch_size=2)
    _sample_and_save(workflow, model, positive, negative, latent, vae, "shield_sdxl_tpcfg", steps=30, cfg=6.0)
    return workflow


def sd3_spell(object_info: dict) -> UIWorkflow:
    workflow = UIWorkflow(object_info)
    model, clip, vae = workflow.add(
        "CheckpointLoaderSimple", ckpt_name="sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"
    )
    (model,) = workflow.add("ModelSamplingSD3", model=model, shift=3.0)
    (model,) = workflow.add("ShieldSparseRepellency", model=model, radius=0.5, intra_batch=True)
    positive, negative = _text_prompts(workflow, clip, "a red fox in fresh snow, photograph")
    (latent,) = workflow.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=4)
    _sample_and_save(
        workflow,
        model,
        positive,
        negative,
        latent,
        vae,
        "shield_sd3_spell",
        steps=28,
        cfg=4.5,
        sampler="euler",
        scheduler="sgm_uniform",
    )
    return workflow


def sd15_procreate(object_info: dict) -> UIWorkflow:
    workflow = UIWorkflow(object_info)
    model, clip, vae = workflow.add("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly-fp16.safetensors")
    (embedder,) = workflow.add("ShieldDreamSimLoader", variant="open_clip_vitb32")
    references, _ = workflow.add("LoadImage", image="reference.png")
    (reference_set,) = workflow.add(
        "ShieldReferenceSetFromImages", images=references, vae=vae, embedder=embedder, model=model
    )
    (model,) = workflow.add(
        "ShieldProCreateGuidance",
        model=model,
        vae=vae,
        embedder=embedder,
        reference_set=reference_set,
        strength=100.0,
        look_ahead_steps=0,
        gradient_mode="fast",
    )
    positive, negative = _text_prompts(workflow, clip, "a portrait in the style of the reference", "blurry")
    (latent,) = workflow.add("EmptyLatentImage", width=512, height=512, batch_size=2)
    _sample_and_save(workflow, model, positive, negative, latent, vae, "shield_sd15_procreate")
    return workflow


def unclip_variations(object_info: dict) -> UIWorkflow:
    """Variations of an input image that never copy it (Semantica §7: variation models copy their input):
    ComfyUI's core unCLIP graph, with the input image itself as the shield."""
    workflow = UIWorkflow(object_info)
    model, clip, vae, clip_vision = workflow.add("unCLIPCheckpointLoader", ckpt_name="sd21-unclip-h.ckpt")
    image, _ = workflow.add("LoadImage", image="input.png")
    (vision,) = workflow.add("CLIPVisionEncode", clip_vision=clip_vision, image=image, crop="center")
    positive, negative = _text_prompts(workflow, clip, "")
    (positive,) = workflow.add(
        "unCLIPConditioning", conditioning=positive, clip_vision_output=vision, strength=1.0, noise_augmentation=0.0
    )
    (shield_set,) = workflow.add("ShieldSetFromImages", images=image, vae=vae, model=model, width=768, height=768)
    (model,) = workflow.add("ShieldSparseRepellency", model=model, shield_set=shield_set, radius=0.5, intra_batch=True)
    (latent,) = workflow.add("EmptyLatentImage", width=768, height=768, batch_size=4)
    _sample_and_save(workflow, model, positive, negative, latent, vae, "shield_unclip_variations", steps=25, cfg=6.0)
    return workflow


def flux_spell(object_info: dict) -> UIWorkflow:
    """Flux dev as users run it: cfg 1 with FluxGuidance (distilled guidance, no negative pass), and SPELL,
    which needs no uncond, for a diverse batch that also avoids the previous batches (docs/families.md)."""
    workflow = UIWorkflow(object_info)
    (model,) = workflow.add("UNETLoader", unet_name="flux1-dev.safetensors", weight_dtype="default")
    (clip,) = workflow.add(
        "DualCLIPLoader", clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors", type="flux"
    )
    (vae,) = workflow.add("VAELoader", vae_name="ae.safetensors")
    (memory,) = workflow.add("ShieldMemory", memory_id="flux")
    (model,) = workflow.add("ShieldSparseRepellency", model=model, shield_set=memory, radius=0.5, intra_batch=True)
    positive, negative = _text_prompts(workflow, clip, "a lighthouse keeper's cat, oil painting")
    (positive,) = workflow.add("FluxGuidance", conditioning=positive, guidance=3.5)
    (latent,) = workflow.add("EmptySD3LatentImage", width=1024, height=1024, batch_size=4)
    _sample_and_save(
        workflow,
        model,
        positive,
        negative,
        latent,
        vae,
        "shield_flux_spell",
        steps=20,
        cfg=1.0,
        sampler="euler",
        scheduler="simple",
    )
    return workflow


def wan_spell(object_info: dict) -> UIWorkflow:
    """Wan 2.1 text-to-video with SPELL over whole clips: a picture protected as a still clip of the
    generation's length (Shield Set from Images with `length`), and the clips of a batch kept apart."""
    workflow = UIWorkflow(object_info)
    width, height, length = 832, 480, 33
    (model,) = workflow.add("UNETLoader", unet_name="wan2.1_t2v_1.3B_fp16.safetensors", weight_dtype="default")
    (clip,) = workflow.add("CLIPLoader", clip_name="umt5_xxl_fp8_e4m3fn_scaled.safetensors", type="wan")
    (vae,) = workflow.add("VAELoader", vae_name="wan_2.1_vae.safetensors")
    (model,) = workflow.add("ModelSamplingSD3", model=model, shift=8.0)
    image, _ = workflow.add("LoadImage", image="protected.png")
    (shield_set,) = workflow.add(
        "ShieldSetFromImages", images=image, vae=vae, model=model, width=width, height=height, length=length
    )
    (model,) = workflow.add("ShieldSparseRepellency", model=model, shield_set=shield_set, radius=0.5, intra_batch=True)
    positive, negative = _text_prompts(workflow, clip, "a paper boat drifting down a rainy street", "static, blurry")
    (latent,) = workflow.add("EmptyHunyuanLatentVideo", width=width, height=height, length=length, batch_size=2)
    (samples,) = workflow.add(
        "KSampler",
        model=model,
        positive=positive,
        negative=negative,
        latent_image=latent,
        seed=42,
        steps=30,
        cfg=6.0,
        sampler_name="uni_pc",
        scheduler="simple",
        denoise=1.0,
    )
    (frames,) = workflow.add("VAEDecode", samples=samples, vae=vae)
    workflow.add("SaveAnimatedWEBP", images=frames, filename_prefix="shield_wan_spell", fps=16.0)
    return workflow


CHECKPOINT_WORKFLOWS = {
    "shield_sd15_spell": (sd15_spell, "SD1.5 + Sparse Repellency: protected set + Shield Memory + intra-batch"),
    "shield_sdxl_transition_cfg": (sdxl_tpcfg, "SDXL + Transition-Point CFG: dynamic, opposite guidance first"),
    "shield_sd3_spell": (sd3_spell, "SD3.5 + Sparse Repellency: diverse batch (intra-batch)"),
    "shield_sd15_procreate_dreamsim": (sd15_procreate, "SD1.5 + ProCreate with DreamSim: away from a reference"),
    "shield_unclip_variations": (unclip_variations, "unCLIP image variations that never copy the input image"),
    "shield_flux_spell": (flux_spell, "Flux dev (cfg 1, FluxGuidance) + Sparse Repellency: diverse, remembers"),
    "shield_wan_spell": (wan_spell, "Wan 2.1 video + Sparse Repellency: a picture shielded as a still clip"),
}


# -- thumbnails ------------------------------------------------------------------------------------
FLAGGED_OUTLINE = (255, 196, 80)  # thumbnail frame of a sample its certificate says was flagged at risk


def thumbnail_jpg(paths: list[pathlib.Path], columns: int = 4, cell: int = 96) -> bytes:
    """The images in a grid; an image whose Shield certificate says it was flagged at risk gets a frame."""
    from PIL import Image, ImageDraw

    rows = (len(paths) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            tile = image.convert("RGB").resize((cell, cell), Image.NEAREST)
            certificate = json.loads(getattr(image, "text", {}).get("shield_certificate", "{}"))
        x, y = (index % columns) * cell, (index // columns) * cell
        sheet.paste(tile, (x, y))
        if (certificate.get("risk") or {}).get("at_risk"):
            draw.rectangle((x + 1, y + 1, x + cell - 2, y + cell - 2), outline=FLAGGED_OUTLINE, width=3)
    return _jpeg(sheet)


def card_jpg(title: str, workflow: dict) -> bytes:
    """A labeled card for a workflow that cannot run here: its title and its node chain."""
    from PIL import Image, ImageDraw, ImageFont

    sheet = Image.new("RGB", (384, 384), (28, 32, 40))
    draw = ImageDraw.Draw(sheet)
    draw.rectangle((0, 0, 383, 52), fill=(52, 96, 150))
    draw.multiline_text((12, 8), textwrap.fill(title, 40), fill=(255, 255, 255), font=ImageFont.load_default(size=15))
    font = ImageFont.load_default(size=13)
    for row, node in enumerate(workflow["nodes"][:14]):
        shield = node["type"].startswith("Shield")
        draw.text(
            (16, 64 + row * 19),
            ("> " if shield else "- ") + node["type"],
            fill=(255, 196, 80) if shield else (200, 205, 215),
            font=font,
        )
    files = [
        value
        for node in workflow["nodes"]
        for value in node["widgets_values"]
        if isinstance(value, str) and value.endswith((".safetensors", ".ckpt"))
    ]
    draw.multiline_text(
        (12, 340),
        textwrap.fill("needs: " + ", ".join(files), 52),
        fill=(150, 160, 175),
        font=ImageFont.load_default(size=11),
    )
    return _jpeg(sheet)


def _jpeg(image) -> bytes:
    buffer = bytes_io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_workflow(out_dir: pathlib.Path, name: str, workflow: dict, thumbnail: bytes) -> None:
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(workflow, indent=1) + "\n")
    path.with_suffix(".jpg").write_bytes(thumbnail)
    logger.info("wrote %s", path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)


def build_all(server: ComfyServer, out_dir: pathlib.Path = WORKFLOW_DIR, only: tuple[str, ...] = ()) -> list[str]:
    """Runs every demo workflow on the server for its thumbnail; cards for the checkpoint workflows.
    `only`: just the workflows with these names."""
    object_info = server.object_info()
    out_dir.mkdir(exist_ok=True)
    written = []
    for name, builder in demo_workflows(object_info).items():
        if only and name not in only:
            continue
        workflow = builder.to_json()
        outputs = server.run(ui_to_api(workflow, object_info), timeout=600)
        save_id = next(str(n["id"]) for n in workflow["nodes"] if n["type"] in SAVE_NODES)
        images = [server.output_path(info) for info in outputs[save_id]["images"]]
        write_workflow(out_dir, name, workflow, thumbnail_jpg(images))
        written.append(name)
    for name, (build, title) in CHECKPOINT_WORKFLOWS.items():
        if only and name not in only:
            continue
        workflow = build(object_info).to_json()
        write_workflow(out_dir, name, workflow, card_jpg(title, workflow))
        written.append(name)
    return written


def main() -> None:
    """`build_workflows.py [NAME ...]`: every workflow, or only the named ones."""
    logging.basicConfig(level=logging.INFO, format="[workflows] %(message)s")
    only = tuple(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="shield-workflows-") as base:
        server = ComfyServer(pathlib.Path(base))
        try:
            logger.info("starting ComfyUI")
            server.start()
            build_all(server, only=only)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
