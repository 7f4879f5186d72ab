"""ProCreate cost per step vs plain sampling (tiny real UNet, pixel-space VAE, tiny embedder), and
effect (mean max similarity to protected references on the memorizer) for exact vs fast gradients.

Run: $SHIELD_PYTHON bench/procreate_bench.py [--quick]
"""

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
import torch  # noqa: E402

from harness.host import import_comfyui_in_process  # noqa: E402

torch.set_num_threads(1)
import_comfyui_in_process()
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402

from comfyui_shield.core.shield_set import from_latents  # noqa: E402
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning  # noqa: E402
from comfyui_shield.reference_models.tiny_unet import build_tiny_unet  # noqa: E402
from comfyui_shield.samplers.embedders import CallableEmbedder  # noqa: E402
from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings  # noqa: E402


def tiny_rgb_unet():
    """The tiny real UNet with 3 latent channels, so the pixel_space VAE decodes its latents."""
    return build_tiny_unet("eps", seed=4, channels=3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    options = parser.parse_args()
    repeats, steps, size = (3, 6, 16) if options.quick else (5, 10, 32)
    items = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    images = ((items + 1) / 2).movedim(1, -1)
    projection = torch.randn(3 * (size // 2) ** 2, 32, generator=torch.Generator().manual_seed(3))
    embedder = CallableEmbedder(
        lambda im: torch.nn.functional.avg_pool2d(im.movedim(-1, 1) - 0.5, 2).flatten(1) @ projection, "bench"
    )
    reference = from_latents(items[:3], "LatentFormat", images=images[:3])
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    from comfyui_shield.reference_models.tiny_unet import random_text_conditioning

    unet = tiny_rgb_unet()
    noise = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))

    def timed(model):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            comfy.sample.sample(
                model,
                noise,
                steps,
                2.0,
                "ddim",
                "ddim_uniform",
                random_text_conditioning(1),
                random_text_conditioning(2),
                torch.zeros_like(noise),
                seed=0,
                disable_pbar=True,
            )
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def patched(base, **settings):
        clone = base.clone()
        ProCreateGuidance(vae, embedder, reference, ProCreateSettings(**settings), "bench").attach(clone)
        return clone

    plain = timed(unet)
    print(f"tiny UNet {size}x{size}x3, {steps} ddim steps, batch 1, CFG 2, medians of {repeats}\n")
    print("| mode | look-ahead | s/run | × plain |\n|---|---|---|---|")
    print(f"| plain | – | {plain:.3f} | 1.00 |")
    for mode in ("exact", "fast"):
        for look_ahead in (0, 1, 3, 5):
            seconds = timed(patched(unet, gamma=100.0, look_ahead_steps=look_ahead, gradient_mode=mode))
            print(f"| {mode} | {look_ahead} | {seconds:.3f} | {seconds / plain:.2f} |")

    memorizer = build_memorizer(items, "eps")
    batch_noise = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(5))
    references = embedder.embed(images[:3])

    def mean_max_similarity(model):
        out = comfy.sample.sample(
            model,
            batch_noise,
            steps,
            2.0,
            "ddim",
            "ddim_uniform",
            subset_conditioning(6, [0, 1, 2, 3]),
            subset_conditioning(6),
            torch.zeros_like(batch_noise),
            seed=0,
            disable_pbar=True,
        )
        embedded = embedder.embed(((out + 1) / 2).clamp(0, 1).movedim(1, -1))
        cosine = torch.nn.functional.cosine_similarity(embedded[:, None], references[None], dim=-1)
        return float(cosine.max(dim=1).values.mean())

    print("\nmemorizer (6 items, 3 protected), batch 16: mean max cosine similarity to the protected references\n")
    print("| run | look-ahead | mean max similarity |\n|---|---|---|")
    print(f"| plain | – | {mean_max_similarity(memorizer):.3f} |")
    for mode in ("exact", "fast"):
        for look_ahead in (0, 3):
            value = mean_max_similarity(
                patched(memorizer, gamma=100.0, look_ahead_steps=look_ahead, gradient_mode=mode)
            )
            print(f"| {mode} | {look_ahead} | {value:.3f} |")
    intra_batch_diversity(memorizer, items, images, embedder, vae, steps, size)


def intra_batch_diversity(memorizer, items, images, embedder, vae, steps, size):
    """Batch diversity with and without intra-batch repulsion: a 2-item prompt, batch 8, a far reference."""
    batch_noise = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(4))
    far = from_latents(-items[:1], "LatentFormat", images=((1 - items[:1]) / 2).movedim(1, -1))

    def measure(intra_batch):
        model = memorizer.clone()
        settings = ProCreateSettings(gamma=100.0, gradient_mode="fast", intra_batch=intra_batch)
        ProCreateGuidance(vae, embedder, far, settings, "bench-intra").attach(model)
        out = comfy.sample.sample(
            model,
            batch_noise,
            steps,
            2.0,
            "ddim",
            "ddim_uniform",
            subset_conditioning(6, [0, 1]),
            subset_conditioning(6),
            torch.zeros_like(batch_noise),
            seed=0,
            disable_pbar=True,
        )
        unit = torch.nn.functional.normalize(embedder.embed(((out + 1) / 2).clamp(0, 1).movedim(1, -1)), dim=-1)
        cosine = unit @ unit.T
        mss = float((cosine.sum() - cosine.diagonal().sum()) / (len(unit) * (len(unit) - 1)))
        distance = float(torch.pdist(out.flatten(1)).mean())
        return mss, distance

    print("\nmemorizer, positive = 2 of 6 items, batch 8, fast mode γ=100: batch diversity\n")
    print("| intra_batch | mean pairwise cosine (embedder) | mean pairwise L2 (latent) |\n|---|---|---|")
    for intra_batch in (False, True):
        mss, distance = measure(intra_batch)
        print(f"| {'on' if intra_batch else 'off'} | {mss:.3f} | {distance:.2f} |")


if __name__ == "__main__":
    main()
