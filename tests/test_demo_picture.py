"""scripts/demo.py's figures on known inputs: a copy of a duplicated item (red in the picture) is told apart
from a match to one of the class's unique items (amber), as the effect bench's Targets count copies."""

import importlib.util
import pathlib

import pytest

from comfyui_shield.reference_models import demo_dataset
from comfyui_shield.reference_models.copy_augment import clearly_distinct

DEMO_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "demo.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("shield_demo_script", DEMO_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copies_of_duplicated_items_are_told_apart_from_matches_to_unique_items(demo):
    dataset = demo_dataset.build_dataset()
    duplicated = dataset.class_items("moon", duplicated=True).tolist()
    unique = next(
        int(i)
        for i in dataset.class_items("moon", duplicated=False)
        if all(clearly_distinct(dataset.params[int(i)], dataset.params[d]) for d in duplicated)
    )
    images = dataset.images[[duplicated[0], unique, duplicated[1]]]
    figures = demo.measure(images, dataset, "moon")
    # every training item is like a training item (itself) ...
    assert figures["similarity_at_threshold"] == [True, True, True]
    assert figures["copies"] == 3
    # ... but only the duplicated ones are copies in the Targets' sense (the picture's red frame)
    assert figures["duplicated_copy"] == [True, False, True]
    assert figures["copies_of_duplicated_items"] == 2
    # the second, judging-only detector agrees on the training items themselves
    assert figures["second_detector_copy"] == [True, False, True]
    assert figures["copies_by_second_detector"] == 2
