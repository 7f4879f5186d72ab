"""Images from a folder under ComfyUI's input directory, read with PIL (no pickle, no ComfyUI import).

Policy (docs/spell.md): files whose extension is not an image format are skipped and listed in the
log; a file with an image extension that PIL cannot decode completely (corrupt, truncated) is an
error naming the file, because silently dropping a protected image would leave it unprotected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from . import paths
from .shield_set import ShieldSetError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclasses.dataclass(frozen=True)
class FolderListing:
    root: pathlib.Path
    images: tuple[pathlib.Path, ...]  # sorted by relative path, so the set's order is reproducible
    skipped: tuple[str, ...]  # relative names of non-image files

    def fingerprint(self) -> str:
        """Changes when a file is added, removed, renamed or rewritten (name, size, mtime)."""
        digest = hashlib.sha256(str(self.root).encode())
        for path in self.images:
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return digest.hexdigest()


FOLDER_EXAMPLES = "a sub-folder name such as 'my_protected_images'"


def resolve_input_folder(input_dir: str, folder: str, where: str) -> pathlib.Path:
    """input_dir/folder by the pack's path rule (core/paths.py): its real path must be inside input_dir."""
    paths.check_relative_name(folder, where, FOLDER_EXAMPLES)
    return paths.real_path_inside(pathlib.Path(input_dir), folder, where, FOLDER_EXAMPLES, "ComfyUI's input directory")


def list_image_folder(path: pathlib.Path, where: str, input_dir: Optional[str] = None) -> FolderListing:
    """The image files under `path` (recursively) and the non-image files that will be skipped.

    Symlinked files and sub-folders are followed when their real path is inside input_dir (default:
    `path` itself) and refused otherwise: an image from elsewhere never becomes a shield unnoticed."""
    if not path.is_dir():
        raise ShieldSetError(f"{where}: the folder {path} does not exist; create it under ComfyUI's input directory")
    real_root = pathlib.Path(input_dir if input_dir is not None else path).resolve()
    images, skipped = [], []
    for listed, real in paths.walk_files(path, real_root, where):
        (images if listed.suffix.lower() in IMAGE_EXTENSIONS else skipped).append((listed, real))
    if not images:
        raise ShieldSetError(
            f"{where}: the folder {path} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            + (f"; found only {len(skipped)} other file(s)" if skipped else "; it is empty")
        )
    skipped_names = tuple(str(listed.relative_to(path)) for listed, _ in skipped)
    if skipped_names:
        logger.warning(
            "%s: skipped %d non-image file(s) in %s: %s", where, len(skipped_names), path, ", ".join(skipped_names)
        )
    return FolderListing(path, tuple(listed for listed, _ in images), skipped_names)


def read_image(path: pathlib.Path, where: str) -> torch.Tensor:
    """[H, W, 3] float in [0, 1] (ComfyUI's IMAGE layout), EXIF orientation applied, first frame only.

    `load()` decodes every byte, so a truncated file raises here instead of giving a grey bottom."""
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as error:
        raise ShieldSetError(
            f"{where}: cannot read the image {path.name} ({error}); the file is corrupt or truncated. "
            f"Re-export it or remove it from the folder."
        ) from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def read_folder_images(
    listing: FolderListing,
    where: str,
    fit: Callable[[torch.Tensor], torch.Tensor],
    on_each: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Every image of the listing, each passed through `fit` ([1, h, w, 3] -> [1, H, W, 3], e.g. cover +
    centre crop to the generation size) so mixed sizes stack; [N, H, W, 3]. `on_each` runs before each
    file (interrupt check, progress)."""
    fitted = []
    for path in listing.images:
        if on_each is not None:
            on_each()
        fitted.append(fit(read_image(path, where)[None]))
    return torch.cat(fitted)
