"""The demo dataset: small RGB images of one flat-coloured shape on a dark background, rendered with PIL.

Memorization comes from duplication inside a varied class, as on web-scale data. Three kinds of classes:
- *memorizable* (MEMORIZABLE_CLASSES): many unique items, plus DUPLICATED_PER_CLASS items each repeated
  DUPLICATE_COPIES times in the training stream (two thirds of the class's stream). Plain sampling copies
  the duplicated items often and otherwise has the rest of the class to offer: novel items to steer to.
- *control* (CONTROL_CLASSES): unique items only; nothing to copy, the model has to generalize.
- *few-shot* (FEW_SHOT_CLASSES): a handful of items seen many times and nothing else (ProCreate §5's
  few-image fine-tuning): the model knows the class only through them.
Every class gets the same share of the training stream (STREAM_PER_CLASS draws per epoch).

An item is its `ItemParams` (class, tone, centre, size, rotation, a shape detail): distinct items differ
in geometry, not only in colour; `render` draws any params, so a copy detector can be trained on items
the generator never saw (`random_params`, `render_items`). Nothing is downloaded: shapes are polygons
and ellipses drawn at 4× and box-filtered down (exact-coverage antialiasing, no ringing).

Images are float tensors [N, 3, H, W] in [-1, 1], the range of ComfyUI's `pixel_space` VAE latents.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import torch
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SUPERSAMPLING = 4
MEMORIZABLE_CLASSES = ("star", "moon", "cross", "triangle")  # shapes with an angle: many distinct items
CONTROL_CLASSES = ("circle", "square", "ring")
FEW_SHOT_CLASSES = ("heart",)
CLASS_NAMES = MEMORIZABLE_CLASSES + CONTROL_CLASSES + FEW_SHOT_CLASSES
STREAM_PER_CLASS = 576  # training draws per class and epoch
DUPLICATED_PER_CLASS = 2  # duplicated items of each memorizable class ...
# ... each repeated this often per epoch (2 × 192 of 576 draws: 67 %). At 128 (44 %) the CPU-trained model
# copied no duplicated item in pixels (docs/demo_model.md); the bundled model's first stage was trained so.
DUPLICATE_COPIES = 192
UNIQUE_PER_CLASS = STREAM_PER_CLASS - DUPLICATED_PER_CLASS * DUPLICATE_COPIES  # 192 in a memorizable class
FEW_SHOT_ITEMS = 4  # items of a few-shot class, each STREAM_PER_CLASS / FEW_SHOT_ITEMS times
DEFAULT_SEED = 20241210

BACKGROUND = (18, 20, 30)
# The shape's colour lies on the segment between two warm tones (`ItemParams.tone` in [0, 1]). A
# continuous, one-dimensional colour keeps the items varied while a small model learns it in minutes:
# with a palette of distinct colours, short trainings averaged them into grey-brown shapes.
TONE_ENDS = ((250, 204, 84), (238, 108, 92))  # gold, coral
RADIUS_RANGE = (0.18, 0.30)  # of the image side


@dataclass(frozen=True)
class ItemParams:
    """Everything that makes an item: draw it with `render`. Geometry in units of the image side."""

    class_id: int
    tone: float  # in [0, 1]: from TONE_ENDS[0] to TONE_ENDS[1]
    center: tuple[float, float]
    radius: float
    rotation: float  # radians
    detail: float  # in [0, 1]: ring and cross thickness, moon's bite, star's inner radius


@dataclass(frozen=True)
class DemoDataset:
    """The distinct items and how often each appears in the training stream."""

    images: torch.Tensor  # [N, 3, H, W] in [-1, 1], every distinct item once
    labels: torch.Tensor  # [N] class index into CLASS_NAMES
    copies: torch.Tensor  # [N] how many times the item appears in the training stream per epoch
    params: tuple[ItemParams, ...]
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def duplicated(self) -> torch.Tensor:
        """[N] bool: the items repeated in training (those of memorizable and few-shot classes)."""
        return self.copies > 1

    def training_stream(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and labels of one epoch of training draws, duplicates expanded."""
        indices = torch.repeat_interleave(torch.arange(len(self.labels)), self.copies)
        return indices, self.labels[indices]

    def class_items(self, name_or_index: str | int, duplicated: bool | None = None) -> torch.Tensor:
        """Indices of a class's items; only the duplicated (True) or unique (False) ones if asked."""
        keep = self.labels == class_index(name_or_index)
        if duplicated is not None:
            keep &= self.duplicated == duplicated
        return keep.nonzero().flatten()


def class_index(name_or_index: str | int) -> int:
    if isinstance(name_or_index, int):
        if not 0 <= name_or_index < len(CLASS_NAMES):
            raise ValueError(f"class id must lie in [0, {len(CLASS_NAMES)}), got {name_or_index}")
        return name_or_index
    if name_or_index not in CLASS_NAMES:
        raise ValueError(f"unknown demo class {name_or_index!r}; choose one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES.index(name_or_index)


def class_kind(name_or_index: str | int) -> str:
    """'memorizable', 'control' or 'few-shot'."""
    name = CLASS_NAMES[class_index(name_or_index)]
    if name in MEMORIZABLE_CLASSES:
        return "memorizable"
    return "control" if name in CONTROL_CLASSES else "few-shot"


def has_duplicates(name_or_index: str | int) -> bool:
    """True for the classes whose training items include duplicated ones (memorizable and few-shot)."""
    return class_kind(name_or_index) != "control"


def random_params(class_id: int, rng: random.Random) -> ItemParams:
    """A random item of a class: tone, size, place (the shape stays inside the image), angle, detail."""
    radius = rng.uniform(*RADIUS_RANGE)
    margin = radius * 1.15
    return ItemParams(
        class_id=class_index(class_id),
        tone=rng.random(),
        center=(rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin)),
        radius=radius,
        rotation=rng.uniform(0, 2 * math.pi),
        detail=rng.random(),
    )


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float, inner: float = 1.0) -> list:
    """A regular polygon, or a star when `inner` < 1 (every other vertex at inner × radius)."""
    points = []
    steps = corners * (2 if inner < 1.0 else 1)
    for k in range(steps):
        angle = rotation + 2 * math.pi * k / steps
        r = radius * (inner if inner < 1.0 and k % 2 else 1.0)
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def _rotated(points: list, cx: float, cy: float, rotation: float) -> list:
    c, s = math.cos(rotation), math.sin(rotation)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _heart(cx: float, cy: float, radius: float, rotation: float) -> list:
    """The classic heart curve, scaled to `radius`, tip down before rotation."""
    points = []
    for k in range(96):
        t = 2 * math.pi * k / 96
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        points.append((x * radius / 16, (y + 2.5) * radius / 16))
    return _rotated(points, cx, cy, rotation)


def _draw_shape(draw: ImageDraw.ImageDraw, params: ItemParams, scale: float) -> None:
    cx, cy = params.center[0] * scale, params.center[1] * scale
    radius, rotation, detail = params.radius * scale, params.rotation, params.detail
    color = tone_color(params.tone)
    shape = CLASS_NAMES[params.class_id]
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    elif shape == "ring":
        width = radius * (0.25 + 0.2 * detail)
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
        inner = radius - width
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=BACKGROUND)
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, radius * 1.15, 4, rotation), fill=color)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 3, rotation), fill=color)
    elif shape == "star":
        draw.polygon(_polygon(cx, cy, radius * 1.2, 5, rotation, inner=0.38 + 0.14 * detail), fill=color)
    elif shape == "cross":
        arm = radius * (0.22 + 0.12 * detail)
        bar = [(-radius, -arm), (radius, -arm), (radius, arm), (-radius, arm)]
        draw.polygon(_rotated(bar, cx, cy, rotation), fill=color)
        draw.polygon(_rotated(bar, cx, cy, rotation + math.pi / 2), fill=color)
    elif shape == "moon":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
        offset = radius * (0.5 + 0.3 * detail)
        bx, by = cx + offset * math.cos(rotation), cy + offset * math.sin(rotation)
        bite = radius * 0.9
        draw.ellipse((bx - bite, by - bite, bx + bite, by + bite), fill=BACKGROUND)
    elif shape == "heart":
        draw.polygon(_heart(cx, cy, radius * 1.1, (rotation - math.pi) * 0.1), fill=color)  # tilted ±18°, upright
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(params: ItemParams, size: int = IMAGE_SIZE) -> Image.Image:
    """The item as a size×size RGB image (drawn at SUPERSAMPLING×, box-filtered down)."""
    canvas = size * SUPERSAMPLING
    image = Image.new("RGB", (canvas, canvas), BACKGROUND)
    _draw_shape(ImageDraw.Draw(image), params, canvas)
    return image.resize((size, size), Image.BOX)


def render_item(class_id: int, rng: random.Random) -> Image.Image:
    """A fresh random item of a class, drawn."""
    return render(random_params(class_id, rng))


def render_items(params: list[ItemParams] | tuple[ItemParams, ...]) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1]."""
    return torch.stack([pil_to_tensor(render(p)) for p in params])


def tone_color(tone: float) -> tuple[int, int, int]:
    """The RGB colour of a tone in [0, 1]."""
    if not 0.0 <= tone <= 1.0:
        raise ValueError(f"tone must lie in [0, 1], got {tone}")
    return tuple(round(a + (b - a) * tone) for a, b in zip(*TONE_ENDS, strict=True))


def recolored(params: ItemParams, tone: float) -> ItemParams:
    """The same geometry in another tone: a copy, to a person and to a copy detector."""
    return replace(params, tone=tone)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """[3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def class_params(
    class_id: int, seed: int = DEFAULT_SEED, duplicate_copies: int = DUPLICATE_COPIES
) -> tuple[list[ItemParams], list[int]]:
    """A class's distinct items and the copies of each per epoch: duplicated items first (the same items
    for any `duplicate_copies`; fewer copies leave room for more unique items after them)."""
    rng = random.Random(seed * 1000 + class_id)
    kind = class_kind(class_id)
    if kind == "few-shot":
        return [random_params(class_id, rng) for _ in range(FEW_SHOT_ITEMS)], [
            STREAM_PER_CLASS // FEW_SHOT_ITEMS
        ] * FEW_SHOT_ITEMS
    duplicated = DUPLICATED_PER_CLASS if kind == "memorizable" else 0
    unique = STREAM_PER_CLASS - duplicated * duplicate_copies
    items = [random_params(class_id, rng) for _ in range(duplicated + unique)]
    return items, [duplicate_copies] * duplicated + [1] * unique


def build_dataset(seed: int = DEFAULT_SEED, duplicate_copies: int = DUPLICATE_COPIES) -> DemoDataset:
    """The same dataset for the same seed, on every machine (PIL rendering is deterministic).
    `duplicate_copies` other than DUPLICATE_COPIES: only to reproduce the demo model's first training stage."""
    if not 1 < duplicate_copies <= STREAM_PER_CLASS // DUPLICATED_PER_CLASS:
        raise ValueError(
            f"duplicate_copies must lie in (1, {STREAM_PER_CLASS // DUPLICATED_PER_CLASS}], got {duplicate_copies}"
        )
    params, labels, copies = [], [], []
    for class_id in range(len(CLASS_NAMES)):
        items, counts = class_params(class_id, seed, duplicate_copies)
        params += items
        labels += [class_id] * len(items)
        copies += counts
    return DemoDataset(render_items(params), torch.tensor(labels), torch.tensor(copies), tuple(params))


def held_out_params(count_per_class: int, seed: int) -> list[ItemParams]:
    """Fresh random items of every class, for evaluators (a detector's or classifier's test set).
    Use a seed other than the dataset's; the items are new draws, not training items."""
    if seed == DEFAULT_SEED:
        raise ValueError("held_out_params: pass a seed other than DEFAULT_SEED (that one draws the training items)")
    params = []
    for class_id in range(len(CLASS_NAMES)):
        rng = random.Random(seed * 1000 + class_id + 7919)
        params += [random_params(class_id, rng) for _ in range(count_per_class)]
    return params


def to_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] -> ComfyUI IMAGE [N, H, W, 3] in [0, 1]."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).contiguous()


def from_comfy_image(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in [0, 1] -> [N, 3, H, W] in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() * 2.0 - 1.0
