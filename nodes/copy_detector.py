"""Shield Copy Detector Loader: an SSCD-style copy detector (core/copy_detector.py) as an EMBEDDER.

The bundled detector (reference_models/weights/demo_copy_detector.safetensors) is trained on the demo
domain by scripts/train_judge.py; detectors of the same format placed in ComfyUI/models/shield_copy_detectors
are listed too. The embedder serves the Shield Report (which then counts copies by the detector's
threshold) and ProCreate (which then repels in the detector's space).
"""

from __future__ import annotations

import hashlib
import os
import pathlib

import folder_paths
from comfy_api.v0_0_2 import io

from ..core.copy_detector import load_detector
from ..core.paths import real_path_inside
from ..reference_models.judge import DETECTOR_PATH
from ..samplers.embedders import CopyDetectorEmbedder
from .common import CATEGORY, EMBEDDER
from .validation import ShieldNode

FOLDER = "shield_copy_detectors"
BUNDLED = "demo (bundled)"
WHERE = "Shield Copy Detector Loader"
folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def detector_choices() -> list[str]:
    return [BUNDLED, *folder_paths.get_filename_list(FOLDER)]


def detector_path(name: str) -> pathlib.Path:
    """The file behind a choice: the bundled one, or a listed file whose real path stays in its folder."""
    if name == BUNDLED:
        return DETECTOR_PATH
    folders = folder_paths.get_folder_paths(FOLDER)
    for root in folders:
        if os.path.lexists(os.path.join(root, name)):
            return real_path_inside(pathlib.Path(root), name, f"{WHERE}: detector", "a file from the list", root)
    raise FileNotFoundError(
        f"{WHERE}: the detector file {name!r} is not in {' or '.join(folders)}; put the .safetensors file "
        f"there (scripts/train_judge.py writes one) or pick '{BUNDLED}'"
    )


def file_fingerprint(path: pathlib.Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


class ShieldCopyDetectorLoader(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldCopyDetectorLoader",
            display_name="Shield Copy Detector Loader",
            category=f"{CATEGORY}/report",
            description="Loads a copy detector (SSCD-style descriptor trained to ignore noise, colour, blur and "
            "small shifts) as an embedder: the Shield Report counts copies with its threshold, ProCreate repels "
            "in its space. The bundled one is trained on the demo model's domain (32x32 shapes).",
            inputs=[
                io.Combo.Input(
                    "detector",
                    options=detector_choices(),
                    default=BUNDLED,
                    tooltip=f"'{BUNDLED}': the demo-domain detector shipped with the pack. Other entries: "
                    f".safetensors files in ComfyUI/models/{FOLDER} written by scripts/train_judge.py.",
                ),
            ],
            outputs=[
                EMBEDDER.Output(
                    "embedder",
                    tooltip="A differentiable embedder whose cosine similarity at or above the detector's "
                    "threshold means 'a copy'.",
                )
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, detector) -> str:
        try:
            return file_fingerprint(detector_path(detector))
        except (OSError, ValueError):
            return "missing"  # execute raises the error that names the file

    @classmethod
    def execute(cls, detector) -> io.NodeOutput:
        path = detector_path(detector)
        loaded = load_detector(path, f"{WHERE} ({detector})")
        return io.NodeOutput(CopyDetectorEmbedder(loaded, file_fingerprint(path)))


NODES = [ShieldCopyDetectorLoader]
