"""Copies and pixel replicas of training items among samples of the demo model: plain torch, no ComfyUI.

A sample is *a copy* of an item when the copy detector says so (reference_models/judge.py: descriptor
similarity at or above its threshold; noise, colour, blur and a pixel of shift do not hide a copy,
another item of the same class is none): `summarize_copies`. Pixel L2 is the second, labelled column:

A sample replicates an item *in pixels* when its L2 distance (pixels in [-1, 1], 3×32×32 = 3072 values)
to the item is below REPLICA_DISTANCE = 6.0, i.e. a root-mean-square pixel error of 6.0/√3072 ≈ 0.108
(5.4 % of the value range): the same image up to faint noise. Noise or a colour shift defeats this
measure (a recoloured copy lies far away in L2), so it is the second, labelled column beside the
copy detector's verdict; it is not the definition of a copy. Distinct training items of the demo
dataset lie a median ≈11 apart; two control-class circles can coincide (docs/demo_model.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .judge import Judge, load_judge

REPLICA_DISTANCE = 6.0


def nearest_items(samples: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L2 distance [B] from each sample [B, C, H, W] to its nearest item [N, C, H, W], and its index [B]."""
    distances = torch.cdist(samples.flatten(1).double(), items.flatten(1).double())
    nearest, index = distances.min(dim=1)
    return nearest.float(), index


@dataclass(frozen=True)
class ReplicationSummary:
    samples: int
    replicas: int  # samples within REPLICA_DISTANCE of any item
    replicas_of_duplicated: int  # ... whose nearest item is a duplicated one
    replicas_of_unique: int
    median_distance: float
    distances: tuple[float, ...]
    nearest_index: tuple[int, ...]

    @property
    def share(self) -> float:
        return self.replicas / max(self.samples, 1)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "replicas": self.replicas,
            "replica_share": round(self.share, 4),
            "replicas_of_duplicated_items": self.replicas_of_duplicated,
            "replicas_of_unique_items": self.replicas_of_unique,
            "median_nearest_distance": round(self.median_distance, 3),
        }


def summarize_replication(
    samples: torch.Tensor, items: torch.Tensor, duplicated: torch.Tensor, threshold: float = REPLICA_DISTANCE
) -> ReplicationSummary:
    """How many samples copy an item; `duplicated` [N] bool marks the items repeated in training."""
    distance, index = nearest_items(samples, items)
    is_replica = distance < threshold
    of_duplicated = is_replica & duplicated[index]
    return ReplicationSummary(
        samples=len(distance),
        replicas=int(is_replica.sum()),
        replicas_of_duplicated=int(of_duplicated.sum()),
        replicas_of_unique=int((is_replica & ~duplicated[index]).sum()),
        median_distance=float(distance.median()) if len(distance) else float("nan"),
        distances=tuple(distance.tolist()),
        nearest_index=tuple(index.tolist()),
    )


@dataclass(frozen=True)
class CopySummary:
    """Copies by the copy detector (the definition), with the pixel-L2 replicas as a second column."""

    samples: int
    copies: int  # samples the copy detector calls a copy of some item
    copies_of_duplicated: int  # ... whose most similar item is a duplicated one
    similarity: tuple[float, ...]  # detector similarity to the most similar item
    copy_index: tuple[int, ...]  # that item
    threshold: float
    pixels: ReplicationSummary  # pixel L2 < REPLICA_DISTANCE: fooled by noise and colour, for comparison

    @property
    def share(self) -> float:
        return self.copies / max(self.samples, 1)

    def as_dict(self) -> dict:
        return {
            "samples": self.samples,
            "copies": self.copies,
            "copy_share": round(self.share, 4),
            "copies_of_duplicated_items": self.copies_of_duplicated,
            "detector_threshold": round(self.threshold, 4),
            "pixel_l2_replicas": self.pixels.replicas,
            "pixel_l2_median_nearest_distance": round(self.pixels.median_distance, 3),
        }


def summarize_copies(
    samples: torch.Tensor, items: torch.Tensor, duplicated: torch.Tensor, judge: Judge | None = None
) -> CopySummary:
    """How many samples [B, 3, H, W] in [-1, 1] copy one of the items, by the copy detector (the bundled
    demo judge unless one is given), and by pixel L2 beside it."""
    verdict = (judge or load_judge()).is_copy(samples, items)
    is_copy = verdict.is_copy
    return CopySummary(
        samples=len(is_copy),
        copies=int(is_copy.sum()),
        copies_of_duplicated=int((is_copy & duplicated[verdict.nearest]).sum()),
        similarity=tuple(verdict.similarity.tolist()),
        copy_index=tuple(verdict.nearest.tolist()),
        threshold=verdict.threshold,
        pixels=summarize_replication(samples, items, duplicated),
    )
