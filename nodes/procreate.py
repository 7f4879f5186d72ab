"""ProCreate nodes: DreamSim Loader, CLIP Vision Embedder, Pixel Embedder, Reference Set from Images, Energy Guidance.

Paper: "ProCreate, Don't Reproduce!" (https://arxiv.org/abs/2408.02226), §4 and §6.1.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as std_io
import json
import logging
import os

import comfy.model_management
import folder_paths
import torch
from comfy_api.v0_0_2 import io
from safetensors import safe_open

from ..core.shield_set import latent_format_name
from ..optional_deps import require
from ..samplers.embedders import ClipVisionEmbedder, DreamSimEmbedder, PixelEmbedder
from ..samplers.method_patch import window_problem
from ..samplers.procreate_hook import GRADIENT_MODES, ProCreateGuidance, ProCreateSettings, reference_embeddings
from .common import CATEGORY, EMBEDDER, SHIELD_SET
from .method_node import method_schema, patched_model
from .run_summary import node_id_of
from .shield_sets import encode_images
from .validation import ShieldNode

logger = logging.getLogger(__name__)

DREAMSIM_FOLDER = "dreamsim"
folder_paths.add_model_folder_path(DREAMSIM_FOLDER, os.path.join(folder_paths.models_dir, DREAMSIM_FOLDER))

# What dreamsim 0.2.1 (`dreamsim.model.download_weights`) needs in its cache_dir for each variant.
DREAMSIM_FILES = {
    "ensemble": [
        "dino_vitb16_pretrain.pth",
        "open_clip_vitb16_pretrain.pth.tar",
        "clip_vitb16_pretrain.pth.tar",
        "ensemble_lora",
    ],
    "dino_vitb16": ["dino_vitb16_pretrain.pth", "dino_vitb16_single_lora"],
    "dinov2_vitb14": ["dinov2_vitb14_pretrain.pth", "dinov2_vitb14_single_lora"],
    "synclr_vitb16": ["synclr_vit_b_16.pth", "synclr_vitb16_single_lora"],
    "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
    "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
}
# dreamsim 0.2.1 builds the DINO backbones of these with torch.hub.load("facebookresearch/dino..."): code
# fetched from GitHub (or imported from a cached copy) and a trusted_list written into the folder. The
# pack fetches nothing and runs no downloaded code at run time, so it refuses them before dreamsim runs.
NEEDS_TORCH_HUB = ("ensemble", "dino_vitb16", "dinov2_vitb14")
OFFLINE_VARIANTS = [variant for variant in DREAMSIM_FILES if variant not in NEEDS_TORCH_HUB]
LORA_CONFIG_KEYS = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules")
LORA_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def dreamsim_folders() -> list[str]:
    return folder_paths.get_folder_paths(DREAMSIM_FOLDER)


def refuse_torch_hub_variant(variant: str) -> None:
    if variant in NEEDS_TORCH_HUB:
        raise ValueError(
            f"DreamSim Loader: variant {variant!r} cannot load offline: dreamsim 0.2.1 builds its DINO backbone "
            f"through torch.hub, which downloads code from GitHub and runs it, and this pack never fetches anything "
            f"at run time. Choose variant {', '.join(OFFLINE_VARIANTS)} (they load from the unzipped files alone)."
        )


def find_dreamsim_folder(variant: str) -> str:
    """The first registered dreamsim folder that holds every file `variant` needs, or a clear error."""
    refuse_torch_hub_variant(variant)
    expected = DREAMSIM_FILES[variant]
    for folder in dreamsim_folders():
        if all(os.path.exists(os.path.join(folder, name)) for name in expected):
            return folder
    raise FileNotFoundError(
        f"DreamSim Loader: the '{variant}' weights are missing. Expected {', '.join(expected)} (the last is a "
        f"folder with adapter_config.json and adapter_model.*) in one of: {', '.join(dreamsim_folders())}. "
        f"Unzip the dreamsim_{variant}_checkpoint.zip release of github.com/ssundaram21/dreamsim "
        f"(v0.2.x checkpoints) into that folder. Nothing is downloaded at run time."
    )


def check_dreamsim_files(folder: str, variant: str) -> None:
    """Read what dreamsim will read before it runs: a damaged or incomplete file must fail here with its
    name, never reach a library fallback that downloads (peft fetches a missing adapter from the HF hub)."""
    replace = f"replace it with the one from the unzipped dreamsim_{variant}_checkpoint.zip (dreamsim 0.2.x)"
    for name in DREAMSIM_FILES[variant]:
        path = os.path.join(folder, name)
        if not name.endswith("_lora"):
            _check_torch_file(path, replace)
            continue
        config_path = os.path.join(path, "adapter_config.json")
        try:
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError) as error:
            raise ValueError(f"DreamSim Loader: cannot read {config_path} ({error}); {replace}") from error
        missing = [key for key in LORA_CONFIG_KEYS if not isinstance(config, dict) or key not in config]
        if missing:
            raise ValueError(f"DreamSim Loader: {config_path} lacks {', '.join(missing)}; {replace}")
        weights = [os.path.join(path, w) for w in LORA_WEIGHTS if os.path.isfile(os.path.join(path, w))]
        if not weights:
            raise ValueError(f"DreamSim Loader: {path} has no {' or '.join(LORA_WEIGHTS)}; {replace}")
        _check_torch_file(weights[0], replace)


def _check_torch_file(path: str, replace: str) -> None:
    """The file opens as safetensors or as a weights-only torch archive (memory-mapped: nothing is copied)."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as handle:
                handle.keys()
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch and safetensors raise many types for damaged archives
        raise ValueError(
            f"DreamSim Loader: {path} is damaged or not a weights file ({type(error).__name__}: {error}); {replace}"
        ) from error


def folder_fingerprint(folder: str, variant: str) -> str:
    digest = hashlib.sha256(variant.encode())
    for name in DREAMSIM_FILES[variant]:
        path = os.path.join(folder, name)
        paths = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
        for file_path in paths:
            stat = os.stat(file_path)
            digest.update(f"{file_path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def load_dreamsim(variant: str) -> DreamSimEmbedder:
    dreamsim_package = require("dreamsim", "DreamSim Loader")
    folder = find_dreamsim_folder(variant)
    check_dreamsim_files(folder, variant)
    device = comfy.model_management.get_torch_device()
    chatter = std_io.StringIO()  # dreamsim prints "Using cached ..." to stdout
    try:
        with torch.inference_mode(False), contextlib.redirect_stdout(chatter):
            model, _ = dreamsim_package.dreamsim(
                pretrained=True, cache_dir=folder, dreamsim_type=variant, device=device
            )
    except Exception as error:
        raise ValueError(
            f"DreamSim Loader: the '{variant}' files in {folder} could not be loaded ({type(error).__name__}: "
            f"{error}). They may be corrupt or from another dreamsim version: replace them with the unzipped "
            f"dreamsim_{variant}_checkpoint.zip (dreamsim 0.2.x)."
        ) from error
    if chatter.getvalue().strip():
        logger.info("dreamsim: %s", chatter.getvalue().strip())
    return DreamSimEmbedder(model, variant, folder_fingerprint(folder, variant))


class ShieldDreamSimLoader(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldDreamSimLoader",
            display_name="DreamSim Loader (Shield)",
            category=f"{CATEGORY}/procreate",
            description="Loads a DreamSim perceptual embedder (the real dreamsim package) from models/dreamsim.",
            inputs=[
                io.Combo.Input(
                    "variant",
                    options=OFFLINE_VARIANTS,
                    default="open_clip_vitb32",
                    tooltip="DreamSim model, from its unzipped checkpoint in ComfyUI/models/dreamsim. The paper's "
                    "ensemble and the DINO variants are not offered: dreamsim 0.2.1 fetches their backbone code "
                    "through torch.hub, and nothing is downloaded at run time.",
                ),
            ],
            outputs=[EMBEDDER.Output("embedder", tooltip="A differentiable DreamSim image embedder.")],
        )

    @classmethod
    def validate_inputs(cls, variant) -> bool | str:
        try:
            refuse_torch_hub_variant(variant)
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, variant):
        try:
            folder = find_dreamsim_folder(variant)
        except (FileNotFoundError, ValueError, KeyError):
            return "missing"
        return folder_fingerprint(folder, variant)

    @classmethod
    def execute(cls, variant) -> io.NodeOutput:
        return io.NodeOutput(load_dreamsim(variant))


class ShieldClipVisionEmbedder(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldClipVisionEmbedder",
            display_name="CLIP Vision Embedder (Shield)",
            category=f"{CATEGORY}/procreate",
            description="Uses a CLIP_VISION model (CLIP-H/G, SigLIP, DINOv2 from Load CLIP Vision) as a differentiable embedder.",
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="From Load CLIP Vision (the IP-Adapter/unCLIP encoders).")
            ],
            outputs=[EMBEDDER.Output("embedder", tooltip="A differentiable image embedder (image_embeds).")],
        )

    @classmethod
    def execute(cls, clip_vision) -> io.NodeOutput:
        return io.NodeOutput(ClipVisionEmbedder(clip_vision))


class ShieldPixelEmbedder(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldPixelEmbedder",
            display_name="Pixel Embedder (Shield)",
            category=f"{CATEGORY}/procreate",
            description="Pixel space as the embedding: resize to size x size, flatten, normalise; cosine similarity "
            "is then a pixel-space similarity (colour and layout, no learned features). Needs no weights: for small "
            "images such as the demo model's, or to try ProCreate without DreamSim. For real images use DreamSim.",
            inputs=[
                io.Int.Input(
                    "size",
                    default=16,
                    min=2,
                    max=256,
                    step=1,
                    tooltip="Side of the resized image that is compared (smaller = coarser, blur-tolerant "
                    "similarity). There is no off value: leave the embedder out to turn ProCreate off.",
                ),
            ],
            outputs=[EMBEDDER.Output("embedder", tooltip="A differentiable pixel-space embedder.")],
        )

    @classmethod
    def execute(cls, size) -> io.NodeOutput:
        return io.NodeOutput(PixelEmbedder(size))


class ShieldReferenceSetFromImages(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldReferenceSetFromImages",
            display_name="Reference Set from Images (Shield)",
            category=f"{CATEGORY}/procreate",
            description="Reference images for ProCreate: keeps the images, their VAE latents and their embeddings.",
            inputs=[
                io.Image.Input("images", tooltip="The reference images to steer away from."),
                io.Vae.Input("vae", tooltip="The VAE of the model you sample with (encodes the latents)."),
                EMBEDDER.Input(
                    "embedder", tooltip="The embedder ProCreate will use; its embeddings are stored in the set."
                ),
                io.Model.Input(
                    "model", optional=True, tooltip="Optional: names the set's latent format after this model."
                ),
            ],
            outputs=[SHIELD_SET.Output("reference_set", tooltip="Images, latents and embeddings of the references.")],
        )

    @classmethod
    def execute(cls, images, vae, embedder, model=None) -> io.NodeOutput:
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"Reference Set from Images: 'images' must be a non-empty IMAGE batch, got {tuple(images.shape)}"
            )
        latent_format = latent_format_name(model) if model is not None else f"VAE{vae.latent_channels}ch"
        height, width = images.shape[1:3]
        reference = encode_images(vae, images.cpu(), latent_format, width, height)
        return io.NodeOutput(reference.with_embeddings(embedder.key, reference_embeddings(reference, embedder)))


class ShieldProCreateGuidance(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return method_schema(
            node_id="ShieldProCreateGuidance",
            display_name="ProCreate Energy Guidance (Shield)",
            description="Pushes each sample's predicted image away from its nearest reference image in an "
            "embedding space (ProCreate, arXiv 2408.02226). Works per sample with every sampler; on video "
            "models per clip, on its most similar frame.",
            inputs=[
                io.Model.Input("model", tooltip="The model to patch."),
                io.Vae.Input("vae", tooltip="This model's VAE: decodes the predicted x̂0 for the embedder."),
                EMBEDDER.Input(
                    "embedder", tooltip="DreamSim Loader, CLIP Vision Embedder or Pixel Embedder (small images)."
                ),
                SHIELD_SET.Input(
                    "reference_set",
                    tooltip="Reference images (with images or embeddings for this embedder). A "
                    "Shield Memory makes it grow: each finished generation joins it (decoded with 'vae').",
                ),
                io.Float.Input(
                    "strength",
                    default=100.0,
                    min=0.0,
                    max=10000.0,
                    step=1.0,
                    tooltip="γ of the energy (paper 100–250). 0 turns the guidance off.",
                ),
                io.Float.Input(
                    "element_clip",
                    default=1.0,
                    min=0.0,
                    max=100.0,
                    step=0.05,
                    tooltip="Clamp each gradient element to ±γ·this (official code: 1). 0 turns it off.",
                ),
                io.Float.Input(
                    "max_grad_norm",
                    default=0.5,
                    min=0.0,
                    max=100.0,
                    step=0.01,
                    tooltip="Limit each sample's gradient norm to γ·this (paper 0.3–0.5). 0 turns it off.",
                ),
                io.Int.Input(
                    "look_ahead_steps",
                    default=0,
                    min=0,
                    max=20,
                    step=1,
                    tooltip="DDIM steps to predict x̂0 (paper 5). 0 (or 1) is the one-step x̂0; capped at the sampler's remaining steps.",
                ),
                io.Float.Input(
                    "start_percent",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Start of the active window (0 = first step).",
                ),
                io.Float.Input(
                    "end_percent",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.01,
                    tooltip="End of the active window (1 = last step).",
                ),
                io.Combo.Input(
                    "gradient_mode",
                    options=list(GRADIENT_MODES),
                    default="fast",
                    tooltip="exact: autograd through look-ahead, model, VAE and embedder (paper). "
                    "fast: gradient w.r.t. x̂0 only, no backward through the model.",
                ),
                io.Float.Input(
                    "similarity_threshold",
                    default=-1.0,
                    min=-1.0,
                    max=1.0,
                    step=0.01,
                    tooltip="Guide a sample only while its cosine similarity to the nearest reference is above this. -1 turns the threshold off.",
                ),
                io.Boolean.Input(
                    "intra_batch",
                    default=False,
                    optional=True,
                    tooltip="Also push each sample away from the other samples of its batch (diversity). "
                    "Off (default) repels from the reference set only; needs batch size ≥ 2 to act.",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, start_percent=0.0, end_percent=1.0, **_):
        return window_problem("ProCreate Energy Guidance", start_percent, end_percent) or True

    @classmethod
    def execute(
        cls,
        model,
        vae,
        embedder,
        reference_set,
        strength,
        element_clip,
        max_grad_norm,
        look_ahead_steps,
        start_percent,
        end_percent,
        gradient_mode,
        similarity_threshold,
        intra_batch=False,
    ) -> io.NodeOutput:
        settings = ProCreateSettings(
            gamma=strength,
            element_clip=element_clip,
            max_grad_norm=max_grad_norm,
            look_ahead_steps=look_ahead_steps,
            start_percent=start_percent,
            end_percent=end_percent,
            gradient_mode=gradient_mode,
            similarity_threshold=similarity_threshold,
            intra_batch=bool(intra_batch),
        )
        settings.validate()
        patch = None if strength == 0 else ProCreateGuidance(vae, embedder, reference_set, settings)
        return io.NodeOutput(patched_model(model, patch, node_id_of(cls)))


NODES = [
    ShieldDreamSimLoader,
    ShieldClipVisionEmbedder,
    ShieldPixelEmbedder,
    ShieldReferenceSetFromImages,
    ShieldProCreateGuidance,
]
