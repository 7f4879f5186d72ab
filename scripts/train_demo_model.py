"""Train the bundled demo model (reference_models/pixel_unet.py) and show that it memorizes.

    $SHIELD_PYTHON scripts/train_demo_model.py [--steps N] [--seed S] [--out PATH]

Reproducible from the seed (same torch build and thread count give the same weights). Trains
ComfyUI's UNetModel with V-prediction loss on ComfyUI's default discrete schedule and CFG dropout to the null
class, saves an EMA of the weights as safetensors, then reloads them through ComfyUI, samples every
class with ComfyUI's KSampler and prints the share of samples that reproduce a training item, for
the duplicated and the unique items.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from harness.host import import_comfyui_in_process  # noqa: E402

import_comfyui_in_process()

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from comfy.ldm.modules.attention import SpatialTransformer  # noqa: E402

from comfyui_shield.reference_models import demo_dataset, pixel_unet, replication  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--cfg-dropout", type=float, default=0.25)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument(
        "--duplicate-copies",
        type=int,
        default=demo_dataset.DUPLICATE_COPIES,
        help="copies of each duplicated item per epoch (the bundled model's first stage: 128)",
    )
    parser.add_argument(
        "--init-from", type=pathlib.Path, default=None, help="continue training from these weights (a second stage)"
    )
    # bfloat16 autocast (weights and optimizer stay float32): 1.25-1.5x faster steps on this CPU (AVX512-BF16)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    # one thread: on a shared 2-core machine two threads stall each other (4x slower per step here)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", type=pathlib.Path, default=None, help="save the evaluation samples as a PNG grid")
    parser.add_argument("--out", type=pathlib.Path, default=pixel_unet.WEIGHTS_PATH)
    parser.add_argument("--eval-per-class", type=int, default=64)
    parser.add_argument("--eval-seed", type=int, default=5000, help="sampling seed of class 0 (class k: + k)")
    parser.add_argument("--grid-per-class", type=int, default=16, help="samples per class shown in --grid")
    parser.add_argument(
        "--judge", action=argparse.BooleanOptionalAction, default=True, help="copy detector, classifier, quality"
    )
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-cfg", type=float, default=3.0)
    parser.add_argument("--skip-train", action="store_true", help="only evaluate the weights at --out")
    return parser.parse_args()


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace, dataset: demo_dataset.DemoDataset) -> torch.nn.Module:
    model = pixel_unet.build_demo_base_model()
    pixel_unet.init_for_training(model, args.seed)
    if args.init_from is not None:
        continue_from(model.diffusion_model, args.init_from)
    net = model.diffusion_model.train()
    ema = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    sigmas = model.model_sampling.sigmas.float()
    stream, stream_labels = dataset.training_stream()
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    start, running = time.monotonic(), None
    for step in range(args.steps):
        pick = torch.randint(len(stream), (args.batch_size,), generator=generator)
        clean = dataset.images[stream[pick]]
        labels = stream_labels[pick].clone()
        labels[torch.rand(args.batch_size, generator=generator) < args.cfg_dropout] = -1
        timestep = torch.randint(len(sigmas), (args.batch_size,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator)
        sigma = sigmas[timestep]
        noisy = pixel_unet.with_positions(
            model.model_sampling.calculate_input(sigma, clean + noise * sigma.reshape(-1, 1, 1, 1))
        )
        context = pixel_unet.class_context(labels)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            prediction = net(noisy, timestep.float(), context=context, y=pixel_unet.class_vector(context))
        loss = torch.nn.functional.mse_loss(prediction.float(), pixel_unet.v_target(clean, noise, sigma))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            for name, tensor in net.state_dict().items():
                ema[name].lerp_(tensor, 1 - decay)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.monotonic() - start
            errors = memorized_item_errors(model, dataset)
            print(
                f"[train] step {step + 1}/{args.steps}  loss {running:.4f}  {elapsed:.0f} s  "
                f"memorized-item x0 RMS error at sigma 0.5/2/8: {errors}",
                flush=True,
            )
    net.load_state_dict(ema)
    return model


@torch.no_grad()
def continue_from(net: torch.nn.Module, path: pathlib.Path) -> None:
    """Load earlier weights. Attention blocks the earlier architecture lacked start as the identity
    (their output projection zeroed: a SpatialTransformer adds its output to its input), so the
    continued model first draws exactly what the earlier one drew."""
    state_dict = {name: tensor.float() for name, tensor in safetensors.torch.load_file(str(path)).items()}
    expected = net.state_dict().keys()
    state_dict = {_after_inserted_attention(name, expected): tensor for name, tensor in state_dict.items()}
    missing, unexpected = net.load_state_dict(state_dict, strict=False)
    new_blocks = sorted({".".join(name.split(".")[:3]) for name in missing})
    if unexpected or any(not isinstance(net.get_submodule(block), SpatialTransformer) for block in new_blocks):
        raise ValueError(f"{path} does not fit this architecture: missing {missing}, unexpected {unexpected}")
    for block in new_blocks:
        for parameter in net.get_submodule(block).proj_out.parameters():
            parameter.zero_()
    if new_blocks:
        print(f"[train] new attention blocks, starting as the identity: {', '.join(new_blocks)}", flush=True)


def _after_inserted_attention(name: str, expected) -> str:
    """An upsampler's key (`output_blocks.B.1.conv.*`) moves to `output_blocks.B.2` when an attention
    block is inserted before it."""
    parts = name.split(".", 3)
    if name in expected or len(parts) < 4 or not parts[2].isdigit():
        return name
    group, block, index, rest = parts
    shifted = f"{group}.{block}.{int(index) + 1}.{rest}"
    return shifted if shifted in expected else name


@torch.no_grad()
def memorized_item_errors(model, dataset: demo_dataset.DemoDataset) -> str:
    """RMS error of the class-conditional x0 prediction on the duplicated items: how far training
    has come at memorizing them (≲0.07 means the denoiser returns the item)."""
    net = model.diffusion_model
    items, labels = dataset.images[dataset.duplicated], dataset.labels[dataset.duplicated]
    noise = torch.randn(items.shape, generator=torch.Generator().manual_seed(0))
    context = pixel_unet.class_context(labels)
    errors = []
    for value in (0.5, 2.0, 8.0):
        sigma = torch.full((len(items),), value)
        timestep = model.model_sampling.timestep(sigma).float()
        noisy = items + noise * value
        output = net(
            pixel_unet.with_positions(model.model_sampling.calculate_input(sigma, noisy)),
            timestep,
            context=context,
            y=pixel_unet.class_vector(context),
        )
        denoised = model.model_sampling.calculate_denoised(sigma, output, noisy)
        errors.append(f"{float((denoised - items).pow(2).mean().sqrt()):.3f}")
    return "/".join(errors)


def sample_class(model, class_id: int, count: int, seed: int, steps: int, cfg: float) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros(count, 3, demo_dataset.IMAGE_SIZE, demo_dataset.IMAGE_SIZE)}
    (out,) = nodes.common_ksampler(
        model,
        seed,
        steps,
        cfg,
        "euler",
        "normal",
        pixel_unet.class_conditioning(class_id),
        pixel_unet.null_conditioning(),
        latent,
    )
    return out["samples"]


def evaluate(args: argparse.Namespace, dataset: demo_dataset.DemoDataset) -> dict:
    """Sample every class through ComfyUI's KSampler (the demo's sampler) and measure each class's
    samples: copies of its duplicated items, class agreement and quality (`measure_class`)."""
    model = pixel_unet.load_demo_model(args.out)
    judge = load_judge() if args.judge else None
    samples, per_class = [], {}
    for class_id, name in enumerate(demo_dataset.CLASS_NAMES):
        seed = args.eval_seed + class_id
        images = sample_class(model, class_id, args.eval_per_class, seed, args.eval_steps, args.eval_cfg)
        samples.append(images[: args.grid_per_class])
        per_class[name] = measure_class(images, class_id, dataset, judge)
        print(f"[memorization] {name}: {json.dumps(per_class[name])}", flush=True)
    if args.grid is not None:
        save_grid(torch.cat(samples), min(args.grid_per_class, args.eval_per_class), args.grid)
    return {
        "sampler": f"euler/normal, {args.eval_steps} steps, cfg {args.eval_cfg}, seeds {args.eval_seed} + class id",
        "samples_per_class": args.eval_per_class,
        "pixel_threshold": replication.REPLICA_DISTANCE,
        "detector_threshold": None if judge is None else round(judge.threshold, 4),
        "per_class": per_class,
    }


def load_judge():
    from comfyui_shield.reference_models.judge import load_judge as load

    return load()


def measure_class(images: torch.Tensor, class_id: int, dataset: demo_dataset.DemoDataset, judge) -> dict:
    """One class's samples: the share that copies one of the class's duplicated items (pixel L2 below
    REPLICA_DISTANCE; by the copy detector when a judge is given), the share copying any training item,
    the share whose nearest training item (pixel L2) is of the prompted class, and with a judge the
    classifier's class agreement and the quality figure beside that of as many fresh real items."""
    duplicated = dataset.class_items(class_id, duplicated=True)
    distances, nearest = replication.nearest_items(images, dataset.images)
    replica = distances < replication.REPLICA_DISTANCE
    row = {
        "kind": demo_dataset.class_kind(class_id),
        "pixel_copies_of_duplicated": share(replica & torch.isin(nearest, duplicated)),
        "pixel_copies_of_any_item": share(replica),
        "nearest_item_of_class": share(dataset.labels[nearest] == class_id),
        "median_nearest_l2": round(float(distances.median()), 2),
    }
    if judge is None:
        return row
    class_items = dataset.class_items(class_id)
    if len(duplicated):
        row["detector_copies_of_duplicated"] = round(judge.is_copy(images, dataset.images[duplicated]).share, 3)
    row["detector_copies_of_any_item"] = round(judge.is_copy(images, dataset.images[class_items]).share, 3)
    row["class_agreement"] = round(judge.class_agreement(images, class_id), 3)
    real = demo_dataset.render_items(
        [p for p in demo_dataset.held_out_params(len(images), seed=7) if p.class_id == class_id]
    )
    row["quality"] = judge.quality(images, class_id).as_dict()
    row["quality_of_real_items"] = judge.quality(real, class_id).as_dict()
    return row


def share(mask: torch.Tensor) -> float:
    return round(float(mask.float().mean()), 3)


def save_grid(samples: torch.Tensor, per_row: int, path: pathlib.Path) -> None:
    """One row per class, in CLASS_NAMES order, shown 4× with nearest-neighbour upsampling."""
    from PIL import Image

    rows = samples.reshape(-1, per_row, *samples.shape[1:])
    grid = torch.cat([torch.cat(list(row), dim=2) for row in rows], dim=1)
    pixels = ((grid.permute(1, 2, 0) + 1.0) * 127.5).round().clamp(0, 255).byte().numpy()
    image = Image.fromarray(pixels)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((image.width * 4, image.height * 4), Image.NEAREST).save(path)
    print(f"[memorization] samples grid (rows: {', '.join(demo_dataset.CLASS_NAMES)}): {path}")


def print_evaluation(result: dict) -> None:
    """The per-class table of docs/demo_model.md (markdown)."""
    print(f"\n[memorization] {result['samples_per_class']} samples per class, {result['sampler']}")
    print(
        f"  copy: detector similarity ≥ {result['detector_threshold']}; pixel: L2 < {result['pixel_threshold']} "
        "(pixels in [-1, 1]). Quality: Fréchet distance of classifier features to the class's training "
        "items / noise sigma, samples vs as many fresh real items.\n"
    )
    print(
        "| class | kind | copies of its duplicated items: detector | pixel L2 | copies of any item of the class:"
        " detector | pixel L2 | class agreement (classifier) | nearest item of the class (pixel L2) "
        "| quality: Fréchet, samples / real | noise σ, samples / real | median nearest L2 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, row in result["per_class"].items():
        quality, real = row.get("quality", {}), row.get("quality_of_real_items", {})
        cells = [
            name,
            row["kind"],
            percent(row.get("detector_copies_of_duplicated")),
            percent(row["pixel_copies_of_duplicated"] if row["kind"] != "control" else None),
            percent(row.get("detector_copies_of_any_item")),
            percent(row["pixel_copies_of_any_item"]),
            percent(row.get("class_agreement")),
            percent(row["nearest_item_of_class"]),
            f"{quality.get('frechet', '–')} / {real.get('frechet', '–')}",
            f"{quality.get('noise', '–')} / {real.get('noise', '–')}",
            str(row["median_nearest_l2"]),
        ]
        print("| " + " | ".join(cells) + " |")


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def init_from_info(path: pathlib.Path) -> dict:
    """The first stage's training record, kept in the second stage's metadata."""
    return {"file": path.name, "training": json.loads(pixel_unet.read_metadata(path).get("training", "{}"))}


def main() -> None:
    args = parse_args()
    if not args.skip_train:
        dataset = demo_dataset.build_dataset(duplicate_copies=args.duplicate_copies)
        torch.set_num_threads(args.threads)
        torch.manual_seed(args.seed)
        start = time.monotonic()
        model = train(args, dataset)
        minutes = (time.monotonic() - start) / 60
        info = {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "ema": args.ema,
            "cfg_dropout": args.cfg_dropout,
            "bf16_autocast": args.bf16,
            "minutes": round(minutes, 1),
            "dataset_seed": demo_dataset.DEFAULT_SEED,
            "duplicate_copies": args.duplicate_copies,
            "init_from": None if args.init_from is None else init_from_info(args.init_from),
            "threads": args.threads,
        }
        pixel_unet.save_weights(model, args.out, info)
        print(f"[train] saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {minutes:.1f} min", flush=True)
    torch.set_num_threads(1)
    with torch.inference_mode():
        result = evaluate(args, demo_dataset.build_dataset())
    print_evaluation(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
