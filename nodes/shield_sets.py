"""Nodes that make, store and remember shield sets: from images, from latents, save/load, memory."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import time
import weakref
from typing import Optional

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ..core import image_folder
from ..core.bounded_cache import BoundedCache
from ..core.memory_file import FileStore
from ..core.memory_redis import RedisStore, default_url
from ..core.shield_files import (
    EXTENSION,
    STORAGE_DTYPES,
    load_shield_set,
    resolve_inside,
    save_shield_set,
)
from ..core.shield_memory import DEFAULT_CAP, MAX_CAP, MEMORY, STORES, WHEN_FULL, MemorySpec, full_error
from ..core.shield_set import ShieldSet, ShieldSetError, from_latents, latent_format_name  # noqa: F401
from ..samplers import spell_math
from ..samplers.latent_space import latent_format_of, to_model_space
from ..samplers.progress import progress_reporter
from .common import CATEGORY, SHIELD_SET, require_latent_batch
from .validation import ShieldNode

logger = logging.getLogger(__name__)

FOLDER = "shield_sets"
MEMORY_FOLDER = "memories"  # models/shield_sets/memories/<id>.shield-memory: the file store
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")

# VAE -> bounded cache {(pixels hash, width, height, format, ...): ShieldSet}; weak keys, so a freed VAE
# drops its entries.
_ENCODE_CACHE: "weakref.WeakKeyDictionary[object, BoundedCache]" = weakref.WeakKeyDictionary()
_ENCODE_CACHE_PER_VAE = 8


def shield_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]


def shield_set_files() -> list[str]:
    """The .safetensors files under models/shield_sets (search-index caches have their own suffix)."""
    return folder_paths.get_filename_list(FOLDER)


def resolve_set_file(filename: str) -> pathlib.Path:
    """The real path of a listed set file, by the pack's one path rule: symlinks (of the file or of a
    sub-folder) are followed only when the real path stays inside the shield_sets folder it is in."""
    where = "Load Shield Set: filename"
    if not filename.endswith(EXTENSION):
        raise ShieldSetError(f"{where}: {filename!r} is not a .safetensors file; pick a set file from the list")
    for root in folder_paths.get_folder_paths(FOLDER):
        if os.path.lexists(os.path.join(root, filename)):
            path = resolve_inside(root, filename, where)
            if not path.is_file():
                raise ShieldSetError(f"{where}: {filename!r} in {root} is not a file (a folder, or a broken link)")
            return path
    raise ShieldSetError(
        f"{where}: no file {filename!r} in models/shield_sets ({shield_folder()}); refresh the list (press r) or "
        f"save the set there first"
    )


# -- images -> latents -------------------------------------------------------------------------------
def cover_and_centre_crop(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, H, W, C] -> [B, height, width, C]: scale (bilinear, antialiased) so the image covers the
    target, keeping its aspect ratio, then cut the centre. Nothing is stretched or padded."""
    _, source_h, source_w, _ = images.shape
    scale = max(width / source_w, height / source_h)
    new_w, new_h = max(width, round(source_w * scale)), max(height, round(source_h * scale))
    resized = torch.nn.functional.interpolate(
        images.movedim(-1, 1), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    ).movedim(1, -1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[:, top : top + height, left : left + width, :].clamp(0.0, 1.0)


def is_video_vae(vae) -> bool:
    """Whether the VAE makes video latents [B, C, T, H, W] (Wan, Hunyuan Video, ...)."""
    return int(getattr(vae, "latent_dim", 2)) == 3


def encode_images(
    vae,
    images: torch.Tensor,
    latent_format: str,
    width: int,
    height: int,
    names=None,
    source: str = "images",
    length: int = 1,
) -> ShieldSet:
    """One latent per image. With a video VAE each image is encoded as a still clip of `length` frames
    (the image repeated), so a shield has the generation's [C, T, H, W] shape (docs/families.md)."""
    pixels = cover_and_centre_crop(images[..., :3].float(), width, height)
    frames = length if is_video_vae(vae) else 1
    progress = comfy.utils.ProgressBar(pixels.shape[0])
    latents = []
    for index in range(pixels.shape[0]):
        comfy.model_management.throw_exception_if_processing_interrupted()
        clip = pixels[index : index + 1].repeat(frames, 1, 1, 1)
        latents.append(vae.encode(clip).float().cpu())
        progress.update(1)
    names = list(names) if names is not None else [f"image {index}" for index in range(pixels.shape[0])]
    settings = {"width": width, "height": height, "resize": "cover+centre-crop, bilinear antialiased", "source": source}
    if is_video_vae(vae):
        settings["length"] = frames
    shield_set = from_latents(torch.cat(latents), latent_format, names=names, images=pixels, settings=settings)
    hashes = tuple(hashlib.sha256(p.contiguous().numpy().tobytes()).hexdigest() for p in pixels)
    return dataclasses.replace(shield_set, hashes=hashes)


PREVIEW_ITEMS = 16
PREVIEW_CELL = 96


def preview_grid(images: torch.Tensor, columns: int = 4) -> torch.Tensor:
    """Up to PREVIEW_ITEMS images [N, H, W, 3] as one IMAGE [1, rows*cell, columns*cell, 3] (nearest resize)."""
    shown = images[:PREVIEW_ITEMS, ..., :3].float().clamp(0, 1)
    tiles = torch.nn.functional.interpolate(shown.movedim(-1, 1), size=(PREVIEW_CELL, PREVIEW_CELL), mode="nearest")
    columns = min(columns, tiles.shape[0])
    rows = -(-tiles.shape[0] // columns)
    grid = torch.zeros(3, rows * PREVIEW_CELL, columns * PREVIEW_CELL)
    for index, tile in enumerate(tiles):
        top, left = (index // columns) * PREVIEW_CELL, (index % columns) * PREVIEW_CELL
        grid[:, top : top + PREVIEW_CELL, left : left + PREVIEW_CELL] = tile
    return grid.movedim(0, -1)[None]


def set_preview(cls, shield_set: ShieldSet) -> Optional[ui.PreviewImage]:
    """Thumbnails of the set's images for the node (none for a latent-only set)."""
    if shield_set.images is None or len(shield_set) == 0:
        return None
    return ui.PreviewImage(preview_grid(shield_set.images), cls=cls)


FROM_IMAGES = "Shield Set from Images"


def read_input_folder(folder: str, width: int, height: int) -> tuple[torch.Tensor, list[str]]:
    """The images of input/<folder>, each scaled to cover width x height and centre-cropped (as the IMAGE
    path does, one image at a time so mixed sizes stack), and their relative names."""
    where = f"{FROM_IMAGES}: folder"
    input_dir = folder_paths.get_input_directory()
    root = image_folder.resolve_input_folder(input_dir, folder, where)
    listing = image_folder.list_image_folder(root, where, input_dir)
    progress = comfy.utils.ProgressBar(len(listing.images))

    def before_each():
        comfy.model_management.throw_exception_if_processing_interrupted()
        progress.update(1)

    pixels = image_folder.read_folder_images(
        listing, where, lambda image: cover_and_centre_crop(image, width, height), before_each
    )
    return pixels, [str(path.relative_to(root)) for path in listing.images]


class ShieldSetFromImages(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldSetFromImages",
            display_name=FROM_IMAGES,
            category=f"{CATEGORY}/sets",
            description="Encodes protected images (an IMAGE batch, or every image of a folder under ComfyUI's input "
            "directory) to latents at the generation's size. Each image is scaled to cover width x height (aspect kept) "
            "and centre-cropped. Results are cached by pixel hash per VAE.",
            inputs=[
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip="The images to protect (an IMAGE batch). Connect this or set folder, not both.",
                ),
                io.Vae.Input("vae", tooltip="The VAE of the model you will generate with."),
                io.Model.Input(
                    "model",
                    tooltip="The model you will generate with; only its latent format is read, so "
                    "the set is never used with another model family.",
                ),
                io.Int.Input(
                    "width",
                    default=512,
                    min=16,
                    max=16384,
                    step=8,
                    tooltip="Generation width in pixels (Empty Latent Image's width).",
                ),
                io.Int.Input(
                    "height",
                    default=512,
                    min=16,
                    max=16384,
                    step=8,
                    tooltip="Generation height in pixels (Empty Latent Image's height).",
                ),
                io.String.Input(
                    "folder",
                    default="",
                    optional=True,
                    tooltip="A sub-folder of ComfyUI's input directory "
                    "whose images (png, jpg, webp, bmp, gif, tif; sub-folders included) are protected. Empty "
                    "uses the images input instead. Non-image files are skipped (logged); a corrupt image is an error.",
                ),
                io.Int.Input(
                    "length",
                    default=1,
                    min=1,
                    max=4096,
                    step=1,
                    optional=True,
                    tooltip="Video models only (a VAE that makes [C, T, H, W] latents, e.g. Wan): the clip length in "
                    "frames (the empty video latent's length). Each image becomes a still clip of this many frames, "
                    "so a shield is a whole clip. Must stay 1 for image models. To protect a real clip, VAE Encode "
                    "its frames and use Shield Set from Latents.",
                ),
            ],
            outputs=[SHIELD_SET.Output(display_name="shield_set")],
        )

    @classmethod
    def validate_inputs(cls, folder: str = "", **unused) -> bool | str:
        if folder:
            try:
                image_folder.resolve_input_folder(folder_paths.get_input_directory(), folder, f"{FROM_IMAGES}: folder")
            except ShieldSetError as error:
                return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **unused) -> str:
        # A folder is state outside the graph: re-run when its files change (the encode cache still
        # skips the VAE when the pixels are the same).
        if not folder:
            return ""
        try:
            input_dir = folder_paths.get_input_directory()
            root = image_folder.resolve_input_folder(input_dir, folder, FROM_IMAGES)
            return image_folder.list_image_folder(root, FROM_IMAGES, input_dir).fingerprint()
        except ShieldSetError:
            return f"invalid:{time.monotonic_ns()}"  # let execute raise the clear error

    @classmethod
    def execute(cls, images=None, vae=None, model=None, width=512, height=512, folder="", length=1) -> io.NodeOutput:
        if (images is None) == (not folder):
            raise ShieldSetError(f"{FROM_IMAGES}: connect the images input or set folder (exactly one of them)")
        if length != 1 and not is_video_vae(vae):
            raise ShieldSetError(
                f"{FROM_IMAGES}: length is {length}, but this VAE makes image latents; length applies to video "
                "models only. Set length to 1."
            )
        names, source = None, "images"
        if folder:
            images, names = read_input_folder(folder, width, height)
            source = f"folder:{folder}"
        if images.shape[0] == 0:
            raise ShieldSetError(f"{FROM_IMAGES}: the images input is an empty batch")
        if not torch.isfinite(images).all():
            raise ShieldSetError(f"{FROM_IMAGES}: the images contain NaN or inf")
        latent_format = latent_format_name(model)
        key = (
            hashlib.sha256(images.float().contiguous().cpu().numpy().tobytes()).hexdigest(),
            width,
            height,
            latent_format,
            source,
            tuple(names or ()),
            length,
        )
        per_vae = _ENCODE_CACHE.setdefault(vae, BoundedCache(_ENCODE_CACHE_PER_VAE))
        shield_set = per_vae.get_or_build(
            key, lambda: encode_images(vae, images, latent_format, width, height, names, source, length)
        )
        return io.NodeOutput(shield_set, ui=set_preview(cls, shield_set))


class ShieldSetFromLatents(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldSetFromLatents",
            display_name="Shield Set from Latents",
            category=f"{CATEGORY}/sets",
            description="Turns a LATENT batch (e.g. earlier generations or VAE Encode output) into a shield set.",
            inputs=[
                io.Latent.Input("latent", tooltip="The latents to protect, as VAE Encode or a sampler outputs them."),
                io.Model.Input("model", tooltip="The model these latents belong to; only its latent format is read."),
            ],
            outputs=[SHIELD_SET.Output(display_name="shield_set")],
        )

    @classmethod
    def execute(cls, latent, model) -> io.NodeOutput:
        samples = latent["samples"]
        if getattr(samples, "is_nested", False):
            raise ShieldSetError("Shield Set from Latents: nested (multi-part) latents are not supported")
        return io.NodeOutput(from_latents(samples, latent_format_name(model), settings={"source": "latents"}))


class SaveShieldSet(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldSaveShieldSet",
            display_name="Save Shield Set",
            category=f"{CATEGORY}/sets",
            description="Saves a shield set as safetensors (with metadata) under models/shield_sets.",
            inputs=[
                SHIELD_SET.Input("shield_set", tooltip="The set to save."),
                io.String.Input(
                    "filename",
                    default="my_shields",
                    tooltip="File name inside models/shield_sets "
                    "(.safetensors is added; sub-folders allowed, '..' and absolute paths are refused).",
                ),
                io.Boolean.Input(
                    "overwrite",
                    default=False,
                    tooltip="Replace an existing file of that name; off adds a number (_1, _2, ...) instead.",
                ),
                io.Combo.Input(
                    "storage",
                    options=list(STORAGE_DTYPES),
                    default="float32",
                    optional=True,
                    tooltip="Latent precision on disk. float16 halves the file and the reads of large sets; the "
                    "rounded values then ARE the shields (distances stay exact on them). float32 keeps them as made.",
                ),
            ],
            outputs=[io.String.Output("path", tooltip="Where the file was written.")],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename, **unused) -> bool | str:
        try:
            resolve_inside(shield_folder(), filename, "Save Shield Set: filename")
        except ShieldSetError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, shield_set, filename, overwrite, storage="float32") -> io.NodeOutput:
        path = resolve_inside(shield_folder(), filename, "Save Shield Set: filename")
        path = save_shield_set(shield_set, path, storage, overwrite=overwrite)
        text = f"saved {shield_set.describe()} to {path}"
        logger.info(text)
        return io.NodeOutput(str(path), ui={"text": [text]})


class LoadShieldSet(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldLoadShieldSet",
            display_name="Load Shield Set",
            category=f"{CATEGORY}/sets",
            description="Loads a shield set saved by Save Shield Set (safetensors; nothing is unpickled).",
            inputs=[
                io.Combo.Input(
                    "filename",
                    options=shield_set_files(),
                    tooltip="A file in models/shield_sets. Its latents are memory-mapped, so large sets stay on disk.",
                )
            ],
            outputs=[SHIELD_SET.Output(display_name="shield_set")],
        )

    @classmethod
    def fingerprint_inputs(cls, filename) -> str:
        try:
            stat = resolve_set_file(filename).stat()
        except (ShieldSetError, OSError):
            return f"invalid:{time.monotonic_ns()}"  # let execute raise the clear error
        # ctime too: a file changed in place with its mtime put back (touch -r, rsync -t) is read again
        return f"{filename}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_size}:{stat.st_ino}"

    @classmethod
    def execute(cls, filename) -> io.NodeOutput:
        shield_set = load_shield_set(resolve_set_file(filename), on_chunk=progress_reporter())
        return io.NodeOutput(shield_set, ui=set_preview(cls, shield_set))


MEMORY_NAME = "Shield Memory"


def memory_spec(memory_id: str, store: str, max_items: int, when_full: str, redis_url: str) -> MemorySpec:
    """The Shield Memory node's inputs as a spec (an empty redis_url: SHIELD_MEMORY_REDIS_URL or the default)."""
    return MemorySpec(
        memory_id, store, max_items, when_full, (redis_url.strip() or default_url()) if store == "redis" else ""
    )


class ShieldMemory(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldMemory",
            display_name=MEMORY_NAME,
            category=f"{CATEGORY}/sets",
            description="A shield set that grows with the final latents of every generation that used it (SPELL §4.2: "
            "repel from previous batches). Kept in this server until restart, in a file under models/shield_sets/memories "
            "that survives restarts, or in a Redis server shared by a farm of ComfyUI servers.",
            inputs=[
                io.String.Input(
                    "memory_id",
                    default="default",
                    tooltip="Name of the memory; graphs using the same name (and store) share it. For the file and "
                    "redis stores: letters, digits, '_', '-', '.'.",
                ),
                io.Boolean.Input(
                    "reset", default=False, tooltip="Empty the memory every time this node runs (off keeps growing it)."
                ),
                io.Combo.Input(
                    "store",
                    options=list(STORES),
                    default="server",
                    optional=True,
                    tooltip="Where the memory lives. server: in this ComfyUI process, gone at restart. file: "
                    "models/shield_sets/memories/<memory_id>.shield-memory, append-only, survives restarts and "
                    "crashes (a kill loses at most the run being written). redis: a Redis server shared by several "
                    "ComfyUI servers (see redis_url).",
                ),
                io.Int.Input(
                    "max_items",
                    default=DEFAULT_CAP,
                    min=1,
                    max=MAX_CAP,
                    optional=True,
                    tooltip="Cap on remembered outputs; what happens beyond it is when_full's choice.",
                ),
                io.Combo.Input(
                    "when_full",
                    options=list(WHEN_FULL),
                    default="drop oldest",
                    optional=True,
                    tooltip="At the cap: drop oldest forgets the oldest outputs to make room; refuse stops with an "
                    "error before sampling (and refuses a run that would overflow), keeping the memory as it is.",
                ),
                io.String.Input(
                    "redis_url",
                    default="",
                    optional=True,
                    tooltip="For store redis: the shared Redis server, e.g. redis://10.0.0.5:6379/0. Empty uses the "
                    "SHIELD_MEMORY_REDIS_URL environment variable of this server, else redis://127.0.0.1:6379/0. "
                    "Ignored by the other stores.",
                ),
            ],
            outputs=[SHIELD_SET.Output(display_name="shield_set")],
        )

    @classmethod
    def validate_inputs(cls, memory_id, store="server", redis_url="", **unused) -> bool | str:
        try:
            MemorySpec(memory_id, store, redis_url=redis_url)
        except ShieldSetError as error:
            return str(error)
        return True

    @classmethod
    def fingerprint_inputs(
        cls, memory_id, reset, store="server", max_items=DEFAULT_CAP, when_full="drop oldest", redis_url=""
    ) -> str:
        # The memory is state outside the graph: re-run whenever it grew, and always when resetting.
        if reset:
            return f"reset:{time.monotonic_ns()}"
        try:
            key = MEMORY.open(memory_spec(memory_id, store, max_items, when_full, redis_url))
            return f"{key}:{MEMORY.version(key)}"
        except ShieldSetError:
            return f"invalid:{time.monotonic_ns()}"  # let execute raise the clear error

    @classmethod
    def execute(
        cls, memory_id, reset, store="server", max_items=DEFAULT_CAP, when_full="drop oldest", redis_url=""
    ) -> io.NodeOutput:
        spec = memory_spec(memory_id, store, max_items, when_full, redis_url)
        key = MEMORY.open(spec)
        if reset:
            MEMORY.reset(key)
        contents = MEMORY.contents(key)
        if spec.when_full == "refuse" and len(contents) >= spec.cap:
            raise full_error(spec, len(contents), 1)
        text = f"{spec.describe()}: {len(contents)} earlier outputs remembered (max_items {spec.cap}, {spec.when_full})"
        return io.NodeOutput(contents.as_shield_set(key), ui={"text": [text]})


def restore_file_memories() -> None:
    """At startup: read every persisted memory, so a damaged file is reported in the log (the server
    starts anyway; the memory's node then errors naming the file and offering the reset)."""
    for spec in FILE_STORE.stored_specs():
        key = MEMORY.open(spec)
        try:
            logger.info("Shield Memory: restored %s with %d entries", spec.describe(), len(MEMORY.contents(key)))
        except ShieldSetError as error:
            logger.warning("%s", error)


FILE_STORE = FileStore(lambda: pathlib.Path(shield_folder()) / MEMORY_FOLDER)
MEMORY.attach_store("file", FILE_STORE)
MEMORY.attach_store("redis", RedisStore())
restore_file_memories()


class ShieldRadiusCalibration(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldRadiusCalibration",
            display_name="Shield Radius Calibration",
            category=f"{CATEGORY}/utils",
            description="Median pairwise L2 distance of a plain batch (the SPELL paper's radius scale, appendix D), "
            "in absolute latent units and relative to sqrt(latent size). Feed it a batch generated without repellency.",
            inputs=[
                io.Latent.Input("latent", tooltip="A batch of at least 2 latents generated without repellency."),
                io.Model.Input(
                    "model", tooltip="The model that made them (its latent scaling is applied before measuring)."
                ),
            ],
            outputs=[
                io.Float.Output(
                    "median_relative", tooltip="Median distance / sqrt(latent size): a relative radius scale."
                ),
                io.String.Output("report", tooltip="The numbers and a suggested radius range."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent, model) -> io.NodeOutput:
        samples = latent["samples"]
        require_latent_batch(samples, "Shield Radius Calibration: 'latent'")
        if samples.shape[0] < 2:
            raise ValueError("Shield Radius Calibration: latent needs a batch of at least 2 (raise batch_size)")
        scaled = to_model_space(samples, latent_format_of(model))
        median = spell_math.median_pairwise_distance(scaled)
        relative = median / samples[0].numel() ** 0.5
        text = (
            f"median pairwise distance {median:.3f} (relative {relative:.4f} x sqrt({samples[0].numel()})) over "
            f"{samples.shape[0]} latents; the paper tries radii from 0 to 2x the median: relative radius "
            f"{0.25 * relative:.3f}..{relative:.3f} is a gentle-to-strong range"
        )
        return io.NodeOutput(relative, text, ui={"text": [text]})


SHIELD_SET_NODES = [
    ShieldSetFromImages,
    ShieldSetFromLatents,
    SaveShieldSet,
    LoadShieldSet,
    ShieldMemory,
    ShieldRadiusCalibration,
]
