"""The changes that keep an image a copy, as random tensor transforms (SSCD, Pizzi et al. 2022, §3.2).

What the pack's methods do to a copy (issue #10): shift its colour or grey it, add pixel noise (SPELL
tiles had 2-3x plain sampling's), soften it, nudge it by a pixel or two. A copy detector trained with
these learns to ignore them; a distinct item (another position, size, angle or shape) stays distinct.

Images are [N, 3, H, W] in [-1, 1]; every draw comes from the `torch.Generator` passed in, so a
seeded generator gives the same augmentations on every run with the same torch build.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .demo_dataset import CLASS_NAMES


@dataclass(frozen=True)
class AugmentLevels:
    """Strength of each change; the defaults are the training distribution of the demo copy detector."""

    shift: float = 2.0  # pixels, uniform in ±shift on each axis (of a 32-pixel image)
    scale: float = 0.08  # uniform in 1 ± scale (a crop and rescale, or a zoom out)
    rotation: float = 5.0  # degrees, uniform in ±rotation
    colour: float = 1.0  # probability of a random colour change (hue, saturation, brightness, contrast)
    grey: float = 0.25  # probability of greyscale
    blur: float = 1.2  # largest gaussian blur sigma (pixels), applied with probability 0.5
    noise: float = 0.4  # largest gaussian noise sigma (in [-1, 1] units), applied with probability 0.8
    blotch: float = 0.3  # largest low-frequency noise sigma (8x8 noise upsampled), probability 0.3


CLEAN = AugmentLevels(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def uniform(count: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, generator=generator)


def chance(count: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(count, generator=generator) < probability).float()


def geometric(images: torch.Tensor, levels: AugmentLevels, generator: torch.Generator) -> torch.Tensor:
    """A small random shift, zoom and rotation; the border (background) fills what comes into view."""
    count, _, height, _ = images.shape
    angle = uniform(count, -levels.rotation, levels.rotation, generator) * math.pi / 180
    scale = uniform(count, 1 - levels.scale, 1 + levels.scale, generator)
    shift = uniform(2 * count, -levels.shift, levels.shift, generator).reshape(count, 2) * 2 / height
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=False)


def hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """[N, 3, 3] rotations of RGB about the grey axis (a hue shift that keeps luminance roughly)."""
    axis = torch.ones(3) / math.sqrt(3.0)
    cross = torch.tensor([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    outer = torch.outer(axis, axis)
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    return cos * torch.eye(3) + sin * cross + (1 - cos) * outer


def colour(images: torch.Tensor, levels: AugmentLevels, generator: torch.Generator) -> torch.Tensor:
    """Hue rotation, saturation, brightness and contrast changes, then greyscale for some images."""
    count = images.shape[0]
    apply = chance(count, levels.colour, generator)[:, None, None, None]
    pixels = (images + 1) / 2
    rotated = torch.einsum("nij,njhw->nihw", hue_matrix(uniform(count, -math.pi, math.pi, generator)), pixels)
    grey = rotated.mean(dim=1, keepdim=True)
    saturation = uniform(count, 0.3, 1.4, generator)[:, None, None, None]
    changed = grey + saturation * (rotated - grey)
    mean = changed.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(count, 0.5, 1.3, generator)[:, None, None, None]
    brightness = uniform(count, -0.15, 0.15, generator)[:, None, None, None]
    changed = mean + contrast * (changed - mean) + brightness
    pixels = apply * changed + (1 - apply) * pixels
    to_grey = chance(count, levels.grey, generator)[:, None, None, None]
    pixels = to_grey * pixels.mean(dim=1, keepdim=True).expand_as(pixels) + (1 - to_grey) * pixels
    return pixels.clamp(0, 1) * 2 - 1


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-image gaussian blur [N] sigmas (0: unchanged), 7-tap separable kernel, border replicated."""
    offsets = torch.arange(-3, 4, dtype=images.dtype)
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [N, 7]; sigma ~0 -> a delta
    count, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (3, 3, 3, 3), mode="replicate")
    rows = padded.unfold(3, 7, 1)  # [N, C, H+6, W, 7]
    blurred = (rows * kernel[:, None, None, None, :]).sum(-1)
    columns = blurred.unfold(2, 7, 1)  # [N, C, H, W, 7]
    return (columns * kernel[:, None, None, None, :]).sum(-1)


def noise(images: torch.Tensor, levels: AugmentLevels, generator: torch.Generator) -> torch.Tensor:
    count, _, height, width = images.shape
    sigma = uniform(count, 0, levels.noise, generator) * chance(count, 0.8, generator)
    grain = torch.randn(images.shape, generator=generator) * sigma[:, None, None, None]
    blotch_sigma = uniform(count, 0, levels.blotch, generator) * chance(count, 0.3, generator)
    coarse = torch.randn((count, 3, 8, 8), generator=generator)
    coarse = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return images + grain + coarse * blotch_sigma[:, None, None, None]


def augment(images: torch.Tensor, generator: torch.Generator, levels: AugmentLevels = AugmentLevels()) -> torch.Tensor:
    """A random copy of each image: geometry, colour, blur, noise (in that order), clamped to [-1, 1]."""
    images = geometric(images.float(), levels, generator)
    images = colour(images, levels, generator)
    sigma = uniform(images.shape[0], 0, levels.blur, generator) * chance(images.shape[0], 0.5, generator)
    images = gaussian_blur(images, sigma)
    return noise(images, levels, generator).clamp(-1, 1)


# -- which pairs of demo items are distinct (for evaluating a detector on independently drawn items) ----------
ROTATION_PERIOD = {"star": 72.0, "cross": 90.0, "square": 90.0, "triangle": 120.0, "moon": 360.0, "heart": 3600.0}
DETAIL_MATTERS = ("ring", "cross", "moon", "star")  # classes whose `detail` changes the outline
DISTINCT_SHIFT = 4.0  # pixels between centres: twice the largest shift of a copy
DISTINCT_SCALE = 0.16  # relative size difference: twice a copy's zoom
DISTINCT_ROTATION = 10.0  # degrees (modulo the shape's symmetry): twice a copy's rotation
# of `detail` in [0, 1]: its effect is subtle (a star's inner radius 0.38-0.52, a ring's width 0.25-0.45 of
# the radius), so only a large change makes another picture: a thin vs a thick ring, a shallow vs a deep star
DISTINCT_DETAIL = 0.6


def rotation_gap(first, second, name: str) -> float:
    """Degrees between two items' outlines, modulo the shape's symmetry (0 for circles and rings). The
    heart is drawn tilted by a tenth of its rotation, hence its long period."""
    if name not in ROTATION_PERIOD:
        return 0.0
    period = ROTATION_PERIOD[name]
    gap = abs(math.degrees(first.rotation - second.rotation)) % period
    return min(gap, period - gap) / (10.0 if name == "heart" else 1.0)


def clearly_distinct(first, second, image_size: int = 32) -> bool:
    """Two demo items (`ItemParams`) that no copy could turn into each other: another class, or a geometry
    beyond twice the augmentations' reach (place, size, angle, detail). Colour does not count. Two
    independent draws of a circle at nearly one place and size are the same picture, neither a copy
    nor distinct; an evaluation leaves such pairs out and says how many."""
    if first.class_id != second.class_id:
        return True
    name = CLASS_NAMES[first.class_id]
    shift = math.dist(first.center, second.center) * image_size
    scale = abs(first.radius - second.radius) / min(first.radius, second.radius)
    detail = abs(first.detail - second.detail) if name in DETAIL_MATTERS else 0.0
    return (
        shift > DISTINCT_SHIFT
        or scale > DISTINCT_SCALE
        or rotation_gap(first, second, name) > DISTINCT_ROTATION
        or detail > DISTINCT_DETAIL
    )
