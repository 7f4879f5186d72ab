"""A test-only custom-node pack that gives the test server real models without weight files.

The `server` fixture links this folder into the server's custom_nodes. Its nodes build the
closed-form memorizer (reference_models/memorizer.py, loaded from this checkout by path, since ComfyUI
imports packs under their filesystem path) and its subset conditioning, so server tests can run
whole graphs (MODEL → patches → KSampler → SaveLatent). Never shipped: it lives under tests/.
"""

import importlib.util
import pathlib

import torch

_MEMORIZER_PATH = pathlib.Path(__file__).resolve().parents[3] / "reference_models" / "memorizer.py"
_spec = importlib.util.spec_from_file_location("shield_selftest_memorizer", _MEMORIZER_PATH)
memorizer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memorizer)


def memorizer_items(seed: int, n_items: int) -> torch.Tensor:
    """The same items as the tests' `memorizer_items` fixture for seed 1234 and 6 items."""
    return torch.randn(n_items, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class ShieldSelftestMemorizer:
    CATEGORY = "shield_selftest"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prediction": (list(memorizer.PREDICTION_TYPES),),
                "seed": ("INT", {"default": 1234, "min": 0, "max": 2**31}),
                "n_items": ("INT", {"default": 6, "min": 1, "max": 64}),
            }
        }

    def build(self, prediction, seed, n_items):
        return (memorizer.build_memorizer(memorizer_items(seed, n_items), prediction),)


class ShieldSelftestSubsetConditioning:
    CATEGORY = "shield_selftest"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "n_items": ("INT", {"default": 6, "min": 1, "max": 64}),
                "subset": ("STRING", {"default": "", "tooltip": "comma-separated item indices; empty: the whole set"}),
            }
        }

    def build(self, n_items, subset):
        indices = [int(part) for part in subset.split(",") if part.strip()] or None
        return (memorizer.subset_conditioning(n_items, indices),)


NODE_CLASS_MAPPINGS = {
    "ShieldSelftestMemorizer": ShieldSelftestMemorizer,
    "ShieldSelftestSubsetConditioning": ShieldSelftestSubsetConditioning,
}
