"""The SHIELD_SET: protected latents at one latent shape and format, with what they came from.

Plain torch and safetensors; nothing here imports ComfyUI. A shield set is immutable: operations
return a new set, so a set cached by ComfyUI's executor is never changed behind its back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Mapping, Optional, Sequence

import torch

FORMAT_VERSION = 1


class ShieldSetError(ValueError):
    """A shield set that cannot be used as asked; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ShieldSet:
    """K protected items.

    latents: [K, C, H, W] (or [K, C, T, H, W] for video latents) in the model's latent space, float32,
        or float16 memory-mapped from a file (Load Shield Set): call `.float()` on rows, not the whole set.
    latent_format: the name of the model family's latent format (ComfyUI's LatentFormat class name,
        e.g. "SD15", "SDXL", "Flux"); sets of two formats are never mixed.
    names, hashes: one per item (source file name or "image 3", sha256 of the source pixels/latent).
    images: optional [K, H, W, 3] in [0, 1], ComfyUI's IMAGE layout, for embedders and thumbnails.
    embeddings: embedder key -> [K, D] float32, computed once per embedder and kept with the set.
    settings: how the set was made (target size, VAE, crop mode, ...), stored as metadata.
    """

    latents: torch.Tensor
    latent_format: str
    names: tuple[str, ...]
    hashes: tuple[str, ...]
    images: Optional[torch.Tensor] = None
    embeddings: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    settings: Mapping[str, object] = dataclasses.field(default_factory=dict)
    # The file the latents are memory-mapped from (Load Shield Set), so an index can be saved beside
    # it; None for sets built in memory. Not part of the content (content_hash ignores it).
    source_path: Optional[str] = dataclasses.field(default=None, compare=False)
    # Reads of those latents straight from the file (shield_files.FileRows: range reads, read-ahead of
    # the rows a search gathers); None for sets in memory.
    file_rows: Optional[object] = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        count = self.latents.shape[0]
        if self.latents.ndim < 4:
            raise ShieldSetError(f"shield latents must be [K, C, H, W], got shape {tuple(self.latents.shape)}")
        if len(self.names) != count or len(self.hashes) != count:
            raise ShieldSetError(f"{count} latents but {len(self.names)} names and {len(self.hashes)} hashes")
        if self.images is not None and self.images.shape[0] != count:
            raise ShieldSetError(f"{count} latents but {self.images.shape[0]} images")
        for key, value in self.embeddings.items():
            if value.shape[0] != count:
                raise ShieldSetError(f"{count} latents but {value.shape[0]} embeddings for {key!r}")

    # -- facts ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def content_hash(self) -> str:
        digest = hashlib.sha256(self.latent_format.encode())
        digest.update(str(self.item_shape).encode())
        if self.latents.dtype != torch.float32:  # fp16 storage rounds the shields: another content
            digest.update(str(self.latents.dtype).encode())
        for item_hash in self.hashes:
            digest.update(item_hash.encode())
        return digest.hexdigest()

    def describe(self) -> str:
        shape = "x".join(str(size) for size in self.item_shape)
        return f"{len(self)} shields of {self.latent_format} latents {shape}"

    # -- checks -----------------------------------------------------------------------------------
    def check_compatible(self, latent_shape: Sequence[int], latent_format: str, where: str) -> None:
        """Raise unless these shields can be compared with latents of this shape and format.

        latent_shape is one item's shape (without the batch dimension). `where` names the node input
        to fix in the message.
        """
        if latent_format != self.latent_format:
            raise ShieldSetError(
                f"{where}: the shield set holds {self.latent_format} latents but the model makes "
                f"{latent_format} latents. Build the shield set with this model's VAE "
                f"(Shield Set from Images) instead of mixing model families."
            )
        if tuple(latent_shape) != self.item_shape:
            video = len(latent_shape) == 4 or len(self.item_shape) == 4
            raise ShieldSetError(
                f"{where}: the shield set's latents are {_pixels_hint(self.item_shape)} but this "
                f"generation's latents are {_pixels_hint(tuple(latent_shape))}. Rebuild the set at the "
                f"generation's width and height{' and length' if video else ''} (Shield Set from Images: "
                f"width/height{'/length' if video else ''})."
            )

    # -- building ---------------------------------------------------------------------------------
    def concat(self, other: "ShieldSet") -> "ShieldSet":
        other.check_compatible(self.item_shape, self.latent_format, "shield sets to combine")
        shared_embedders = set(self.embeddings) & set(other.embeddings)
        images = None
        if self.images is not None and other.images is not None and self.images.shape[1:] == other.images.shape[1:]:
            images = torch.cat([self.images, other.images])
        return ShieldSet(
            latents=torch.cat([self.latents, other.latents]),
            latent_format=self.latent_format,
            names=self.names + other.names,
            hashes=self.hashes + other.hashes,
            images=images,
            embeddings={key: torch.cat([self.embeddings[key], other.embeddings[key]]) for key in shared_embedders},
            settings=dict(self.settings),
        )

    def with_embeddings(self, key: str, embeddings: torch.Tensor) -> "ShieldSet":
        return dataclasses.replace(self, embeddings={**self.embeddings, key: embeddings.float()})


def latent_format_name(model_patcher) -> str:
    """A model's latent format name as a shield set stores it (ComfyUI's LatentFormat class name, e.g.
    "SD15", "SDXL", "Flux"). Reads the ModelPatcher's attribute only; nothing here imports ComfyUI."""
    return type(model_patcher.get_model_object("latent_format")).__name__


def _pixels_hint(shape: tuple[int, ...]) -> str:
    """One item's latent shape in words: [C, H, W] (image) or [C, T, H, W] (video clip)."""
    channels, *spatial = shape
    pixels = f"about {spatial[-1] * 8}x{spatial[-2] * 8} px for an 8x VAE"
    if len(spatial) == 3:  # Wan-style video VAE: 1 + 4·(T − 1) frames
        frames, height, width = spatial
        return (
            f"{channels} channels x {frames} latent frames at {height}x{width} ({pixels}, {1 + 4 * (frames - 1)} frames "
            f"for a 4x temporal VAE such as Wan's)"
        )
    return f"{channels} channels at {'x'.join(str(s) for s in spatial)} ({pixels})"


def hash_tensor(tensor: torch.Tensor) -> str:
    array = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.sha256(array.tobytes()).hexdigest()


def from_latents(
    latents: torch.Tensor, latent_format: str, names: Optional[Sequence[str]] = None, **fields
) -> ShieldSet:
    """A shield set from a latent batch; names default to "latent 0", "latent 1", ..."""
    latents = latents.detach().to("cpu", torch.float32)
    if latents.shape[0] == 0:
        raise ShieldSetError("a shield set needs at least one latent; the input batch is empty")
    if not torch.isfinite(latents).all():
        raise ShieldSetError("the latents contain NaN or inf; check the VAE or the images that made them")
    names = tuple(names) if names is not None else tuple(f"latent {index}" for index in range(latents.shape[0]))
    hashes = tuple(hash_tensor(latent) for latent in latents)
    return ShieldSet(latents=latents, latent_format=latent_format, names=names, hashes=hashes, **fields)


def metadata_json(shield_set: ShieldSet) -> dict[str, str]:
    """The safetensors metadata (all values strings, as the format requires)."""
    return {
        "shield_format_version": str(FORMAT_VERSION),
        "latent_format": shield_set.latent_format,
        "latent_shape": json.dumps(list(shield_set.item_shape)),
        "count": str(len(shield_set)),
        "names": json.dumps(list(shield_set.names)),
        "hashes": json.dumps(list(shield_set.hashes)),
        "embedders": json.dumps(sorted(shield_set.embeddings)),
        "settings": json.dumps(dict(shield_set.settings), default=str),
    }
