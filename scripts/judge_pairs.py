"""A picture of copy / non-copy pairs with the bundled copy detector's scores (docs/judge.md).

    OMP_NUM_THREADS=1 $SHIELD_PYTHON scripts/judge_pairs.py [--out docs/judge_pairs.png]

Each pair: a duplicated training item | a changed version of it (recoloured, noised, greyed and blurred,
shifted) or the training item of its class most similar to it by the detector among those clearly distinct
from it (copy_augment.clearly_distinct: the hardest non-copy).
Under each pair: the detector similarity and verdict, and the pixel L2 distance (a copy below 6.0).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness.host import import_comfyui_in_process  # noqa: E402

import_comfyui_in_process()

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from comfyui_shield.reference_models import demo_dataset, replication  # noqa: E402
from comfyui_shield.reference_models.copy_augment import clearly_distinct, gaussian_blur  # noqa: E402
from comfyui_shield.reference_models.judge import load_judge  # noqa: E402

CELL = 96


def changed_versions(item: torch.Tensor, params, seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    recoloured = demo_dataset.render_items([demo_dataset.recolored(params, 1.0 - params.tone)])[0]
    grey = item.mean(dim=0, keepdim=True).expand_as(item)
    return [
        ("recoloured", recoloured),
        ("noise sigma 0.2", (item + 0.2 * torch.randn(item.shape, generator=generator)).clamp(-1, 1)),
        ("grey + blur sigma 1", gaussian_blur(grey[None], torch.tensor([1.0]))[0]),
        ("shifted 2 px", torch.roll(item, shifts=(2, 2), dims=(1, 2))),
        ("recoloured + noise 0.3", (recoloured + 0.3 * torch.randn(item.shape, generator=generator)).clamp(-1, 1)),
    ]


def pairs(dataset, judge) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    rows = []
    for class_id, name in enumerate(demo_dataset.MEMORIZABLE_CLASSES):
        index = int(dataset.class_items(name, duplicated=True)[0])
        item, params = dataset.images[index], dataset.params[index]
        label, changed = changed_versions(item, params, class_id)[class_id % 5]
        rows.append((f"{name}: {label}", item, changed))
        others = [
            int(i)
            for i in dataset.class_items(name, duplicated=False)
            if clearly_distinct(dataset.params[int(i)], params)
        ]
        similarity, _ = judge.detector.similarity(dataset.images[others], item[None])
        hardest = others[int(similarity.argmax())]
        rows.append((f"{name}: most similar distinct {name}", item, dataset.images[hardest]))
    star = dataset.class_items("star", duplicated=True)[0]
    for label, changed in changed_versions(dataset.images[star], dataset.params[star], 9)[1:]:
        rows.append((f"star: {label}", dataset.images[star], changed))
    return rows


def tile(image: torch.Tensor) -> Image.Image:
    array = (demo_dataset.to_comfy_image(image[None])[0] * 255).round().byte().numpy()
    return Image.fromarray(array).resize((CELL, CELL), Image.NEAREST)


def draw(rows, judge, path: pathlib.Path) -> None:
    columns, pair_width, text_height, gap = 4, 2 * CELL + 4, 52, 18
    height = (len(rows) + columns - 1) // columns * (CELL + text_height + gap) + 40
    sheet = Image.new("RGB", (columns * (pair_width + gap) + gap, height), (250, 250, 250))
    canvas = ImageDraw.Draw(sheet)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=12)
    canvas.text(
        (gap, 10),
        f"copy detector (threshold {judge.threshold:.3f}): training item | other image.  Pixel L2 calls a copy below "
        f"{replication.REPLICA_DISTANCE}",
        fill=(20, 20, 20),
        font=font,
    )
    for number, (label, reference, query) in enumerate(rows):
        x = gap + (number % columns) * (pair_width + gap)
        y = 40 + (number // columns) * (CELL + text_height + gap)
        verdict = judge.is_copy(query[None], reference[None])
        distance = float((query - reference).flatten().norm())
        similarity = float(verdict.similarity[0])
        sheet.paste(tile(reference), (x, y))
        sheet.paste(tile(query), (x + CELL + 4, y))
        colour = (190, 20, 20) if verdict.is_copy[0] else (20, 130, 40)
        canvas.text((x, y + CELL + 4), label, fill=(40, 40, 40), font=small)
        canvas.text(
            (x, y + CELL + 20),
            f"{'COPY' if verdict.is_copy[0] else 'not a copy'}  sim {similarity:.3f}",
            fill=colour,
            font=font,
        )
        canvas.text((x, y + CELL + 37), f"pixel L2 {distance:.1f}", fill=(90, 90, 90), font=small)
    sheet.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "docs" / "judge_pairs.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    judge = load_judge()
    rows = pairs(demo_dataset.build_dataset(), judge)
    draw(rows, judge, args.out)
    print(f"wrote {args.out}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
