"""ProCreate's peak memory on a large model: plain vs fast vs exact, on the random-weight Flux fixture.

    $SHIELD_PYTHON bench/procreate_memory_bench.py [--quick] [--models-dir DIR]

The Flux fixture (tests/harness/families.py: the real Flux class, one double block, 404M parameters,
hidden 3072 as detection pins it) is loaded by ComfyUI's own loader under inference mode, as a loader
node does, with a 16-channel SD3/Flux VAE (84M) and the pixel embedder. Each mode runs in its own
process: load, one untimed warm-up run, then the kernel's peak-RSS mark is reset (/proc/self/clear_refs)
and one sampling run is measured (VmHWM − the resident size before it = what sampling added on top of
the loaded weights; the peak is the whole process). "exact, weight copy" is the previous exact mode (a
grad-capable deep copy of the diffusion model per run), kept here for the comparison.

Settings: 64 px (latent 16x8x8), batch 2, 2 euler steps, cfg 1 with FluxGuidance 3.5 (Flux dev as
users run it), strength 100, look-ahead 0, every step guided (threshold −1).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time

from bench_common import REPO_ROOT, import_pack, markdown_table

MODES = ("plain", "fast", "exact", "exact, weight copy")


def resident_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def measure(mode: str, models_dir: pathlib.Path, steps: int) -> dict:
    """One mode in this process: the numbers as a dict (printed as JSON for the parent)."""
    import_pack()
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import torch

    from comfyui_shield.core.shield_set import from_latents
    from comfyui_shield.samplers import embedders, procreate_hook
    from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings
    from harness import families
    from harness.family_nodes.conditioning import fabricated_conditioning

    family = families.FAMILIES["flux"]
    files = families.FamilyFiles(models_dir)
    files.files("flux")
    with torch.inference_mode():
        model = comfy.sd.load_diffusion_model(str(models_dir / family.folder / family.file_name))
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(models_dir / families.VAE_FOLDER / family.vae_file_name)))
        positive = fabricated_conditioning(model, 1)
        positive[0][1]["guidance"] = 3.5
        negative = fabricated_conditioning(model, 2)
        generator = torch.Generator().manual_seed(5)
        references = torch.randn(2, 16, 8, 8, generator=generator)
        reference = from_latents(references, "Flux", images=vae.decode(references)[..., :3].float())
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    if mode != "plain":
        settings = ProCreateSettings(gamma=100.0, gradient_mode=mode.split(",")[0], similarity_threshold=-1.0)
        patched = model.clone()
        ProCreateGuidance(vae, embedders.PixelEmbedder(16), reference, settings, patch_id="bench").attach(patched)
        model = patched
    if mode == "exact, weight copy":
        procreate_hook.autograd_through = copying_autograd_through(embedders)

    def sample():
        noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(9))
        with torch.inference_mode():
            return comfy.sample.sample(
                model, noise, steps, 1.0, "euler", "simple", positive, negative, torch.zeros_like(noise), seed=0
            )

    sample()  # warm-up: loads the model into ComfyUI's management, first-call allocations
    before = resident_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    out = sample()
    seconds = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    return {
        "mode": mode,
        "weights_mib": weights / 2**20,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "added_mib": (peak - before) / 1024,
        "seconds": seconds,
        "finite": bool(torch.isfinite(out).all()),
        "dtype": str(next(model.model.diffusion_model.parameters()).dtype),
    }


def copying_autograd_through(embedders):
    """The previous exact mode: a grad-capable deep copy of the diffusion model (the VAE keeps the new
    zero-copy path, so the difference is the diffusion model's copy alone)."""

    @contextlib.contextmanager
    def through(module):
        if module.__class__.__name__ == "Flux":
            twin = embedders.grad_capable(module)
            originals = dict(module.named_children())
            for name, child in twin.named_children():
                setattr(module, name, child)
            try:
                yield module
            finally:
                for name, child in originals.items():
                    setattr(module, name, child)
        else:
            with embedders.autograd_through(module):
                yield module

    return through


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        mode, models_dir, steps = sys.argv[2], pathlib.Path(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(measure(mode, models_dir, steps)))
        return
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models-dir", type=pathlib.Path, default=None, help="where the Flux fixture is written")
    args = parser.parse_args()
    steps = 2
    with tempfile.TemporaryDirectory(prefix="shield-flux-") as scratch:
        models_dir = args.models_dir or pathlib.Path(scratch)
        rows = []
        for mode in MODES:
            command = [sys.executable, __file__, "--child", mode, str(models_dir), str(steps)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=REPO_ROOT)
            if result.returncode != 0:
                raise RuntimeError(f"{mode} failed:\n{result.stderr[-3000:]}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    plain = rows[0]
    print("## ProCreate peak memory on the Flux fixture (404M parameters): plain vs fast vs exact\n")
    print(
        f"Command: `$SHIELD_PYTHON bench/procreate_memory_bench.py`. Flux fixture loaded under inference mode "
        f"({plain['dtype']}, diffusion weights {plain['weights_mib']:.0f} MiB), 16-channel VAE, pixel embedder; "
        f"64 px, batch 2, {steps} euler steps, cfg 1 + FluxGuidance 3.5, every step guided. One process per "
        "mode; peak = VmHWM of the measured run (after a warm-up run), added = peak − resident size before it.\n"
    )
    table = [
        [
            row["mode"],
            f"{row['peak_mib']:.0f}",
            f"{row['peak_mib'] / plain['peak_mib']:.2f}x",
            f"{row['added_mib']:.0f}",
            f"{row['seconds']:.1f}",
            "yes" if row["finite"] else "NO",
        ]
        for row in rows
    ]
    print(markdown_table(["mode", "peak RSS MiB", "peak / plain", "added by the run MiB", "run s", "finite"], table))


if __name__ == "__main__":
    main()
