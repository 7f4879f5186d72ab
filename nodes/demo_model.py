"""The bundled demo model as nodes: a MODEL, its class conditioning, and its training items.

The model works in pixel space: sample it on `EmptyChromaRadianceLatentImage` (3 channels, 32×32)
and decode with VAELoader's stock `pixel_space` VAE.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from comfy_api.v0_0_2 import io

from ..reference_models import demo_dataset, pixel_unet
from .common import CATEGORY
from .validation import ShieldNode

DEMO_CATEGORY = f"{CATEGORY}/demo"
ITEM_SELECTIONS = ("all", "duplicated", "unique")
CLASS_FILTER_ALL = "all classes"


class ShieldDemoModelLoader(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldDemoModelLoader",
            display_name="Shield Demo Model Loader",
            category=DEMO_CATEGORY,
            description=(
                "Loads the pack's bundled demo model: a small class-conditional pixel-space UNet trained on "
                f"{demo_dataset.IMAGE_SIZE}×{demo_dataset.IMAGE_SIZE} shapes. Memorizable classes "
                f"({', '.join(demo_dataset.MEMORIZABLE_CLASSES)}) hold many unique items plus two items repeated "
                "many times, which plain sampling copies often; control classes "
                f"({', '.join(demo_dataset.CONTROL_CLASSES)}) hold unique items only; the few-shot class "
                f"({', '.join(demo_dataset.FEW_SHOT_CLASSES)}) a handful of items seen many times. Sample on "
                "EmptyChromaRadianceLatentImage at 32×32 and decode with the pixel_space VAE."
            ),
            inputs=[],
            outputs=[
                io.Model.Output("model", tooltip="The demo UNet (V-prediction, ComfyUI's default discrete schedule).")
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(pixel_unet.load_demo_model())


class ShieldDemoConditioning(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldDemoConditioning",
            display_name="Shield Demo Conditioning",
            category=DEMO_CATEGORY,
            description="The demo model's conditioning for one class, and its unconditional (null class) one.",
            inputs=[
                io.Combo.Input(
                    "class_name",
                    options=list(demo_dataset.CLASS_NAMES),
                    default="star",
                    tooltip="Which class of the demo dataset to sample. Without a shield, memorizable classes ("
                    f"{', '.join(demo_dataset.MEMORIZABLE_CLASSES)}) often reproduce one of their duplicated "
                    f"training items, the few-shot class ({', '.join(demo_dataset.FEW_SHOT_CLASSES)}) nearly always; "
                    f"control classes ({', '.join(demo_dataset.CONTROL_CLASSES)}) have nothing duplicated to copy.",
                ),
            ],
            outputs=[
                io.Conditioning.Output("positive", tooltip="The class token: connect to the sampler's positive."),
                io.Conditioning.Output(
                    "negative",
                    tooltip="The null-class token the model learned as unconditional: the sampler's negative.",
                ),
            ],
        )

    @classmethod
    def execute(cls, class_name: str) -> io.NodeOutput:
        return io.NodeOutput(pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning())


def select_training_items(
    dataset: demo_dataset.DemoDataset, selection: str, class_name: str
) -> tuple[torch.Tensor, list[str]]:
    """The distinct training items (each once) chosen by duplication and class, with their names."""
    if selection not in ITEM_SELECTIONS:
        raise ValueError(f"Shield Demo Training Set: items must be one of {ITEM_SELECTIONS}, got {selection!r}")
    keep = torch.ones(len(dataset.labels), dtype=torch.bool)
    if selection == "duplicated":
        keep &= dataset.duplicated
    elif selection == "unique":
        keep &= ~dataset.duplicated
    if class_name != CLASS_FILTER_ALL:
        keep &= dataset.labels == demo_dataset.class_index(class_name)
    indices = keep.nonzero().flatten()
    if len(indices) == 0:
        raise ValueError(
            f"Shield Demo Training Set: class {class_name!r} has no {selection} items: control classes "
            f"({', '.join(demo_dataset.CONTROL_CLASSES)}) hold no duplicated items, the few-shot class "
            f"({', '.join(demo_dataset.FEW_SHOT_CLASSES)}) no unique ones; set items to 'all' or pick another "
            "class_name"
        )
    names = [
        f"{dataset.class_names[int(dataset.labels[i])]}_{int(i):04d}{'_dup' if dataset.duplicated[i] else ''}"
        for i in indices
    ]
    return dataset.images[indices], names


@lru_cache(maxsize=1)
def cached_dataset() -> demo_dataset.DemoDataset:
    return demo_dataset.build_dataset()


class ShieldDemoTrainingSet(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldDemoTrainingSet",
            display_name="Shield Demo Training Set",
            category=DEMO_CATEGORY,
            description=(
                "The demo model's training items, each once, as an IMAGE batch: the references to shield and to "
                "compare outputs with (nearest training item)."
            ),
            inputs=[
                io.Combo.Input(
                    "items",
                    options=list(ITEM_SELECTIONS),
                    default="duplicated",
                    tooltip="duplicated: the items repeated in training (two per memorizable class, the few-shot "
                    "class's items): the ones the model copies and a shield should hold; unique: the items seen "
                    "once per epoch; all: both.",
                ),
                io.Combo.Input(
                    "class_name",
                    options=[CLASS_FILTER_ALL, *demo_dataset.CLASS_NAMES],
                    default=CLASS_FILTER_ALL,
                    tooltip="Only the items of this class; 'all classes' keeps every class.",
                ),
            ],
            outputs=[
                io.Image.Output("images", tooltip="The selected training items, [N, 32, 32, 3] in [0, 1]."),
                io.String.Output(
                    "names", tooltip="One name per item (class, index, _dup if duplicated), one per line."
                ),
            ],
        )

    @classmethod
    def execute(cls, items: str, class_name: str) -> io.NodeOutput:
        images, names = select_training_items(cached_dataset(), items, class_name)
        return io.NodeOutput(demo_dataset.to_comfy_image(images), "\n".join(names))
