"""Per-step cost of Transition-Point CFG against plain CFG at the same cfg (tiny real UNet, CPU).

Run: `$SHIELD_PYTHON bench/transition_bench.py [--quick]`. Prints a markdown table: the median time
per sampling step over repeats (each repeat a full KSampler run; variants interleaved so drift hits
them alike) and its ratio to plain CFG measured in the same run. The patch needs no extra model
evaluation when cfg ≠ 1, so the target is a ratio within noise (≤ 1.02).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def import_pack() -> None:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from harness.host import import_comfyui_in_process

    import_comfyui_in_process()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    import_pack()
    import nodes as comfy_nodes

    from comfyui_shield.nodes.transition_cfg import TransitionPointCFG
    from comfyui_shield.reference_models.tiny_unet import build_tiny_unet, random_text_conditioning

    repeats, steps, batch, size, cfg = (5, 8, 2, 16, 4.0) if args.quick else (15, 20, 4, 32, 4.0)
    model = build_tiny_unet("eps", seed=1)
    positive, negative = random_text_conditioning(1), random_text_conditioning(2)

    def patched(mode, before, cap=1.0, percent=0.5):
        return TransitionPointCFG.execute(model, mode, percent, 0.0, before, 2.0, cap).result[0]

    variants = {
        "plain CFG": model,
        "static 50 %, unconditional": patched("static", "unconditional"),
        "dynamic, unconditional": patched("dynamic", "unconditional"),
        "dynamic, opposite, cap 80 %": patched("dynamic", "opposite", cap=0.8),
    }

    def run(variant_model):
        latent = {"samples": torch.zeros(batch, 4, size, size)}
        comfy_nodes.common_ksampler(
            variant_model, 0, steps, cfg, "euler", "karras", positive, negative, latent, disable_noise=False
        )

    for variant_model in variants.values():
        run(variant_model)  # warm-up
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant_model in variants.items():
            start = time.perf_counter()
            run(variant_model)
            times[name].append((time.perf_counter() - start) / steps)
    plain = statistics.median(times["plain CFG"])
    hook_seconds = hook_cost(torch, batch, size, cfg, repeats=200 if args.quick else 1000)
    print(
        f"## Transition-Point CFG: cost per step (tiny UNet, batch {batch}, latent {size}x{size}, cfg {cfg}, "
        f"{steps} euler steps, median of {repeats}, {args.threads} thread)\n"
    )
    print("| variant | ms / step | ratio to plain CFG |")
    print("|---|---:|---:|")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {1000 * median:.2f} | {median / plain:.3f} |")
    print(
        f"\nThe hook alone (dynamic, one call per step, same tensors): {1e6 * hook_seconds:.0f} µs per call, "
        f"i.e. an expected ratio of {(plain + hook_seconds) / plain:.4f}; the end-to-end ratios above are "
        "within this machine's run-to-run noise."
    )


def hook_cost(torch, batch, size, cfg, repeats):
    """Median time of one call of the pre-CFG hook, outside the sampler (a stable overhead estimate)."""
    from comfyui_shield.core.records import RECORDS
    from comfyui_shield.samplers.transition_hook import TransitionRun, TransitionSettings, transition_step

    settings = TransitionSettings("dynamic", "unconditional", 0.0)
    generator = torch.Generator().manual_seed(0)
    cond, uncond = (torch.randn(batch, 4, size, size, generator=generator) for _ in range(2))
    sigmas = torch.linspace(14.6, 0.03, repeats)
    run = TransitionRun(settings, RECORDS.start("transition_cfg", "bench"))
    durations = []
    for sigma in sigmas:
        args = {"conds": [[{}], [{}]], "conds_out": [cond, uncond], "cond_scale": cfg, "sigma": sigma.repeat(batch)}
        start = time.perf_counter()
        transition_step(run, args)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


if __name__ == "__main__":
    main()
