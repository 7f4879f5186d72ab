"""The demo: the real ComfyUI, headless, samples the bundled demo model with each method, same seeds.

    bash scripts/demo.sh [--out DIR] [--class-name star] [--samples 8] [--steps 20]

Writes to one folder: `demo.png` (rows: methods; columns: the same seeds; each output beside its
most similar training item by the copy detector; red frame = a copy of a duplicated item, amber = as
similar as a copy to one of the class's unique items), `summary.md` and `summary.json` (copies by the
detector and by pixel L2, class agreement, quality and Vendi diversity per method), and the server log.
Methods whose nodes this ComfyUI lacks are skipped with a message (entries of build_workflows.METHODS).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import tempfile
import textwrap
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import build_workflows  # noqa: E402
from workflow_validation import ui_to_api  # noqa: E402

from harness.host import import_comfyui_in_process  # noqa: E402
from harness.server import ComfyServer, ServerError  # noqa: E402

CELL = 96  # pixels per 32×32 image in the picture (nearest-neighbour ×3)
LABEL_WIDTH = 250


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "out" / f"demo-{stamp}")
    parser.add_argument(
        "--class-name",
        default=None,
        help="a class of the bundled model (its weights' metadata lists them); default: the first one",
    )
    parser.add_argument("--samples", type=int, default=8, help="columns: one batch, the same seed for every method")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.0)
    return parser.parse_args()


def load_images(paths: list[pathlib.Path]):
    import torch
    from PIL import Image

    from comfyui_shield.reference_models.demo_dataset import pil_to_tensor

    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(pil_to_tensor(image.convert("RGB")))
    return torch.stack(tensors)


def run_method(server: ComfyServer, object_info: dict, method, args) -> dict:
    workflow = build_workflows.demo_workflow(
        object_info,
        method,
        class_name=args.class_name,
        batch=args.samples,
        seed=args.seed,
        steps=args.steps,
        cfg=args.cfg,
        prefix="demo",
    )
    ui = workflow.to_json()
    start = time.monotonic()
    outputs = server.run(ui_to_api(ui, object_info), timeout=600)
    seconds = time.monotonic() - start
    save_id = next(str(node["id"]) for node in ui["nodes"] if node["type"] == "SaveImage")
    paths = [server.output_path(info) for info in outputs[save_id]["images"]]
    return {"images": load_images(paths), "seconds": seconds, "workflow": ui, "setting": method.setting}


def measure(images, dataset, class_name: str) -> dict:
    """Copies by the copy detector (pixel L2 beside it), class agreement, quality and diversity."""
    from comfyui_shield.core import metrics
    from comfyui_shield.reference_models import replication
    from comfyui_shield.reference_models.judge import load_judge

    judge = load_judge()
    summary = replication.summarize_copies(images, dataset.images, dataset.duplicated, judge)
    # the Targets' definition (bench/effect_bench.py): a copy of one of the duplicated items, the ones the
    # shields protect; a match to one of the class's many unique items is counted beside it
    shields = dataset.images[dataset.duplicated]
    of_duplicated = judge.is_copy(images, shields).is_copy
    second = judge.is_copy_second(images, shields)  # a detector no method repels in (docs/judge.md)
    return {
        **summary.as_dict(),
        "duplicated_copy": of_duplicated.tolist(),
        "copies_of_duplicated_items": int(of_duplicated.sum()),
        "second_detector_copy": second.is_copy.tolist(),
        "second_detector_similarity": [round(v, 3) for v in second.similarity.tolist()],
        "copies_by_second_detector": second.count,
        "similarity": [round(v, 3) for v in summary.similarity],
        "similarity_at_threshold": [v >= summary.threshold for v in summary.similarity],
        "nearest_index": list(summary.copy_index),
        "pixel_distances": [round(d, 2) for d in summary.pixels.distances],
        "class_agreement": round(judge.class_agreement(images, class_name), 3),
        **judge.quality(images, class_name).as_dict(),
        # diversity of the batch: Vendi score of the detector descriptors (1 = all alike, max = batch size)
        "vendi": round(metrics.vendi_score(judge.detector.descriptors(images).detach()), 3),
    }


def draw_picture(rows: list[tuple[str, str, object, dict]], dataset, path: pathlib.Path, caption: str) -> None:
    """One row per method: output | most similar training item (copy detector), per seed; a red frame
    marks a copy."""
    from PIL import Image, ImageDraw, ImageFont

    from comfyui_shield.reference_models.demo_dataset import to_comfy_image

    columns = len(rows[0][2])
    pair_width, gap, top = 2 * CELL + 6, 14, 64
    width = LABEL_WIDTH + columns * (pair_width + gap)
    sheet = Image.new("RGB", (width, top + len(rows) * (CELL + gap) + 8), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    font, small, title = (ImageFont.load_default(size=size) for size in (15, 12, 18))
    draw.text((8, 8), caption, fill=(20, 20, 20), font=title)
    draw.text(
        (8, 34),
        "each pair: output | its most similar training item by the copy detector, with the similarity.  Red frame: "
        "a copy of a duplicated item (the shields).  Amber: as similar as a copy to one of the class's unique items.  "
        "'2nd': the second detector's similarity to the shields (red: a copy by it).  Column i starts from the same "
        "noise in every row.",
        fill=(70, 70, 70),
        font=small,
    )

    def tile(image_tensor) -> Image.Image:
        array = (to_comfy_image(image_tensor[None])[0] * 255).round().byte().numpy()
        return Image.fromarray(array).resize((CELL, CELL), Image.NEAREST)

    for row, (label, setting, images, metrics) in enumerate(rows):
        y = top + row * (CELL + gap)
        if row % 2:
            draw.rectangle((0, y - gap // 2, width, y + CELL + gap // 2), fill=(238, 240, 244))
        copies = metrics["copies_of_duplicated_items"]
        share = 100 * copies / metrics["samples"]
        marks = zip(metrics["similarity_at_threshold"], metrics["duplicated_copy"], strict=True)
        like_unique = sum(similar and not copy for similar, copy in marks)
        draw.text((8, y + 2), label, fill=(10, 10, 10), font=font)
        draw.multiline_text((8, y + 21), textwrap.fill(setting, 34), fill=(90, 90, 90), font=small, spacing=1)
        copy_colour = (190, 20, 20) if copies else (20, 130, 40)
        copies_text = f"copies {copies}/{metrics['samples']} ({share:.0f} %)"
        draw.text((8, y + 52), copies_text, fill=copy_colour, font=font)
        right = 8 + draw.textlength(copies_text, font=font) + 6
        draw.text((right, y + 55), f"+{like_unique} like unique", fill=(170, 110, 0), font=small)
        draw.text(
            (8, y + 70),
            f"class {metrics['class_agreement']:.2f} · FD {metrics['frechet']:.1f} · noise {metrics['noise']:.3f}\n"
            f"Vendi {metrics['vendi']:.2f} · 2nd detector {metrics['copies_by_second_detector']} · "
            f"pixel-L2 {metrics['pixel_l2_replicas']}",
            fill=(40, 40, 40),
            font=small,
        )
        for column in range(columns):
            x = LABEL_WIDTH + column * (pair_width + gap)
            nearest = dataset.images[metrics["nearest_index"][column]]
            sheet.paste(tile(images[column]), (x, y))
            sheet.paste(tile(nearest), (x + CELL + 6, y))
            draw.text(
                (x + CELL + 8, y + CELL - 14), f"{metrics['similarity'][column]:.2f}", fill=(255, 255, 255), font=small
            )
            second = metrics["second_detector_similarity"][column]
            second_colour = (255, 90, 90) if metrics["second_detector_copy"][column] else (200, 200, 200)
            draw.text((x + 3, y + CELL - 14), f"2nd {second:.2f}", fill=second_colour, font=small)
            if metrics["duplicated_copy"][column]:
                draw.rectangle((x - 4, y - 4, x + pair_width + 3, y + CELL + 3), outline=(220, 30, 30), width=4)
            elif metrics["similarity_at_threshold"][column]:
                draw.rectangle((x - 4, y - 4, x + pair_width + 3, y + CELL + 3), outline=(235, 160, 0), width=4)
    sheet.save(path)


def write_summary(out: pathlib.Path, results: dict, skipped: dict, args) -> str:
    lines = [
        f"# Shield demo: class `{args.class_name}`, {args.samples} samples, seed {args.seed}, "
        f"euler {args.steps} steps, cfg {args.cfg}",
        "",
        "| method | setting | copies of duplicated items (detector) | the same by the 2nd detector "
        "| like a training item (detector, any item) | copies (pixel L2 < 6) | class agreement | Fréchet | noise "
        "| Vendi | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in results.items():
        metrics = result["metrics"]
        lines.append(
            f"| {label} | {result['setting']} | {metrics['copies_of_duplicated_items']}/{metrics['samples']} "
            f"| {metrics['copies_by_second_detector']}/{metrics['samples']} | {metrics['copies']}/{metrics['samples']} | {metrics['pixel_l2_replicas']}/{metrics['samples']} "
            f"| {metrics['class_agreement']:.2f} | {metrics['frechet']:.2f} | {metrics['noise']:.3f} "
            f"| {metrics['vendi']:.2f} | {result['seconds']:.1f} |"
        )
    for label, reason in skipped.items():
        lines.append(f"| {label} | skipped: {reason} | | | | | | | | | |")
    lines += [
        "",
        "A copy: the copy detector (reference_models/judge.py, docs/judge.md) finds one of the duplicated training "
        "items (the shields, what the model memorized) at or above its similarity threshold; the 2nd detector, "
        "another network that no method repels in, asks the same (docs/judge.md); 'like a training "
        "item' counts a match to any training item, also one of the class's many unique items, which a well-drawn "
        "new shape of a dense class often is; pixel L2 < REPLICA_DISTANCE (reference_models/replication.py) is the second "
        "column, which noise and colour fool. Class agreement: share the independent classifier assigns to the "
        "class. Fréchet: distance of the classifier features to the class's training items (lower is closer). "
        "Noise: estimated pixel-noise sigma. Vendi: effective number of distinct images in the batch (cosine "
        f"kernel on detector descriptors; 1 = all alike, {args.samples} = all different).",
    ]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "summary.json").write_text(
        json.dumps(
            {
                "settings": vars(args) | {"out": str(args.out)},
                "methods": {
                    label: {**r["metrics"], "setting": r["setting"], "seconds": round(r["seconds"], 2)}
                    for label, r in results.items()
                },
                "skipped": skipped,
            },
            indent=1,
        )
    )
    return text


def main() -> None:
    args = parse_args()
    classes = build_workflows.demo_class_names()
    args.class_name = args.class_name or build_workflows.default_demo_class()
    if args.class_name not in classes:
        raise SystemExit(f"--class-name {args.class_name!r} is not a class of the bundled model: {', '.join(classes)}")
    import_comfyui_in_process()  # the pack's package imports ComfyUI's API; the metrics run in this process
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shield-demo-") as base:
        server = ComfyServer(pathlib.Path(base))
        log("starting ComfyUI (headless, CPU) ...")
        try:
            server.start()
            log(f"ComfyUI ready at {server.url} after {time.monotonic() - started:.0f} s")
            results, skipped = run_methods(server, args)
        finally:
            (out / "server.log").write_text(server.log())
            server.stop()
    from comfyui_shield.reference_models import demo_dataset

    dataset = demo_dataset.build_dataset()
    rows = []
    for label, result in results.items():
        result["metrics"] = measure(result["images"], dataset, args.class_name)
        rows.append((label, result["setting"], result["images"], result["metrics"]))
    if rows:
        caption = (
            f"Shield demo: bundled model, class '{args.class_name}', {args.samples} samples, seed {args.seed}, "
            f"{args.steps} euler steps, cfg {args.cfg}"
        )
        draw_picture(rows, dataset, out / "demo.png", caption)
    print(write_summary(out, results, skipped, args), flush=True)
    log(f"done in {time.monotonic() - started:.0f} s; picture and summary in {out}")
    if rows:
        log(f"picture: {out / 'demo.png'}")


def run_methods(server: ComfyServer, args) -> tuple[dict, dict]:
    object_info = server.object_info()
    results, skipped = {}, {}
    for method in build_workflows.METHODS:
        if method.node_types and build_workflows.method_node_type(method, object_info) is None:
            skipped[method.label] = f"node {' / '.join(method.node_types)} not loaded in this ComfyUI"
            log(f"skip {method.label}: {skipped[method.label]}")
            continue
        log(f"running {method.label}: {args.samples} samples, {args.steps} steps ...")
        try:
            results[method.label] = run_method(server, object_info, method, args)
        except (ServerError, LookupError) as error:
            skipped[method.label] = f"failed: {str(error).splitlines()[0][:300]}"
            log(f"{method.label} failed: {error}")
            continue
        log(f"{method.label}: done in {results[method.label]['seconds']:.1f} s")
    return results, skipped


if __name__ == "__main__":
    main()
