"""The demo dataset: small RGB images of shapes, digits and letters, rendered deterministically with PIL.

Two kinds of classes, the setting in which diffusion models memorize:
- *memorized* classes (MEMORIZED_CLASSES): their training items are one image repeated many times,
  the "memorized prompt" of the transition-point CFG paper (scenario 3: duplicated training images)
  and of few-image fine-tuning (ProCreate §5);
- the other classes hold many unique items, each seen once per epoch: the model generalizes there.
Nothing is downloaded: shapes are drawn with ImageDraw and glyphs with Pillow's built-in font
(`ImageFont.load_default(size=...)`).

Images are float tensors [N, 3, H, W] in [-1, 1], the range of ComfyUI's `pixel_space` VAE latents.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 32
SUPERSAMPLING = 4  # drawn at 4x, downsampled with LANCZOS: antialiased edges
CLASS_NAMES = ("circle", "square", "triangle", "cross", "star", "ring", "digit", "letter")
MEMORIZED_CLASSES = ("star", "ring", "digit", "letter")
UNIQUE_PER_CLASS = 48  # items of each other class, each once
DUPLICATED_PER_CLASS = 1  # items of each memorized class ...
DUPLICATE_COPIES = 100  # ... each repeated this often in the training stream
DEFAULT_SEED = 20240601

FOREGROUND_COLORS = (
    (230, 57, 70),
    (244, 162, 97),
    (233, 196, 106),
    (42, 157, 143),
    (69, 123, 157),
    (168, 218, 220),
    (181, 101, 167),
    (241, 250, 238),
)
BACKGROUND_COLORS = ((29, 53, 87), (20, 20, 20))  # two dark backgrounds: a simpler task for a minutes-long training


@dataclass(frozen=True)
class DemoDataset:
    """The unique items and how often each appears in training."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], every distinct item once
    labels: torch.Tensor  # [N] class index into CLASS_NAMES
    copies: torch.Tensor  # [N] how many times the item appears in the training stream
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def duplicated(self) -> torch.Tensor:
        return self.copies > 1

    def training_stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and labels of the training set with its duplicates expanded."""
        indices = torch.repeat_interleave(torch.arange(len(self.labels)), self.copies)
        return indices, self.labels[indices]


def is_memorized(name_or_index: str | int) -> bool:
    return CLASS_NAMES[class_index(name_or_index)] in MEMORIZED_CLASSES


def class_index(name_or_index: str | int) -> int:
    if isinstance(name_or_index, int):
        if not 0 <= name_or_index < len(CLASS_NAMES):
            raise ValueError(f"class id must lie in [0, {len(CLASS_NAMES)}), got {name_or_index}")
        return name_or_index
    if name_or_index not in CLASS_NAMES:
        raise ValueError(f"unknown demo class {name_or_index!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name_or_index)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float, inner: float = 1.0) -> list:
    points = []
    steps = corners * (2 if inner < 1.0 else 1)
    for k in range(steps):
        angle = rotation + 2 * math.pi * k / steps
        r = radius * (inner if inner < 1.0 and k % 2 else 1.0)
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    rotation: float,
    color: tuple,
    rng: random.Random,
) -> None:
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 4, rotation), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 3, rotation), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.25, 5, rotation, inner=0.45), fill=color)
    elif shape == "ring":
        draw.ellipse(box, outline=color, width=max(2, int(radius * 0.35)))
    elif shape == "cross":
        arm = radius * 0.35
        for angle in (rotation, rotation + math.pi / 2):
            dx, dy = math.cos(angle), math.sin(angle)
            nx, ny = -dy * arm, dx * arm
            ends = ((cx - dx * radius, cy - dy * radius), (cx + dx * radius, cy + dy * radius))
            draw.polygon(
                [
                    (ends[0][0] + nx, ends[0][1] + ny),
                    (ends[1][0] + nx, ends[1][1] + ny),
                    (ends[1][0] - nx, ends[1][1] - ny),
                    (ends[0][0] - nx, ends[0][1] - ny),
                ],
                fill=color,
            )
    elif shape in ("digit", "letter"):
        glyph = str(rng.randrange(10)) if shape == "digit" else chr(ord("A") + rng.randrange(26))
        draw.text((cx, cy), glyph, fill=color, font=_font(int(radius * 2.8)), anchor="mm")
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_item(class_id: int, rng: random.Random) -> Image.Image:
    """One item of a class; all randomness (colors, place, size, angle, glyph) comes from `rng`."""
    canvas = IMAGE_SIZE * SUPERSAMPLING
    background = rng.choice(BACKGROUND_COLORS)
    foreground = rng.choice(FOREGROUND_COLORS)
    image = Image.new("RGB", (canvas, canvas), background)
    radius = canvas * rng.uniform(0.22, 0.34)
    margin = radius * 1.1
    cx, cy = rng.uniform(margin, canvas - margin), rng.uniform(margin, canvas - margin)
    _draw_shape(
        ImageDraw.Draw(image), CLASS_NAMES[class_id], cx, cy, radius, rng.uniform(0, 2 * math.pi), foreground, rng
    )
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def build_dataset(
    seed: int = DEFAULT_SEED,
    unique_per_class: int = UNIQUE_PER_CLASS,
    duplicated_per_class: int = DUPLICATED_PER_CLASS,
    duplicate_copies: int = DUPLICATE_COPIES,
) -> DemoDataset:
    """The same dataset for the same arguments, on every machine (PIL rendering is deterministic).

    A memorized class holds `duplicated_per_class` items of `duplicate_copies` copies each; every other
    class holds `unique_per_class` items of one copy."""
    images, labels, copies = [], [], []
    for class_id, name in enumerate(CLASS_NAMES):
        rng = random.Random(seed * 1000 + class_id)
        memorized = name in MEMORIZED_CLASSES
        for _ in range(duplicated_per_class if memorized else unique_per_class):
            images.append(pil_to_tensor(render_item(class_id, rng)))
            labels.append(class_id)
            copies.append(duplicate_copies if memorized else 1)
    return DemoDataset(torch.stack(images), torch.tensor(labels), torch.tensor(copies))


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [N, H, W, 3] in [0, 1]."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def from_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in [0, 1] -> [N, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() * 2.0 - 1.0
