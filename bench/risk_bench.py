"""Memorization Risk on the bundled demo model: does the first-steps score tell memorized prompts and
copies from the rest, at what threshold and cost, and what does gating a shield on it change? (#12 items 1, 2)

Run: $SHIELD_PYTHON bench/risk_bench.py --record [--seeds S] [--probe-seeds P] [--gating]   (one thread; ~25 min on
     a busy machine; writes bench/recorded/risk.md, which bench/run_all.py appends to BENCHMARKS.md; without
     --record it only prints; --quick: a small smoke run)

- Samples: every demo class (the prompt) × seeds × a batch of 8; the Memorization Risk probe
  (samplers/risk_probe.py) runs with the seed, latent and schedule of ComfyUI's KSampler (euler, normal,
  20 steps, cfg 3) and probe_steps = MAX_N, so its per-step scores give every score below at once. The
  probe alone is cheap (2·MAX_N evaluations per sample): prompt labels need only the probe, so --probe-seeds
  seeds per split are probed; copy labels need the output, so the first --seeds of them are also sampled.
- Scores, all from the probe alone: the specified one (Wen et al. §3: mean of ‖D_c − D_u‖/σ over the first
  N steps) for several N, and the drop d_1 / d_N (transition-point CFG §4–5: the guidance of a memorized
  trajectory falls once it is in a training image's basin; risk_math.sample_score) for N = 3..MAX_N.
- What a positive is (each reported):
  * "duplicated-item prompts" (the issue's definition, per prompt as Wen et al. score prompts, each sample
    scored): the class holds duplicated training items (memorizable star/moon/cross/triangle: 2 items seen
    192× among unique ones; few-shot heart: 4 items and nothing else); negatives: the control classes'
    samples (circle/square/ring: unique items only). The node's default threshold is calibrated on it.
  * the two kinds of duplicated-item prompt apart: "few-shot prompt" (a prompt over a handful of training
    images, Wen et al.'s memorized prompt) and "memorizable prompts", each against the controls.
  * the same prompts per prompt instance, as Wen et al. (§4) report: a prompt scored from n generations
    (n = 1, 4, 8: the first n samples of a seed's batch, which are exactly ComfyUI's batch of n with that
    seed), the per-sample score averaged (risk_math.prompt_score); AUC over prompt instances (class × seed).
    The demo model has 8 prompts only (5 with duplicated items, 3 controls): instances of one class share
    their prompt and are not independent prompts; the table says how many distinct classes stand behind them.
  * "copy" (per sample): the output is a copy of a duplicated training item by the demo copy detector
    (reference_models/judge.py; images clamped to [-1, 1]); every other output is a negative. "pixel copy":
    nearest training item duplicated and within replication.REPLICA_DISTANCE (colour or a shift defeat it).
- Calibration seeds choose the threshold (the lowest flagging at most 1 % of the calibration negatives,
  core/metrics.threshold_at_fpr; flagged = score >= threshold) and any choice among scores; held-out seeds
  (disjoint, never used for choosing) give the AUC and the TPR and FPR at that threshold.
- Gating: on the held-out seeds, Transition-Point CFG (dynamic, unconditional before the transition) on every
  sample vs only on the flagged ones (Shield Gate), with copies (detector and pixel), samples left
  bit-identical to plain sampling, and fidelity: class agreement (the judge's independent classifier) and
  k-NN precision of the outputs against the training items of their class (k = 3, pixels).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable

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
from comfyui_shield.samplers.risk_math import prompt_score, sample_score  # noqa: E402
from comfyui_shield.samplers.risk_probe import KSamplerSettings, RiskGate, probe  # noqa: E402
from comfyui_shield.samplers.transition_hook import TransitionCfgPatch, TransitionSettings  # noqa: E402

STEPS, CFG, SAMPLER, SCHEDULER = 20, 3.0, "euler", "normal"
MAX_N = 10  # probe steps measured; every score below uses the first N <= MAX_N
TARGET_FPR = 0.01
TARGET_AUC = 0.95  # issue #12 item 1
CALIBRATION_SEED0, HELD_OUT_SEED0 = 1000, 5000
GENERATIONS = (1, 4, 8)  # generations per prompt instance (Wen et al. §4 use n = 1, 4, 32)


@dataclasses.dataclass
class Batch:
    """One class × seed: the probe's per-step scores [B, MAX_N], and when sampled the plain outputs and their
    copy labels (None for a probe-only batch)."""

    class_name: str
    seed: int
    step_scores: torch.Tensor
    outputs: torch.Tensor | None = None
    copy: torch.Tensor | None = None  # [B] bool, by the copy detector
    pixel_copy: torch.Tensor | None = None  # [B] bool, by pixel L2

    @property
    def sampled(self) -> bool:
        return self.outputs is not None


def sample(model, class_name: str, seed: int, batch: int, steps: int = STEPS) -> torch.Tensor:
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, demo_dataset.IMAGE_SIZE, demo_dataset.IMAGE_SIZE)}
    (out,) = comfy_nodes.common_ksampler(model, seed, steps, CFG, SAMPLER, SCHEDULER, positive, negative, latent)
    return out["samples"].float()


def risk_of(
    model,
    class_name: str,
    seed: int,
    batch: int,
    probe_steps: int,
    threshold: float,
    steps: int = STEPS,
    statistic: str = "magnitude",
):
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, demo_dataset.IMAGE_SIZE, demo_dataset.IMAGE_SIZE)}
    run = KSamplerSettings(seed, steps, CFG, SAMPLER, SCHEDULER)
    return probe(model, positive, negative, latent, run, probe_steps, threshold, statistic)


def is_copy(outputs: torch.Tensor, dataset: demo_dataset.DemoDataset) -> torch.Tensor:
    """Copies of a duplicated item by the demo copy detector."""
    return load_judge().is_copy(outputs.clamp(-1, 1), dataset.images[dataset.duplicated]).is_copy.cpu()


def is_pixel_copy(outputs: torch.Tensor, dataset: demo_dataset.DemoDataset) -> torch.Tensor:
    distance, index = replication.nearest_items(outputs.clamp(-1, 1), dataset.images)
    return (distance < replication.REPLICA_DISTANCE) & dataset.duplicated[index]


def collect(
    model, dataset, seeds: list[int], sampled: int, batch: int, classes=demo_dataset.CLASS_NAMES
) -> list[Batch]:
    """Every class × seed probed; the first `sampled` seeds also sampled and labelled for copies."""
    batches = []
    for class_name in classes:
        for index, seed in enumerate(seeds):
            risk = risk_of(model, class_name, seed, batch, MAX_N, 0.0)
            one = Batch(class_name, seed, torch.tensor(risk.step_scores, dtype=torch.float64).T)
            if index < sampled:
                one.outputs = sample(model, class_name, seed, batch)
                one.copy, one.pixel_copy = is_copy(one.outputs, dataset), is_pixel_copy(one.outputs, dataset)
            batches.append(one)
        print(f"[risk_bench] {class_name}: {len(seeds)} seeds ({sampled} sampled)", file=sys.stderr, flush=True)
    return batches


@dataclasses.dataclass(frozen=True)
class Score:
    """A score computed from the probe's per-step magnitudes [B, MAX_N] alone; probe_steps sets its cost."""

    name: str
    probe_steps: int
    of: Callable[[torch.Tensor], torch.Tensor]


def specified(n: int) -> Score:
    return Score(f"mean ‖D_c − D_u‖/σ, N = {n}", n, lambda steps: steps[:, :n].mean(dim=1))


def drop(n: int) -> Score:
    return Score(f"drop d_1 / d_{n}, N = {n}", n, lambda steps: sample_score(steps[:, :n].T, "drop"))


SPECIFIED = [specified(n) for n in (1, 2, 3, 5, MAX_N)]
DROPS = [drop(n) for n in range(3, MAX_N + 1)]


@dataclasses.dataclass(frozen=True)
class Definition:
    """What a positive is; per sample: True, False, or None (the sample is not part of this comparison)."""

    name: str
    label: Callable[[Batch], list]


def by_kind(positive_kinds: tuple[str, ...]) -> Callable[[Batch], list]:
    def label(batch: Batch) -> list:
        return [prompt_label(batch, positive_kinds)] * batch.step_scores.shape[0]

    return label


def prompt_label(batch: Batch, positive_kinds: tuple[str, ...]) -> bool | None:
    kind = demo_dataset.class_kind(batch.class_name)
    return True if kind in positive_kinds else False if kind == "control" else None


def copy_label(of: Callable[[Batch], torch.Tensor]) -> Callable[[Batch], list]:
    """Per-sample copy labels of a sampled batch; a probe-only batch is not part of the comparison."""
    return lambda batch: of(batch).tolist() if batch.sampled else [None] * batch.step_scores.shape[0]


DUPLICATED_KINDS = ("memorizable", "few-shot")


PROMPTS = Definition("duplicated-item prompts (memorizable + few-shot) vs control", by_kind(DUPLICATED_KINDS))
DEFINITIONS = [
    PROMPTS,
    Definition("few-shot prompt (heart) vs control", by_kind(("few-shot",))),
    Definition("memorizable prompts vs control", by_kind(("memorizable",))),
    Definition("copy (detector), per sample", copy_label(lambda b: b.copy)),
    Definition("pixel copy, per sample", copy_label(lambda b: b.pixel_copy)),
]


def split(batches: list[Batch], definition: Definition, score: Score) -> tuple[list[float], list[float]]:
    """(positive scores, negative scores) over the samples the definition labels."""
    positive, negative = [], []
    for b in batches:
        for value, label in zip(score.of(b.step_scores).tolist(), definition.label(b), strict=True):
            if label is not None:
                (positive if label else negative).append(value)
    return positive, negative


def auc_text(positive: list[float], negative: list[float]) -> str:
    return f"{metrics.roc_auc(positive, negative):.3f}" if positive and negative else "undefined (no positive)"


@dataclasses.dataclass(frozen=True)
class Detection:
    definition: str
    score: Score
    held_out_positives: int
    held_out_negatives: int
    auc_calibration: str
    auc_held_out: str
    threshold: float
    tpr: float
    fpr: float

    def row(self) -> list:
        tpr = f"{self.tpr:.2f}" if self.held_out_positives else "–"
        return [
            self.definition,
            self.score.name,
            f"{self.held_out_positives} / {self.held_out_negatives}",
            self.auc_calibration,
            f"**{self.auc_held_out}**",
            f"{self.threshold:.4g}",
            tpr,
            f"{self.fpr:.3f}",
            2 * self.score.probe_steps,
        ]


def detect(calibration: list[Batch], held_out: list[Batch], definition: Definition, score: Score) -> Detection:
    cal_pos, cal_neg = split(calibration, definition, score)
    test_pos, test_neg = split(held_out, definition, score)
    threshold = metrics.threshold_at_fpr(cal_neg, TARGET_FPR)
    return Detection(
        definition.name,
        score,
        len(test_pos),
        len(test_neg),
        auc_text(cal_pos, cal_neg),
        auc_text(test_pos, test_neg),
        threshold,
        metrics.rate_at_threshold(test_pos, threshold) if test_pos else float("nan"),
        metrics.rate_at_threshold(test_neg, threshold),
    )


def chosen_drop(calibration: list[Batch]) -> Score:
    """The drop score's N with the highest AUC on the calibration seeds (prompt definition; held-out unseen)."""
    return max(DROPS, key=lambda score: metrics.roc_auc(*split(calibration, PROMPTS, score)))


def detector_rows(calibration: list[Batch], held_out: list[Batch], best: Score) -> list[Detection]:
    """Every definition with the specified score at N = 1 (the node's default) and with the chosen drop score,
    then every candidate score for the prompt definition."""
    rows = [detect(calibration, held_out, d, score) for score in (SPECIFIED[0], best) for d in DEFINITIONS]
    rows += [detect(calibration, held_out, PROMPTS, score) for score in SPECIFIED[1:] + DROPS]
    return rows


@dataclasses.dataclass(frozen=True)
class PromptDetection:
    """Duplicated-item prompts vs control per prompt instance (class × seed), each scored from n generations."""

    score: Score
    generations: int
    positives: int  # held-out prompt instances
    negatives: int
    positive_classes: int  # distinct classes behind them
    negative_classes: int
    auc_calibration: str
    auc_held_out: str
    threshold: float
    tpr: float
    fpr: float

    def row(self) -> list:
        return [
            self.score.name,
            self.generations,
            f"{self.positives} / {self.negatives}",
            f"{self.positive_classes} / {self.negative_classes}",
            self.auc_calibration,
            f"**{self.auc_held_out}**",
            f"{self.threshold:.4g}",
            f"{self.tpr:.2f}",
            f"{self.fpr:.3f}",
            2 * self.score.probe_steps * self.generations,
        ]


def prompt_split(batches: list[Batch], score: Score, generations: int) -> tuple[list, list, set, set]:
    """(positive, negative) prompt-instance scores and the classes behind each side."""
    positive, negative, positive_classes, negative_classes = [], [], set(), set()
    for b in batches:
        label = prompt_label(b, DUPLICATED_KINDS)
        if label is None:
            continue
        (positive if label else negative).append(prompt_score(score.of(b.step_scores), generations))
        (positive_classes if label else negative_classes).add(b.class_name)
    return positive, negative, positive_classes, negative_classes


def detect_prompts(calibration: list[Batch], held_out: list[Batch], score: Score, generations: int) -> PromptDetection:
    cal_pos, cal_neg, _, _ = prompt_split(calibration, score, generations)
    test_pos, test_neg, pos_classes, neg_classes = prompt_split(held_out, score, generations)
    threshold = metrics.threshold_at_fpr(cal_neg, TARGET_FPR)
    return PromptDetection(
        score,
        generations,
        len(test_pos),
        len(test_neg),
        len(pos_classes),
        len(neg_classes),
        auc_text(cal_pos, cal_neg),
        auc_text(test_pos, test_neg),
        threshold,
        metrics.rate_at_threshold(test_pos, threshold),
        metrics.rate_at_threshold(test_neg, threshold),
    )


def prompt_rows(calibration: list[Batch], held_out: list[Batch], best: Score, batch: int) -> list[PromptDetection]:
    """The node's default score and the chosen drop, each from n = 1, 4, 8 generations per prompt instance."""
    counts = [n for n in GENERATIONS if n <= batch]
    return [detect_prompts(calibration, held_out, score, n) for score in (SPECIFIED[0], best) for n in counts]


def gating_rows(model, dataset, held_out: list[Batch], gates: dict[str, tuple], batch: int) -> list[list]:
    """Transition-Point CFG on every sample vs gated on the risk flags of each named (score, threshold), on the
    held-out seeds."""
    held_out = [b for b in held_out if b.sampled]
    patch_model = TransitionCfgPatch(TransitionSettings("dynamic", "unconditional", 0.0)).patch(model)
    plain = torch.cat([b.outputs for b in held_out])
    class_of = torch.tensor([demo_dataset.class_index(b.class_name) for b in held_out for _ in range(batch)])
    # per variant: its outputs and how many samples the method may act on (the rest must equal plain)
    variants = {"plain": (plain, 0), "TPCFG on every sample": (run_all(patch_model, held_out, batch), len(plain))}
    for name, (score, threshold) in gates.items():
        outputs, flagged = [], 0
        statistic = "drop" if score in DROPS else "magnitude"
        for b in held_out:
            risk = risk_of(model, b.class_name, b.seed, batch, score.probe_steps, threshold, STEPS, statistic)
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


RECORDED = Path(__file__).resolve().parent / "recorded" / "risk.md"


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run: detection only, few samples")
    parser.add_argument("--record", action="store_true", help=f"also write the section to {RECORDED.name}")
    parser.add_argument("--seeds", type=int, default=1, help="sampled seeds per split (batch 8 each); default 1")
    parser.add_argument(
        "--probe-seeds",
        type=int,
        default=24,
        help="probed seeds per split (the first --seeds of them also sampled) for the prompt labels; default 24",
    )
    parser.add_argument("--gating", action="store_true", help="also the gating table (about as long again)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = arguments()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    seeds_per_split, probe_seeds, batch = (
        (1, 2, 4) if args.quick else (args.seeds, max(args.seeds, args.probe_seeds), 8)
    )
    metadata = pixel_unet.read_metadata()
    dataset = demo_dataset.build_dataset()
    model = pixel_unet.load_demo_model()
    start = time.perf_counter()
    calibration = collect(model, dataset, [CALIBRATION_SEED0 + s for s in range(probe_seeds)], seeds_per_split, batch)
    held_out = collect(model, dataset, [HELD_OUT_SEED0 + s for s in range(probe_seeds)], seeds_per_split, batch)
    best = chosen_drop(calibration)
    detections = detector_rows(calibration, held_out, best)
    prompts = prompt_rows(calibration, held_out, best, batch)
    default, drop_row = detections[0], detections[len(DEFINITIONS)]  # prompt definition: magnitude N = 1; drop
    gating = []
    if args.gating and not args.quick:
        gates = {
            "magnitude N = 1 (the node's default)": (SPECIFIED[0], default.threshold),
            f"drop N = {best.probe_steps}": (best, drop_row.threshold),
        }
        gating = gating_rows(model, dataset, held_out, gates, batch)
    seconds = time.perf_counter() - start
    sizes = (seeds_per_split, probe_seeds, batch)
    text = report(args, metadata, detections, prompts, gating, sizes, seconds, best)
    print(text, flush=True)
    if args.record:
        RECORDED.write_text(text)


def report(args, metadata, detections, prompts, gating, sizes, seconds, best: Score) -> str:
    seeds_per_split, probe_seeds, batch = sizes
    classes = len(demo_dataset.CLASS_NAMES)
    training = json.loads(metadata.get("training", "{}") or "{}")
    default, drop_row = detections[0], detections[len(DEFINITIONS)]
    command = "$SHIELD_PYTHON bench/risk_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "## Memorization Risk: detection on the demo model"
        + (", and gating (#12 items 1, 2)" if gating else " (#12 item 1)")
        + ("" if args.quick else " (recorded run)"),
        "",
        f"`{command}` ({bench_common.git_commit()}, {time.strftime('%Y-%m-%d', time.gmtime())}); weights "
        f"`{pixel_unet.WEIGHTS_PATH.name}` (sha256 {weights_digest()}; training metadata: "
        f"{json.dumps(training, sort_keys=True)[:160]}); per split {classes} classes × {probe_seeds} seeds × batch "
        f"{batch} = {classes * probe_seeds * batch} probed samples, of which the first {seeds_per_split} seed(s) "
        f"per class ({classes * seeds_per_split * batch} samples) also sampled for the copy labels (calibration "
        f"seeds {CALIBRATION_SEED0}+, held-out seeds {HELD_OUT_SEED0}+), {SAMPLER}/{SCHEDULER}, {STEPS} steps, cfg "
        f"{CFG}; wall time {seconds:.0f} s (one thread, shared machine). Threshold: the lowest flagging ≤ "
        f"{TARGET_FPR:.0%} of the calibration negatives (flagged = score ≥ threshold); AUC, TPR and FPR on the "
        "held-out seeds (docs/risk.md).",
        "",
        summary("Node default, score magnitude", default),
        "",
        summary("Score drop", drop_row)
        + f" (N = {best.probe_steps} chosen among {DROPS[0].probe_steps}..{MAX_N} by the calibration AUC)",
        "",
        *prompt_summary(prompts),
        "",
        "Per sample:",
        "",
        bench_common.markdown_table(
            [
                "positive =",
                "score",
                "positives / negatives (held-out)",
                "AUC calibration",
                "AUC held-out",
                f"threshold (≤{TARGET_FPR:.0%} FPR, calibration)",
                "TPR held-out",
                "FPR held-out",
                "model evaluations per sample",
            ],
            [d.row() for d in detections],
        ),
        "",
        f"Cost: the probe makes 2N model evaluations per sample (cond + uncond at N sigmas, in N batched calls); "
        f"the {STEPS}-step run it screens makes {2 * STEPS}.",
        "",
        *prompt_table(prompts),
    ]
    if gating:
        headers = ["variant", "copies (detector)", "copies (pixel L2)", "outputs identical to plain", "class agreement"]
        lines += [
            "",
            "Gating on the held-out seeds that were sampled: Transition-Point CFG on every sample, and gated by each "
            "score at its calibrated threshold (per sample):",
            "",
            bench_common.markdown_table([*headers, "k-NN precision"], gating),
        ]
    return "\n".join(lines) + "\n"


def prompt_summary(prompts: list[PromptDetection]) -> list[str]:
    """One bold line per score at the largest n: Wen et al.'s per-prompt protocol."""
    largest = max(p.generations for p in prompts)
    lines = []
    for p in (p for p in prompts if p.generations == largest):
        met = p.auc_held_out[0].isdigit() and float(p.auc_held_out) >= TARGET_AUC
        lines += [
            f"**Per prompt from n = {largest} generations, {p.score.name}: held-out AUC {p.auc_held_out} over "
            f"{p.positives} / {p.negatives} prompt instances ({p.positive_classes} / {p.negative_classes} distinct "
            f"classes), TPR {p.tpr:.2f} at FPR {p.fpr:.3f}; target AUC ≥ {TARGET_AUC}: {'met' if met else 'NOT met'} "
            "(over 8 demo prompts only: see below).**",
            "",
        ]
    return lines[:-1]


def prompt_table(prompts: list[PromptDetection]) -> list[str]:
    return [
        "Per prompt, as Wen et al. (§4) report it: duplicated-item prompts vs control, each prompt instance (one "
        "class × one seed) scored from n generations, the mean of its per-sample scores (risk_math.prompt_score; "
        "the first n samples of a seed's batch are exactly ComfyUI's batch of n with that seed); threshold on the "
        "calibration seeds' instances. **The demo model has only 8 prompts** (5 classes with duplicated items, 3 "
        "controls): the instances of one class share their prompt, so they are not independent prompts, and the "
        "AUC says how reliably n generations tell these 5 classes from these 3 over seeds, not how a detector "
        "generalizes over a population of prompts as Wen et al.'s does.",
        "",
        bench_common.markdown_table(
            [
                "score",
                "n generations per prompt",
                "prompt instances positive / negative (held-out)",
                "distinct classes positive / negative",
                "AUC calibration",
                "AUC held-out",
                f"threshold (≤{TARGET_FPR:.0%} FPR, calibration)",
                "TPR held-out",
                "FPR held-out",
                "model evaluations per prompt",
            ],
            [p.row() for p in prompts],
        ),
    ]


def summary(title: str, row: Detection) -> str:
    met = row.auc_held_out[0].isdigit() and float(row.auc_held_out) >= TARGET_AUC
    return (
        f"**{title} (N = {row.score.probe_steps}, threshold {row.threshold:.4g}, {2 * row.score.probe_steps} model "
        f"evaluations per sample): held-out AUC {row.auc_held_out} per sample for {row.definition}, TPR "
        f"{row.tpr:.2f} at FPR {row.fpr:.3f}; target AUC ≥ {TARGET_AUC}: {'met' if met else 'NOT met'}.**"
    )


def weights_digest() -> str:
    return hashlib.sha256(pixel_unet.WEIGHTS_PATH.read_bytes()).hexdigest()[:12]


if __name__ == "__main__":
    main()
