"""Memorization Risk on the bundled demo model: does the first-steps score tell copies from the rest, and
what does gating a shield on it change? (#12 items 1 and 2)

Run: $SHIELD_PYTHON bench/risk_bench.py [--quick]   (one thread; prints markdown)

- Samples: every demo class (the prompt) × seeds × a batch, sampled by ComfyUI's KSampler (euler, normal,
  20 steps, cfg 3); the Memorization Risk probe (samplers/risk_probe.py) runs on the same seed, latent and
  schedule with probe_steps = MAX_N, so its per-step scores give the score for every N ≤ MAX_N at once.
- Three definitions of a positive, all reported:
  * "copy" (per sample, the primary one): the output is a copy of a duplicated training item (an item of a
    memorizable class repeated in training, or of the few-shot class) by the demo copy detector
    (reference_models/judge.py: geometry, tolerant of colour, noise and small shifts), against the
    duplicated items. Every other output (non-copies of any class, all control-class outputs) is a negative.
  * "pixel copy": the same with pixel L2 instead: nearest training item duplicated and within
    replication.REPLICA_DISTANCE (RMS error 0.11 in [-1, 1]); colour or a shift defeat it.
  * "class" (per prompt, as Wen et al. score prompts): the output's class holds duplicated items
    (memorizable or few-shot); negatives are the control classes' outputs.
- Calibration seeds choose the threshold: the score that flags at most 1 % of the calibration negatives.
  Held-out seeds (disjoint) give the AUC, and the TPR and FPR at that threshold.
- Gating: on the held-out seeds, Transition-Point CFG (dynamic, unconditional before the transition) on every
  sample vs only on the flagged ones (Shield Gate), with copies (detector and pixel), samples left
  bit-identical to plain sampling, and fidelity: class agreement (the judge's independent classifier) and
  k-NN precision of the outputs against the training items of their class (k = 3, pixels).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402

if "comfy.model_management" not in sys.modules:
    bench_common.import_pack()

import nodes as comfy_nodes  # noqa: E402

from comfyui_shield.core import metrics  # noqa: E402
from comfyui_shield.reference_models import demo_dataset, pixel_unet, replication  # noqa: E402
from comfyui_shield.reference_models.judge import load_judge  # noqa: E402
from comfyui_shield.samplers.method_patch import add_model_gate  # noqa: E402
from comfyui_shield.samplers.risk_math import auc, rates_at, threshold_at_fpr  # noqa: E402
from comfyui_shield.samplers.risk_probe import KSamplerSettings, RiskGate, probe  # noqa: E402
from comfyui_shield.samplers.transition_hook import TransitionCfgPatch, TransitionSettings  # noqa: E402

STEPS, CFG, SAMPLER, SCHEDULER = 20, 3.0, "euler", "normal"
MAX_N = 5
TARGET_FPR = 0.01
CALIBRATION_SEED0, HELD_OUT_SEED0 = 1000, 5000


@dataclasses.dataclass
class Batch:
    """One class × seed: the probe's per-step scores [B, MAX_N], the plain outputs and their labels."""

    class_name: str
    seed: int
    step_scores: torch.Tensor
    outputs: torch.Tensor
    copy: torch.Tensor  # [B] bool, by the copy detector
    pixel_copy: torch.Tensor  # [B] bool, by pixel L2
    memorizable: bool


def sample(model, class_name: str, seed: int, batch: int, steps: int = STEPS) -> torch.Tensor:
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, demo_dataset.IMAGE_SIZE, demo_dataset.IMAGE_SIZE)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent)
    return out["samples"].float()


def risk_of(model, class_name: str, seed: int, batch: int, probe_steps: int, threshold: float, steps: int = STEPS):
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, demo_dataset.IMAGE_SIZE, demo_dataset.IMAGE_SIZE)}
    run = KSamplerSettings(seed, steps, CFG, SAMPLER, SCHEDULER)
    return probe(model, positive, negative, latent, run, probe_steps, threshold)


def is_copy(outputs: torch.Tensor, dataset: demo_dataset.DemoDataset) -> torch.Tensor:
    """Copies of a duplicated item by the demo copy detector."""
    return load_judge().is_copy(outputs, dataset.images[dataset.duplicated]).is_copy.cpu()


def is_pixel_copy(outputs: torch.Tensor, dataset: demo_dataset.DemoDataset) -> torch.Tensor:
    distance, index = replication.nearest_items(outputs, dataset.images)
    return (distance < replication.REPLICA_DISTANCE) & dataset.duplicated[index]


def collect(
    model, dataset, seeds: list[int], batch: int, classes=demo_dataset.CLASS_NAMES, steps: int = STEPS
) -> list[Batch]:
    batches = []
    for class_name in classes:
        for seed in seeds:
            risk = risk_of(model, class_name, seed, batch, MAX_N, 0.0, steps)
            outputs = sample(model, class_name, seed, batch, steps)
            batches.append(
                Batch(
                    class_name,
                    seed,
                    torch.tensor(risk.step_scores, dtype=torch.float64).T,
                    outputs,
                    is_copy(outputs, dataset),
                    is_pixel_copy(outputs, dataset),
                    demo_dataset.has_duplicates(class_name),
                )
            )
        print(f"[risk_bench] {class_name}: {len(seeds)} seeds", file=sys.stderr, flush=True)
    return batches


def scores_at(batches: list[Batch], n: int) -> list[float]:
    return torch.cat([b.step_scores[:, :n].mean(dim=1) for b in batches]).tolist()


def labels(batches: list[Batch], definition: str) -> list[bool]:
    """Per sample: 'copy' / 'pixel copy': the output copies a duplicated item (detector / pixel L2);
    'class': its class holds duplicated items."""
    if definition == "copy":
        return torch.cat([b.copy for b in batches]).tolist()
    if definition == "pixel copy":
        return torch.cat([b.pixel_copy for b in batches]).tolist()
    return [b.memorizable for b in batches for _ in range(len(b.copy))]


def detector_rows(calibration: list[Batch], held_out: list[Batch]) -> tuple[list[list], dict]:
    rows, thresholds = [], {}
    for definition in ("copy", "pixel copy", "class"):
        cal_pos, test_pos = labels(calibration, definition), labels(held_out, definition)
        for n in range(1, MAX_N + 1):
            cal_scores, test_scores = scores_at(calibration, n), scores_at(held_out, n)
            negatives = [s for s, p in zip(cal_scores, cal_pos, strict=True) if not p]
            threshold = threshold_at_fpr(negatives, TARGET_FPR)
            tpr, fpr = rates_at(test_scores, test_pos, threshold)
            thresholds[(definition, n)] = threshold
            rows.append(
                [
                    definition,
                    n,
                    f"{sum(test_pos)}/{len(test_pos)}",
                    f"{auc(cal_scores, cal_pos):.3f}",
                    f"**{auc(test_scores, test_pos):.3f}**",
                    f"{threshold:.4g}",
                    f"{tpr:.2f}",
                    f"{fpr:.3f}",
                    2 * n,
                ]
            )
    return rows, thresholds


def gating_rows(model, dataset, held_out: list[Batch], thresholds: dict[str, float], batch: int) -> list[list]:
    """Transition-Point CFG on every sample vs gated on the risk flags (N = 1) at each named threshold,
    on the held-out seeds."""
    patch_model = TransitionCfgPatch(TransitionSettings("dynamic", "unconditional", 0.0)).patch(model)
    plain = torch.cat([b.outputs for b in held_out])
    class_of = torch.tensor([demo_dataset.class_index(b.class_name) for b in held_out for _ in range(batch)])
    # per variant: its outputs and how many samples the method may act on (the rest must equal plain)
    variants = {"plain": (plain, 0), "TPCFG on every sample": (run_all(patch_model, held_out, batch), len(plain))}
    for name, threshold in thresholds.items():
        outputs, flagged = [], 0
        for b in held_out:
            risk = risk_of(model, b.class_name, b.seed, batch, 1, threshold)
            gated_model = patch_model.clone()
            add_model_gate(gated_model, RiskGate(risk))
            outputs.append(sample(gated_model, b.class_name, b.seed, batch))
            flagged += sum(risk.flagged)
        variants[f"TPCFG gated, {name} (threshold {threshold:.4g}; flagged {flagged}/{len(plain)})"] = (
            torch.cat(outputs),
            flagged,
        )
    rows = []
    for name, (outputs, flagged) in variants.items():
        same = sum(torch.equal(outputs[i], plain[i]) for i in range(len(plain)))
        assert same >= len(plain) - flagged  # every unflagged sample bit-identical (tests/test_risk_server.py)
        rows.append(
            [
                name,
                f"{int(is_copy(outputs, dataset).sum())}/{len(plain)}",
                f"{int(is_pixel_copy(outputs, dataset).sum())}/{len(plain)}",
                f"{same / len(plain):.0%}",
                f"{load_judge().class_agreement(outputs, class_of):.2f}",
                f"{class_precision(outputs, class_of, dataset):.2f}",
            ]
        )
    return rows


def run_all(model, batches: list[Batch], batch: int) -> torch.Tensor:
    return torch.cat([sample(model, b.class_name, b.seed, batch) for b in batches])


def class_precision(outputs: torch.Tensor, class_of: torch.Tensor, dataset) -> float:
    """Mean over classes of k-NN precision (k = 3) of the outputs against their class's training items."""
    values = []
    for class_id in class_of.unique().tolist():
        real = dataset.images[dataset.labels == class_id].flatten(1)
        fake = outputs[class_of == class_id].flatten(1)
        values.append(metrics.precision_recall(real, fake, k=3)["precision"])
    return sum(values) / len(values)


def main() -> None:
    args = bench_common.arguments(__doc__)
    seeds_per_split, batch = (2, 4) if args.quick else (4, 8)
    metadata = pixel_unet.read_metadata()
    dataset = demo_dataset.build_dataset()
    model = pixel_unet.load_demo_model()
    start = time.perf_counter()
    calibration = collect(model, dataset, [CALIBRATION_SEED0 + s for s in range(seeds_per_split)], batch)
    held_out = collect(model, dataset, [HELD_OUT_SEED0 + s for s in range(seeds_per_split)], batch)
    rows, thresholds = detector_rows(calibration, held_out)
    gate_threshold = thresholds[("copy", 1)]
    quarter = threshold_at_fpr(scores_at(calibration, 1), 0.25)  # flags the top quarter of all calibration scores
    gate_at = {"calibrated (1 % FPR)": gate_threshold, "top quarter": quarter}
    gating = gating_rows(model, dataset, held_out, gate_at, batch)
    seconds = time.perf_counter() - start
    per_split = len(demo_dataset.CLASS_NAMES) * seeds_per_split * batch
    training = json.loads(metadata.get("training", "{}") or "{}")
    print("## Memorization Risk: detection on the demo model, and gating (#12 items 1, 2)\n")
    print(
        f"`$SHIELD_PYTHON bench/risk_bench.py{' --quick' if args.quick else ''}`; weights "
        f"`{pixel_unet.WEIGHTS_PATH.name}` (training metadata: {json.dumps(training, sort_keys=True)[:160]}); "
        f"{per_split} calibration and {per_split} held-out samples ({len(demo_dataset.CLASS_NAMES)} classes × "
        f"{seeds_per_split} seeds × batch {batch}), {SAMPLER}/{SCHEDULER}, {STEPS} steps, cfg {CFG}; "
        f"{seconds:.0f} s. Score: mean of ‖D_c − D_u‖/σ over the first N steps (docs/risk.md).\n"
    )
    print(
        bench_common.markdown_table(
            [
                "positive =",
                "N",
                "positives (held-out)",
                "AUC calibration",
                "AUC held-out",
                f"threshold (≤{TARGET_FPR:.0%} FPR on calibration)",
                "TPR held-out",
                "FPR held-out",
                "model evaluations per sample",
            ],
            rows,
        )
    )
    print(
        f"\nCost: the probe makes 2N model evaluations per sample (cond + uncond at N sigmas, in N batched calls); "
        f"the {STEPS}-step run it screens makes {2 * STEPS}.\n"
    )
    print(
        "Gating on the held-out seeds (N = 1), at the calibrated threshold and, to show what gating does when it "
        "flags samples, at the threshold that flags the top quarter of the calibration scores:\n"
    )
    headers = ["variant", "copies (detector)", "copies (pixel L2)", "outputs identical to plain", "class agreement"]
    print(bench_common.markdown_table([*headers, "k-NN precision"], gating))


if __name__ == "__main__":
    main()
