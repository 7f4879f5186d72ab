"""What the quality figure (the classifier's Fréchet distance to a class's training items) reacts to: fresh real
items of each control class, as rendered and after one known change each. Prints a Markdown table.

    $SHIELD_PYTHON bench/quality_probe.py        # ~20 s, one thread
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from harness.host import import_comfyui_in_process  # noqa: E402

import_comfyui_in_process()

import torch  # noqa: E402

from comfyui_shield.reference_models import demo_dataset  # noqa: E402
from comfyui_shield.reference_models.judge import load_judge  # noqa: E402

ITEMS_PER_CLASS = 64  # the batch size the demo model's table measures
HELD_OUT_SEED = 7  # the seed of that table's "real items" column


def changes(real: torch.Tensor) -> dict[str, torch.Tensor]:
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    tinted = real.clone()
    tinted[:, 1:] += torch.tensor([0.03, 0.05]).reshape(1, 2, 1, 1)  # a faint green-blue background cast
    mean = real.mean(dim=1, keepdim=True)
    return {
        "as rendered": real,
        "pixel noise σ 0.01": real + 0.01 * noise,
        "pixel noise σ 0.05": real + 0.05 * noise,
        "background tint (+0.03 G, +0.05 B)": tinted,
        "contrast × 1.1": real * 1.1,
        "saturation × 1.2": mean + 1.2 * (real - mean),
        "3×3 box blur": torch.nn.functional.avg_pool2d(real, 3, 1, 1, count_include_pad=False),
    }


def main() -> None:
    torch.set_num_threads(1)
    judge = load_judge()
    params = demo_dataset.held_out_params(ITEMS_PER_CLASS, HELD_OUT_SEED)
    names = demo_dataset.CONTROL_CLASSES
    rows: dict[str, list[str]] = {}
    for name in names:
        class_id = demo_dataset.class_index(name)
        real = demo_dataset.render_items([p for p in params if p.class_id == class_id])
        for change, images in changes(real).items():
            images = images.clamp(-1, 1)
            cell = f"{judge.quality(images, class_id).frechet:.0f} ({judge.class_agreement(images, class_id):.0%})"
            rows.setdefault(change, []).append(cell)
    print(f"| change to {ITEMS_PER_CLASS} fresh items | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for change, cells in rows.items():
        print(f"| {change} | " + " | ".join(cells) + " |")
    print("\nCells: Fréchet distance to the class's training items (class agreement).")


if __name__ == "__main__":
    main()
