"""A copy detector in the spirit of SSCD: a small CNN descriptor, trained contrastively, and its file.

Pizzi et al., "A Self-Supervised Descriptor for Image Copy Detection", CVPR 2022 (SSCD), §3: a CNN maps
an image to a unit-length descriptor; training pulls the descriptors of two augmentations of one image
together and pushes those of distinct images apart (InfoNCE, §3.1), so that "a copy" (the image after
colour changes, noise, blur, small shifts and crops) scores a high cosine similarity and a distinct
image a low one. A pair is a copy when the cosine similarity of its descriptors reaches the detector's
threshold (§3.3 uses a threshold on the similarity too; ours is chosen on validation data by
scripts/train_judge.py and stored in the weight file).

Unlike SSCD's GeM pooling, the head reads the whole flattened feature map: in the demo domain two items of
one class differ by where the shape is, its size and its angle, so position must reach the descriptor.

The descriptor takes [N, 3, S, S] in [-1, 1] at its native size S; `prepare` resizes other sizes with a
logged note (the whole image, never a crop). Plain torch and safetensors; nothing here imports ComfyUI.
"""

from __future__ import annotations

import json
import logging
import pathlib
from dataclasses import dataclass, field

import safetensors
import safetensors.torch
import torch

logger = logging.getLogger(__name__)

FILE_FORMAT = "shield-copy-detector"
FORMAT_VERSION = "1"


ARCHITECTURES = ("strided", "pooled")
ACTIVATIONS = {"silu": torch.nn.SiLU, "relu": torch.nn.ReLU}


@dataclass(frozen=True)
class DetectorConfig:
    image_size: int = 32  # native input side
    width: int = 16  # channels of the first stage (doubled at each of the three downsamplings)
    dim: int = 128  # descriptor length
    # "strided": the bundled detector's six 3×3 convolutions, three of stride 2. "pooled": a 5×5 stem and two
    # 3×3 convolutions per stage, downsampled by 2×2 max-pooling (the second, judging-only detector: another
    # architecture, so an edit that fools one is less likely to fool the other).
    architecture: str = "strided"
    activation: str = "silu"  # "silu" (smooth gradients for guidance) or "relu"

    def as_json(self) -> str:
        return json.dumps(
            {
                "image_size": self.image_size,
                "width": self.width,
                "dim": self.dim,
                "architecture": self.architecture,
                "activation": self.activation,
            }
        )


def strided_stages(c: int) -> list[tuple[int, int, int, int]]:
    """(in, out, kernel, stride) of the bundled detector: S → S/8 by three stride-2 convolutions."""
    return [(3, c, 3, 1), (c, 2 * c, 3, 2), (2 * c, 2 * c, 3, 1), (2 * c, 4 * c, 3, 2), (4 * c, 4 * c, 3, 1),
            (4 * c, 8 * c, 3, 2)]  # fmt: skip


def feature_layers(config: DetectorConfig) -> tuple[list[torch.nn.Module], int]:
    """The convolutional body of `config` and the channels of its S/8 output map."""
    if config.architecture not in ARCHITECTURES or config.activation not in ACTIVATIONS:
        raise ValueError(
            f"copy detector: architecture must be one of {ARCHITECTURES} and activation one of "
            f"{tuple(ACTIVATIONS)}, got {config.architecture!r}, {config.activation!r}"
        )
    activation, c, layers = ACTIVATIONS[config.activation], config.width, []
    if config.architecture == "strided":
        for c_in, c_out, kernel, stride in strided_stages(c):
            layers += [torch.nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2), activation()]
        return layers, 8 * c
    stages = [(3, c, 5), (c, 2 * c, 3), (2 * c, 4 * c, 3)]  # pooled: three stages, each ending in a 2×2 max-pool
    for c_in, c_out, stem in stages:
        layers += [torch.nn.Conv2d(c_in, c_out, stem, padding=stem // 2), activation()]
        layers += [torch.nn.Conv2d(c_out, c_out, 3, padding=1), activation(), torch.nn.MaxPool2d(2)]
    return layers, 4 * c


class CopyDescriptor(torch.nn.Module):
    """A convolutional body to an S/8 map (`feature_layers`), then a linear head on the flattened map and
    L2 normalisation."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        super().__init__()
        if config.image_size % 8:
            raise ValueError(f"copy detector: image_size must be a multiple of 8, got {config.image_size}")
        self.config = config
        layers, channels = feature_layers(config)
        self.features = torch.nn.Sequential(*layers)
        side = config.image_size // 8
        self.head = torch.nn.Linear(channels * side * side, config.dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, dim] unit-length descriptors."""
        return torch.nn.functional.normalize(self.head(self.features(images).flatten(1)), dim=1, eps=1e-8)


class CopyDetectorError(ValueError):
    """A detector file that cannot be used; the message names the file and what to do."""


@dataclass
class CopyDetector:
    """A trained descriptor with its copy threshold (cosine similarity) and where it came from."""

    model: CopyDescriptor
    threshold: float
    path: str
    info: dict  # training facts from the file's metadata (seed, steps, validation numbers)
    noted_sizes: set = field(default_factory=set)  # (where, H, W) already logged as resized

    @property
    def image_size(self) -> int:
        return self.model.config.image_size

    def prepare(self, images: torch.Tensor, where: str = "copy detector") -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] at the detector's size: other sizes are resized whole (bilinear with
        antialiasing), with a logged note; a non-square image is squeezed, never cropped."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{where}: expected images [N, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"{where}: the image batch is empty; connect at least one image")
        size = self.image_size
        if images.shape[-2:] != (size, size):
            self.note_resize(where, images.shape, size)
            images = torch.nn.functional.interpolate(
                images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        return images.float()

    def note_resize(self, where: str, shape: torch.Size, size: int) -> None:
        """Log each resize once per caller and input size (guidance calls the detector at every step)."""
        if (where, *shape[-2:]) in self.noted_sizes:
            return
        self.noted_sizes.add((where, *shape[-2:]))
        logger.info(
            "%s: resizing images of %dx%d to the detector's %dx%d (the whole image, squeezed if not square; "
            "never cropped)",
            where,
            shape[-1],
            shape[-2],
            size,
            size,
        )

    def descriptors(self, images: torch.Tensor, where: str = "copy detector") -> torch.Tensor:
        """[N, dim] unit descriptors; differentiable w.r.t. `images` when the model holds normal tensors."""
        pixels = self.prepare(images, where)
        device = next(self.model.parameters()).device
        return self.model(pixels.to(device))

    def similarity(self, images: torch.Tensor, references: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each image, the highest descriptor cosine similarity to any reference, and its index."""
        with torch.no_grad():
            queries = self.descriptors(images, "copy detector (images)")
            keys = self.descriptors(references, "copy detector (references)")
        values, indices = (queries @ keys.T).max(dim=1)
        return values.float().cpu(), indices.cpu()


def save_detector(model: CopyDescriptor, threshold: float, path: pathlib.Path, info: dict) -> None:
    """float16 weights, the config, the threshold and the training facts as safetensors metadata."""
    metadata = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.as_json(),
        "threshold": repr(float(threshold)),
        "training": json.dumps(info),
    }
    tensors = {name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def _check_config_matches(config: DetectorConfig, state_dict: dict) -> None:
    """The config's layer shapes are the weights' (built on the meta device: nothing is allocated), so a
    config of absurd sizes in a small file is refused before the model is built, not after gigabytes."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in CopyDescriptor(config).state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state_dict.items()}
    if expected != found:
        raise ValueError(f"its config {config.as_json()} does not match its weights")


def load_detector(path: pathlib.Path | str, where: str = "copy detector") -> CopyDetector:
    """The detector in a safetensors file written by `save_detector`, in float32 on the CPU, frozen.

    A missing, damaged or foreign file raises an error that names the file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: the weight file {path} does not exist. Put a copy-detector .safetensors there "
            f"(scripts/train_judge.py writes one)"
        )
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        state_dict = safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise CopyDetectorError(
            f"{where}: {path} is damaged or not a safetensors file ({type(error).__name__}: {error}); "
            f"replace it with a file written by scripts/train_judge.py"
        ) from error
    if metadata.get("format") != FILE_FORMAT:
        raise CopyDetectorError(
            f"{where}: {path} is not a Shield copy-detector file (its metadata lacks format={FILE_FORMAT!r}); "
            f"use a file written by scripts/train_judge.py"
        )
    try:
        config = DetectorConfig(**json.loads(metadata["config"]))
        threshold = float(metadata["threshold"])
        if not -1.0 <= threshold <= 1.0:  # a cosine similarity (NaN fails too)
            raise ValueError(f"threshold {metadata['threshold']!r} is not a cosine similarity in [-1, 1]")
        _check_config_matches(config, state_dict)
        model = CopyDescriptor(config)
        model.load_state_dict({name: tensor.float() for name, tensor in state_dict.items()}, strict=True)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CopyDetectorError(
            f"{where}: {path} does not hold a complete copy detector ({type(error).__name__}: {error}); "
            f"replace it with a file written by scripts/train_judge.py"
        ) from error
    model.eval().requires_grad_(False)
    return CopyDetector(model, threshold, str(path), json.loads(metadata.get("training", "{}")))
