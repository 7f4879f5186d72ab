"""Differentiable image embedders for ProCreate's energy (paper §4: f in eq. 5).

An embedder maps ComfyUI IMAGE batches [B, H, W, 3] in [0, 1] to embeddings [B, D], differentiably,
and has a `key` that names its weights (reference embeddings are cached per key in the SHIELD_SET).

ComfyUI runs every prompt under `torch.inference_mode()`, so modules that loader nodes build hold
inference tensors, and autograd through them fails even inside `torch.inference_mode(False)`.
`grad_capable` returns a copy made outside inference mode (normal tensors, frozen) when needed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
from typing import Protocol, runtime_checkable

import torch

logger = logging.getLogger(__name__)

DREAMSIM_IMAGE_SIZE = 224


@runtime_checkable
class Embedder(Protocol):
    key: str

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] in [0, 1] -> [B, D]; differentiable w.r.t. `images`."""
        ...


def holds_inference_tensors(module: torch.nn.Module) -> bool:
    return any(t.is_inference() for t in list(module.parameters()) + list(module.buffers()))


def grad_capable(module: torch.nn.Module) -> torch.nn.Module:
    """`module` itself if autograd can pass through it, else a frozen copy with normal tensors.

    The copy costs the module's memory once; callers keep it for as long as they need gradients.
    """
    if not holds_inference_tensors(module):
        return module
    with torch.inference_mode(False):
        twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


def _normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor on the same storage as `tensor`: no copy, same values."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())


@contextlib.contextmanager
def autograd_through(module: torch.nn.Module):
    """Within the block, autograd can pass through `module` without copying its weights.

    Each inference-tensor parameter or buffer (what a ComfyUI loader node builds) is replaced by a frozen
    normal tensor on the same storage, so gradients w.r.t. the module's input can be taken (inference
    tensors cannot be saved for backward) at no extra weight memory; the originals are put back on exit,
    even when the block raises. Weights are never written through the aliases (requires_grad False).
    """
    swapped = []
    with torch.inference_mode(False):
        for owner in module.modules():
            for store in (owner._parameters, owner._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or not tensor.is_inference():
                        continue
                    alias = _normal_alias(tensor)
                    if isinstance(tensor, torch.nn.Parameter):
                        alias = torch.nn.Parameter(alias, requires_grad=False)
                    swapped.append((store, name, tensor))
                    store[name] = alias
    try:
        yield module
    finally:
        for store, name, tensor in reversed(swapped):
            store[name] = tensor


@contextlib.contextmanager
def saved_tensors_copied(*modules: torch.nn.Module):
    """Within the block, autograd keeps a copy of every tensor it saves for backward, except the weights
    of `modules` (shared as they are). Some ComfyUI models update activations in place after an op saved
    them (Flux's double blocks: `txt += ...`), which backward would otherwise refuse ("modified by an
    inplace operation"); the copies hold the values the op saw. Costs the saved activations once more,
    never the weights."""
    weights = {
        tensor.untyped_storage().data_ptr()
        for module in modules
        for tensor in list(module.parameters()) + list(module.buffers())
    }

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, torch.nn.Parameter) or tensor.untyped_storage().data_ptr() in weights:
            return tensor
        return tensor.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def check_images(images: torch.Tensor, where: str) -> None:
    if images.ndim != 4 or images.shape[-1] < 3:
        raise ValueError(f"{where}: expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")


def module_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's weights (first and last parameter, every shape): cheap and stable."""
    digest = hashlib.sha256()
    parameters = list(module.parameters())
    for parameter in parameters:
        digest.update(str(tuple(parameter.shape)).encode())
    for parameter in parameters[:1] + parameters[-1:]:
        digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class DreamSimEmbedder:
    """The real `dreamsim` PerceptualModel: resize to 224 and `model.embed` (DreamSim's own normalisation)."""

    def __init__(self, model: torch.nn.Module, variant: str, fingerprint: str):
        self.model = grad_capable(model)
        self.variant = variant
        self.key = f"dreamsim/{variant}/{fingerprint}"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "DreamSim embedder")
        pixels = images[..., :3].movedim(-1, 1).float()
        if pixels.shape[-2:] != (DREAMSIM_IMAGE_SIZE, DREAMSIM_IMAGE_SIZE):
            pixels = torch.nn.functional.interpolate(
                pixels, size=(DREAMSIM_IMAGE_SIZE, DREAMSIM_IMAGE_SIZE), mode="bicubic", align_corners=False
            )
        device = next(self.model.parameters()).device
        embedding = self.model.embed(pixels.clamp(0, 1).to(device))
        return embedding.reshape(images.shape[0], -1)


class ClipVisionEmbedder:
    """ComfyUI's CLIP_VISION (CLIP-H/G, SigLIP, DINOv2) with differentiable preprocessing.

    `ClipVisionModel.encode_image` rounds pixels to 8 bits (no gradient); this resizes the shortest
    side, centre-crops and normalises like it, without the rounding, and returns `image_embeds`.
    """

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision
        self.model = grad_capable(clip_vision.model)
        self.size = int(clip_vision.image_size)
        self.mean = torch.tensor(clip_vision.image_mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(clip_vision.image_std, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.key = f"clip_vision/{module_fingerprint(self.model)}"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images[..., :3].movedim(-1, 1).float()
        height, width = pixels.shape[-2:]
        if (height, width) != (self.size, self.size):
            scale = self.size / min(height, width)
            resized = (max(self.size, round(scale * height)), max(self.size, round(scale * width)))
            pixels = torch.nn.functional.interpolate(pixels, size=resized, mode="bicubic", antialias=True)
            top, left = (resized[0] - self.size) // 2, (resized[1] - self.size) // 2
            pixels = pixels[:, :, top : top + self.size, left : left + self.size]
        return (pixels.clamp(0, 1) - self.mean.to(pixels.device)) / self.std.to(pixels.device)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "CLIP vision embedder")
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        output = self.model(pixel_values=self.preprocess(images).to(device, dtype), intermediate_output=-2)
        return output[2].float()


class CallableEmbedder:
    """Any differentiable function of images as an embedder (tests, custom features)."""

    def __init__(self, function, key: str):
        self.function = function
        self.key = key

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "embedder")
        return self.function(images).reshape(images.shape[0], -1)


class PixelEmbedder:
    """Pixel space as an "embedding": resize to `size`×`size`, centre to [-1, 1], flatten, unit length.

    Cosine similarity of these vectors is a plain pixel-space similarity: no learned features, so it sees
    colour and layout, not meaning. It exists for images a few dozen pixels wide (the demo model) and
    for users without DreamSim/CLIP weights; for real images DreamSim is the embedder ProCreate uses
    (paper §4, §6.1). Differentiable: area resize (block means) and normalisation only.
    """

    def __init__(self, size: int = 16):
        if not 2 <= size <= 256:
            raise ValueError(f"Pixel Embedder: size must lie in [2, 256], got {size}")
        self.size = size
        self.key = f"pixels/{size}"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "Pixel embedder")
        pixels = images[..., :3].movedim(-1, 1).float()
        if pixels.shape[-2:] != (self.size, self.size):
            pixels = torch.nn.functional.interpolate(pixels, size=(self.size, self.size), mode="area")
        vectors = (2.0 * pixels - 1.0).flatten(1)
        return torch.nn.functional.normalize(vectors, dim=1, eps=1e-8)


class CopyDetectorEmbedder:
    """A Shield copy detector (core/copy_detector.py, SSCD-style) as an embedder: its unit descriptors.

    Cosine similarity of two descriptors at or above `copy_threshold` means "a copy" (noise, colour, blur
    and small shifts do not hide one); the Shield Report counts copies with it, and ProCreate pushes
    samples away from references in this space (a learned, differentiable stand-in for DreamSim on
    the demo domain). Images of another size than the detector's are resized whole, with a logged note.
    """

    def __init__(self, detector, fingerprint: str):
        self.detector = dataclasses.replace(detector, model=grad_capable(detector.model))
        self.copy_threshold = float(detector.threshold)
        self.key = f"copy_detector/{fingerprint}"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, "Copy detector embedder")
        pixels = images[..., :3].movedim(-1, 1).float() * 2.0 - 1.0  # the detector reads [-1, 1]
        return self.detector.descriptors(pixels, "Copy detector embedder")
