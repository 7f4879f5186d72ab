"""The demo domain's judge: is a sample a copy, is it of the prompted class, is it clean (issue #10 items 2-3).

Three figures, each from a model that is neither the generator nor the other figures' model:
- copies: the SSCD-style copy detector (core/copy_detector.py): a sample copies a reference when their
  descriptor cosine similarity reaches the detector's threshold. Noise, colour, blur and a pixel or two
  of shift do not hide a copy; another item of the same class (another place, size or angle) is no copy.
- fidelity: class agreement, the share of samples an independent classifier (`ShapeClassifier`, another
  network trained with cross-entropy on the class labels) assigns to the prompted class.
- copies, second opinion: a second copy detector of another architecture and seed, used only for judging
  (`is_copy_second`): methods that repel in the first detector's space (embedding-space SPELL, ProCreate
  with the detector embedder) can edit a copy until the first detector stops flagging it; the second one is
  no method's embedder, so such an edit has to transfer to fool it (docs/judge.md "The second copy detector").
- quality: the Fréchet distance (Heusel et al. 2017, Eq. 6) of the classifier's pooled features of a
  batch to those of the class's training items, and a pixel-noise estimate (core/metrics.noise_sigma).

    judge = load_judge()
    judge.is_copy(samples, references).share      # samples, references: [N, 3, 32, 32] in [-1, 1]
    judge.is_copy_second(samples, references).share
    judge.class_agreement(samples, class_id)
    judge.quality(samples, class_id).frechet

All three models are trained by scripts/train_judge.py and bundled in reference_models/weights/. Plain torch;
nothing here imports ComfyUI.
"""

from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

from ..core import metrics
from ..core.copy_detector import CopyDetector, CopyDetectorError, load_detector
from .demo_dataset import CLASS_NAMES, IMAGE_SIZE, class_index

WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent / "weights"
DETECTOR_PATH = WEIGHTS_DIR / "demo_copy_detector.safetensors"
CLASSIFIER_PATH = WEIGHTS_DIR / "demo_classifier.safetensors"
# judging only: never offered by the Copy Detector Loader, never an embedder (nodes/copy_detector.py)
SECOND_DETECTOR_PATH = WEIGHTS_DIR / "demo_copy_detector_2nd.safetensors"
CLASSIFIER_FORMAT = "shield-demo-classifier"


class ShapeClassifier(torch.nn.Module):
    """Five 3×3 convolutions with ReLU and two max-pools, global average pooling (position-free
    features, unlike the detector's), a linear layer to the class logits."""

    def __init__(self, width: int = 16, classes: int = len(CLASS_NAMES)):
        super().__init__()
        c = width
        conv = torch.nn.Conv2d
        self.body = torch.nn.Sequential(
            conv(3, c, 3, padding=1), torch.nn.ReLU(), conv(c, c, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            conv(c, 2 * c, 3, padding=1), torch.nn.ReLU(), conv(2 * c, 2 * c, 3, padding=1), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), conv(2 * c, 4 * c, 3, padding=1), torch.nn.ReLU(),
        )  # fmt: skip
        self.logits = torch.nn.Linear(4 * c, classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] in [-1, 1] -> [N, 4·width] pooled features."""
        return self.body(images).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(images))


@dataclass(frozen=True)
class CopyVerdict:
    """Per image: the highest detector similarity to any reference, which reference, and the verdict."""

    similarity: torch.Tensor  # [N]
    nearest: torch.Tensor  # [N] index into the references
    threshold: float

    @property
    def is_copy(self) -> torch.Tensor:
        return self.similarity >= self.threshold

    @property
    def count(self) -> int:
        return int(self.is_copy.sum())

    @property
    def share(self) -> float:
        return self.count / max(len(self.similarity), 1)


@dataclass(frozen=True)
class Quality:
    frechet: float  # Fréchet distance of classifier features to the class's training items (lower: closer)
    noise: float  # estimated pixel-noise sigma in [-1, 1] units (0 for the clean renders)

    def as_dict(self) -> dict:
        return {"frechet": round(self.frechet, 3), "noise": round(self.noise, 4)}


def copy_verdict(detector: CopyDetector, images: torch.Tensor, references: torch.Tensor) -> CopyVerdict:
    """Which images copy one of the references by `detector` (both [N, 3, H, W] in [-1, 1])."""
    similarity, nearest = detector.similarity(images, references)
    return CopyVerdict(similarity, nearest, detector.threshold)


class Judge:
    def __init__(
        self,
        detector: CopyDetector,
        classifier: ShapeClassifier,
        class_mean,
        class_cov,
        second_detector: CopyDetector | None = None,
    ):
        self.detector = detector
        self.second_detector = second_detector
        self.classifier = classifier.eval().requires_grad_(False)
        self.class_mean = class_mean  # [classes, F] float64: the class's training items' features
        self.class_cov = class_cov  # [classes, F, F]

    @property
    def threshold(self) -> float:
        return self.detector.threshold

    def is_copy(self, images: torch.Tensor, references: torch.Tensor) -> CopyVerdict:
        """Which images copy one of the references (both [N, 3, H, W] in [-1, 1])."""
        return copy_verdict(self.detector, images, references)

    def is_copy_second(self, images: torch.Tensor, references: torch.Tensor) -> CopyVerdict:
        """The same question to the second, judging-only detector (its own threshold)."""
        if self.second_detector is None:
            raise ValueError(f"demo judge: no second copy detector loaded (expected {SECOND_DETECTOR_PATH})")
        return copy_verdict(self.second_detector, images, references)

    def classifier_input(self, images: torch.Tensor) -> torch.Tensor:
        return self.detector.prepare(images, "classifier") if images.shape[-1] != IMAGE_SIZE else images.float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """[N] class ids the classifier assigns."""
        return self.classifier(self.classifier_input(images)).argmax(dim=1)

    def class_agreement(self, images: torch.Tensor, class_ids: int | str | torch.Tensor) -> float:
        """Share of images the classifier assigns to their prompted class (one id for all, or [N])."""
        predicted = self.predict(images)
        if isinstance(class_ids, (int, str)):
            class_ids = torch.full_like(predicted, class_index(class_ids))
        return float((predicted == torch.as_tensor(class_ids).reshape(-1)).double().mean())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(self.classifier_input(images))

    def quality(self, images: torch.Tensor, class_id: int | str) -> Quality:
        """How far a batch lies from the class's training items (Fréchet) and how noisy it is."""
        index = class_index(class_id)
        stats = metrics.gaussian_stats(self.features(images))
        frechet = metrics.frechet_distance_from_stats(*stats, self.class_mean[index], self.class_cov[index])
        return Quality(frechet, float(metrics.noise_sigma(self.classifier_input(images)).mean()))


def save_classifier(model: ShapeClassifier, class_mean, class_cov, path: pathlib.Path, info: dict) -> None:
    tensors = {f"model.{name}": tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()}
    tensors["class_mean"] = class_mean.float().contiguous()  # statistics stay float32: FD is sensitive to them
    tensors["class_cov"] = class_cov.float().contiguous()
    metadata = {"format": CLASSIFIER_FORMAT, "class_names": json.dumps(list(CLASS_NAMES)), "training": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def load_classifier(path: pathlib.Path) -> tuple[ShapeClassifier, torch.Tensor, torch.Tensor, dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demo classifier: the weight file {path} does not exist; run scripts/train_judge.py")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise CopyDetectorError(f"demo classifier: {path} is damaged ({error}); run scripts/train_judge.py") from error
    if metadata.get("format") != CLASSIFIER_FORMAT or json.loads(metadata.get("class_names", "[]")) != list(
        CLASS_NAMES
    ):
        raise CopyDetectorError(f"demo classifier: {path} is not a classifier of the demo classes; retrain it")
    model = ShapeClassifier()
    model.load_state_dict({k[6:]: v.float() for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    info = json.loads(metadata.get("training", "{}"))
    return model, tensors["class_mean"].double(), tensors["class_cov"].double(), info


@functools.lru_cache(maxsize=2)
def load_judge(
    detector_path: str = str(DETECTOR_PATH),
    classifier_path: str = str(CLASSIFIER_PATH),
    second_detector_path: str = str(SECOND_DETECTOR_PATH),
) -> Judge:
    """The bundled judge (or one from other files); loaded once per set of paths."""
    classifier, mean, cov, _ = load_classifier(pathlib.Path(classifier_path))
    detector = load_detector(detector_path, "demo copy detector")
    second = load_detector(second_detector_path, "demo second copy detector (judging only)")
    return Judge(detector, classifier, mean, cov, second)
