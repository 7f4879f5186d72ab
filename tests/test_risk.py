"""Memorization Risk in-process (#12 item 1): the detector statistics, the probe against the sampler it
mirrors and against Transition-Point CFG's record, the gate's checks, and the certificate's text."""

import dataclasses

import comfy.model_patcher
import nodes as comfy_nodes
import pytest
import torch
from PIL import Image

from comfyui_shield.core import metrics
from comfyui_shield.core.certificate import certificate_text, read_certificate
from comfyui_shield.core.records import RECORDS
from comfyui_shield.nodes.risk import DROP_PROBE_STEPS, DROP_PROMPT_THRESHOLD, DROP_THRESHOLD, ShieldMemorizationRisk
from comfyui_shield.reference_models import demo_dataset, pixel_unet
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning
from comfyui_shield.samplers.method_patch import add_model_gate, shield_patch_ids, without_shield_patches
from comfyui_shield.samplers.risk_math import flags, prompt_score, sample_score, step_magnitude
from comfyui_shield.samplers.risk_probe import KSamplerSettings, RiskGate, probe
from comfyui_shield.samplers.transition_hook import TransitionCfgPatch, TransitionSettings
from harness.families import flux_unet

STEPS, CFG = 6, 3.0


@pytest.fixture(scope="module")
def demo_model():
    return pixel_unet.load_demo_model()


def run_probe(model, class_name="star", seed=3, batch=3, probe_steps=1, threshold=0.0, cfg=CFG, statistic="magnitude"):
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, 32, 32)}
    run = KSamplerSettings(seed, STEPS, cfg)
    return probe(model, positive, negative, latent, run, probe_steps, threshold, statistic)


def ksample(model, class_name="star", seed=3, batch=3):
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(batch, 3, 32, 32)}
    (out,) = comfy_nodes.common_ksampler(model, seed, STEPS, CFG, "euler", "normal", positive, negative, latent)
    return out["samples"]


# -- the statistics ------------------------------------------------------------------------------------
def test_auc_counts_ordered_pairs_and_ties_half():
    assert metrics.roc_auc([3, 2], [1, 0]) == 1.0
    assert metrics.roc_auc([0, 1], [2, 3]) == 0.0
    assert metrics.roc_auc([1, 2], [1, 0]) == 0.875  # pairs (1,1) ½, (1,0), (2,1), (2,0): 3.5 / 4
    assert metrics.roc_auc([1, 1, 1], [1, 1]) == 0.5  # all tied: chance
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        metrics.roc_auc([1, 2], [])


def test_the_threshold_for_a_false_positive_rate_flags_at_most_that_share_and_never_half_a_tie():
    negatives = list(range(100))
    threshold = metrics.threshold_at_fpr(negatives, 0.01)
    assert 98 < threshold < 99  # only 99 is at or above it
    assert metrics.rate_at_threshold(negatives, threshold) == 0.01
    assert metrics.rate_at_threshold([200, 50], threshold) == 0.5
    assert metrics.threshold_at_fpr([5.0], 0.01) > 5.0  # nothing at or above the largest negative
    # ties at the boundary: 2 of 5 may be flagged, but three negatives tie at 2.0 -> only 3.0 is flagged
    tied = [1.0, 2.0, 2.0, 2.0, 3.0]
    assert metrics.rate_at_threshold(tied, metrics.threshold_at_fpr(tied, 0.4)) == 0.2
    assert metrics.rate_at_threshold(tied, metrics.threshold_at_fpr(tied, 0.8)) == 0.8
    assert metrics.threshold_at_fpr(tied, 1.0) == float("-inf")
    # the node's rule is the same (score >= threshold): a score equal to the threshold is flagged
    assert metrics.rate_at_threshold([threshold], threshold) == 1.0


def test_the_step_score_is_the_noise_prediction_difference():
    """‖ε_c − ε_u‖ with ε = (x − D)/σ equals ‖D_c − D_u‖/σ (Wen et al. §3 in denoised terms)."""
    generator = torch.Generator().manual_seed(0)
    x, d_c, d_u = (torch.randn(2, 3, 4, 4, generator=generator) for _ in range(3))
    sigma = torch.tensor([2.0, 0.5])
    eps_c, eps_u = (x - d_c) / sigma.view(-1, 1, 1, 1), (x - d_u) / sigma.view(-1, 1, 1, 1)
    expected = (eps_c - eps_u).flatten(1).norm(dim=1).double()
    assert torch.allclose(step_magnitude(d_c, d_u, sigma), expected, rtol=1e-6)


def test_the_two_scores_from_the_per_step_magnitudes():
    steps = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.5, 2.0]])  # [N = 3 steps, 2 samples]
    assert sample_score(steps, "magnitude").tolist() == pytest.approx([3.5 / 3, 4.0 / 3])
    assert sample_score(steps, "drop").tolist() == [4.0, 0.5]  # first step over the last: a fall scores high
    with pytest.raises(ValueError, match="needs probe_steps >= 2"):
        sample_score(steps[:1], "drop")


# -- the probe -------------------------------------------------------------------------------------------
def test_the_probe_sees_the_samplers_first_step_and_tpcfg_records_the_same_score(demo_model):
    risk = run_probe(demo_model, probe_steps=2)
    assert len(risk.scores) == 3 and len(risk.sigmas) == 2 and risk.model_evaluations == 4
    assert len(set(risk.scores)) == 3  # per sample, from each sample's own noise
    patch = TransitionCfgPatch(TransitionSettings("dynamic", "unconditional", 0.0))
    ksample(patch.patch(demo_model))
    record_scores = RECORDS.latest(patch.method.kind, patch.patch_id).summary["risk_score"]
    assert record_scores == pytest.approx(list(risk.step_scores[0]), rel=1e-9)
    other_seed = run_probe(demo_model, seed=4)
    assert other_seed.scores != run_probe(demo_model).scores


def test_the_probe_ignores_shield_patches_on_its_model_and_writes_no_run_record(demo_model):
    patch = TransitionCfgPatch(TransitionSettings("dynamic", "opposite", -3.0))
    patched = patch.patch(demo_model)
    assert shield_patch_ids(patched) == [patch.patch_id]
    RECORDS.clear()
    assert run_probe(patched).scores == run_probe(demo_model).scores
    assert RECORDS.runs() == []
    assert shield_patch_ids(without_shield_patches(patched.clone())) == []


def test_cfg_1_and_a_missing_negative_are_refused_with_the_reason(demo_model):
    with pytest.raises(ValueError, match=r"undefined here: 'cfg' is 1.*Flux"):
        run_probe(demo_model, cfg=1.0)
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    with pytest.raises(ValueError, match="'drop' score needs at least 2 probe steps"):
        run_probe(demo_model, probe_steps=1, statistic="drop")
    with pytest.raises(ValueError, match="'negative' holds no conditioning"):
        probe(demo_model, pixel_unet.class_conditioning("star"), [], latent, KSamplerSettings(0, 4, 3.0), 1, 0.0)


# -- the gate --------------------------------------------------------------------------------------------
def test_the_gate_refuses_another_batch_size(demo_model):
    risk = dataclasses.replace(run_probe(demo_model), flagged=(True, False, True))
    patched = TransitionCfgPatch(TransitionSettings("dynamic", "unconditional", 0.0)).patch(demo_model)
    add_model_gate(patched, RiskGate(risk))
    with pytest.raises(ValueError, match="measured on a batch of 3 but the sampler runs 2"):
        ksample(patched, batch=2)


# -- the certificate's file and text ---------------------------------------------------------------------
def test_a_png_without_a_certificate_is_refused_by_name(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    with pytest.raises(ValueError, match="no 'shield_certificate' chunk"):
        read_certificate(path)


def test_certificate_text_names_risk_nearest_item_and_each_shield():
    certificate = {
        "image": {"index": 0, "batch_size": 2},
        "risk": {"score": 0.91, "at_risk": True, "threshold": 0.5},
        "nearest_protected": {"latent_l2": {"item": "star_0001_dup", "distance": 3.2}, "embedder": None},
        "shields": [{"title": "Transition-Point CFG", "fired": True, "steps": [0, 1], "evaluations": 20}],
    }
    text = certificate_text(certificate, "a.png")
    assert "image 1/2: a.png" in text and "risk 0.91 (AT RISK" in text
    assert "star_0001_dup at 3.2" in text and "Transition-Point CFG: fired at 2/20 evaluations" in text


def test_a_guidance_distilled_flux_model_at_cfg_1_is_refused_saying_why():
    """Flux dev (the family fixture's config; ComfyUI's own Flux model class, built on the meta device:
    the check runs before any evaluation) as users run it: cfg 1, no negative pass."""
    model = flux_unet().get_model({}, device=torch.device("meta"))
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    conditioning = [[torch.zeros(1, 8, 64), {"pooled_output": torch.zeros(1, 64), "guidance": 3.5}]]
    with pytest.raises(ValueError, match=r"undefined here: 'cfg' is 1 \(and this model is guidance-distilled\)"):
        ShieldMemorizationRisk.execute(
            patcher,
            conditioning,
            conditioning,
            {"samples": torch.zeros(1, 16, 8, 8)},
            0,
            4,
            1.0,
            "euler",
            "simple",
            1.0,
            1,
            1.0,
            "magnitude",
        )


# -- detection on a reduced demo set ---------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["eps", "v_prediction", "flow"])
def test_detector_auc_on_a_reduced_demo_set(prediction):
    """Demo-dataset items in the closed-form memorizer (the exact optimal denoiser, so memorization is
    certain): prompts whose distribution is a handful of repeated items (the few-shot heart's 4 items; one
    memorizable class's 2 duplicated items: Wen et al.'s memorized prompts) against prompts over 32 unique
    items of a class (control circles; unique stars). Per sample, over seeds, in every parameterization
    (EPS noise, V-prediction, flow velocity): AUC ≥ 0.95 and the 1 %-FPR threshold keeps TPR ≥ 0.9.
    (The bundled demo UNet itself barely memorizes: docs/risk.md gives its numbers.)"""
    dataset = demo_dataset.build_dataset()
    heart, star_dup = dataset.class_items("heart"), dataset.class_items("star", duplicated=True)
    circles, stars = dataset.class_items("circle")[:32], dataset.class_items("star", duplicated=False)[:32]
    items = dataset.images[torch.cat([heart, star_dup, circles, stars])]
    groups = [range(0, 4), range(4, 6), range(6, 38), range(38, 70)]
    memorized = [True, True, False, False]
    model = build_memorizer(items, prediction=prediction)
    scores, labels = [], []
    for group, is_memorized in zip(groups, memorized, strict=True):
        positive, negative = subset_conditioning(len(items), group), subset_conditioning(len(items))
        for seed in range(3):
            latent = {"samples": torch.zeros(4, *items.shape[1:])}
            risk = probe(model, positive, negative, latent, KSamplerSettings(seed, 10, CFG), 1, 0.0)
            scores += risk.scores
            labels += [is_memorized] * len(risk.scores)
    positive = [s for s, m in zip(scores, labels, strict=True) if m]
    negative = [s for s, m in zip(scores, labels, strict=True) if not m]
    assert metrics.roc_auc(positive, negative) >= 0.95
    assert metrics.rate_at_threshold(positive, metrics.threshold_at_fpr(negative, 0.01)) >= 0.9


TEST_SEEDS = (7001, 7002)  # seeds the bench does not use


@pytest.fixture(scope="module")
def demo_probes(demo_model) -> dict[str, list]:
    """Every demo class × TEST_SEEDS × batch 8, probed with the demo's 20-step schedule and N =
    DROP_PROBE_STEPS steps: step_scores[0] is the magnitude at N = 1, scores the drop (one probe gives both)."""
    results = {}
    for class_name in demo_dataset.CLASS_NAMES:
        positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
        results[class_name] = [
            probe(
                demo_model,
                positive,
                negative,
                {"samples": torch.zeros(8, 3, 32, 32)},
                KSamplerSettings(seed, 20, CFG),
                DROP_PROBE_STEPS,
                0.0,
                "drop",
            )
            for seed in TEST_SEEDS
        ]
    return results


def per_sample(probes, classes, score) -> list[float]:
    return [value for name in classes for risk in probes[name] for value in score(risk)]


def magnitude(risk) -> tuple[float, ...]:
    return risk.step_scores[0]


def drop(risk) -> tuple[float, ...]:
    return risk.scores


DUPLICATED_CLASSES = demo_dataset.MEMORIZABLE_CLASSES + demo_dataset.FEW_SHOT_CLASSES


def test_detector_auc_on_a_reduced_demo_set_with_the_bundled_demo_model(demo_probes):
    """The real bundled demo UNet, probe only (2 seeds × batch 8 per class, seeds the bench does not use).
    Duplicated-item prompts (memorizable and few-shot classes) against control prompts (unique items only),
    per sample: the drop score (d_1 / d_N, N = DROP_PROBE_STEPS) reaches AUC ≥ 0.75 (0.82 on this set); the
    specified magnitude (N = 1) separates the few-shot heart (4 training images and nothing else: Wen et al.'s
    memorized prompt) from the controls, AUC ≥ 0.85, but not all duplicated-item prompts (AUC ≈ 0.75 on this
    set; docs/risk.md says why)."""
    controls = per_sample(demo_probes, demo_dataset.CONTROL_CLASSES, magnitude)
    assert metrics.roc_auc(per_sample(demo_probes, demo_dataset.FEW_SHOT_CLASSES, magnitude), controls) >= 0.85
    drop_controls = per_sample(demo_probes, demo_dataset.CONTROL_CLASSES, drop)
    assert metrics.roc_auc(per_sample(demo_probes, DUPLICATED_CLASSES, drop), drop_controls) >= 0.75


def test_a_prompt_score_is_the_mean_over_its_first_n_generations():
    scores = torch.tensor([1.0, 2.0, 3.0, 6.0])
    assert prompt_score(scores, 1) == 1.0 and prompt_score(scores, 2) == 1.5 and prompt_score(scores, 4) == 3.0
    for generations in (0, 5):
        with pytest.raises(ValueError, match="needs 1..4 samples"):
            prompt_score(scores, generations)


def test_per_prompt_auc_on_a_reduced_demo_set_with_the_bundled_demo_model(demo_model, demo_probes):
    """Wen et al.'s protocol (a prompt scored from n generations, AUC over prompts) on the reduced set: each
    class × seed is a prompt instance (5 duplicated-item classes × 2 seeds vs 3 controls × 2; instances of one
    class share their prompt). From n = 8 generations the drop tells them apart, AUC ≥ 0.95, and averaging
    helps: the n = 8 AUC is at least the per-sample one. The first n samples of a probed batch are the batch of
    n with that seed, so one batch of 8 gives every n (checked against a batch of 4)."""

    def instances(classes, score, n) -> list[float]:
        return [prompt_score(torch.tensor(score(risk)), n) for name in classes for risk in demo_probes[name]]

    control, duplicated = demo_dataset.CONTROL_CLASSES, DUPLICATED_CLASSES
    per_prompt = metrics.roc_auc(instances(duplicated, drop, 8), instances(control, drop, 8))
    assert per_prompt >= 0.95
    assert per_prompt >= metrics.roc_auc(
        per_sample(demo_probes, duplicated, drop), per_sample(demo_probes, control, drop)
    )
    positive, negative = pixel_unet.class_conditioning("star"), pixel_unet.null_conditioning()
    run = KSamplerSettings(TEST_SEEDS[0], 20, CFG)
    four = probe(
        demo_model, positive, negative, {"samples": torch.zeros(4, 3, 32, 32)}, run, DROP_PROBE_STEPS, 0.0, "drop"
    )
    assert prompt_score(torch.tensor(four.scores), 4) == pytest.approx(instances(("star",), drop, 4)[0], rel=1e-5)


# -- flag per prompt (the batch mean, Wen et al. §4) -------------------------------------------------------
def node_risk(model, class_name: str, seed: int, threshold: float, **options):
    """Memorization Risk as the graph runs it: the demo's 20-step schedule, the drop at N = DROP_PROBE_STEPS."""
    positive, negative = pixel_unet.class_conditioning(class_name), pixel_unet.null_conditioning()
    latent = {"samples": torch.zeros(8, 3, 32, 32)}
    output = ShieldMemorizationRisk.execute(
        model, positive, negative, latent, seed, 20, CFG, "euler", "normal", 1.0, DROP_PROBE_STEPS, threshold, **options
    )
    return output.result


def test_flag_per_prompt_flags_a_memorizable_batch_as_a_whole_and_not_a_control_batch(demo_model, demo_probes):
    """At the demo's per-prompt threshold (drop, N = DROP_PROBE_STEPS, batch 8; seed 7001, not a bench seed), the
    star batch (a memorizable class) is flagged as a whole although some of its samples score below the per-sample
    threshold, the circle batch (a control) not at all; the flags are the batch-mean rule, the scores per sample."""
    for class_name, expected in (("star", True), ("circle", False)):
        risk, scores, at_risk, text = node_risk(
            demo_model, class_name, TEST_SEEDS[0], DROP_PROMPT_THRESHOLD, score="drop", flag="per prompt (batch mean)"
        )
        assert scores == list(demo_probes[class_name][0].scores)  # 'scores' stays per sample
        mean = sum(scores) / len(scores)
        assert risk.batch_mean == pytest.approx(mean, rel=1e-12)
        assert (mean >= DROP_PROMPT_THRESHOLD) == expected, (class_name, mean)
        assert at_risk == [expected] * 8 and risk.flagged == (expected,) * 8
        assert risk.flag_rule == "per prompt (batch mean)"
        where = "at or above" if expected else "below"
        assert f"flagged per prompt (batch mean): the mean of the 8 sample(s), {mean:.4g}, is {where}" in text
        assert f"{8 if expected else 0}/8 sample(s) flagged" in text
        if expected:  # flagged per sample at the drop's threshold, not all would be: the rule changed the flags
            assert min(scores) < DROP_THRESHOLD


def test_flag_per_sample_is_the_default_and_unchanged(demo_model, demo_probes):
    """Without 'flag' (prompts saved before it existed) and with "per sample", every output is what it was:
    each sample flagged by score >= threshold, the same text, the same risk (RiskResult equal field by field)."""
    threshold = sorted(demo_probes["star"][0].scores)[4]  # 4 of 8 samples at or above
    default = node_risk(demo_model, "star", TEST_SEEDS[0], threshold, score="drop")
    explicit = node_risk(demo_model, "star", TEST_SEEDS[0], threshold, score="drop", flag="per sample")
    assert default == explicit
    risk, scores, at_risk, text = default
    assert at_risk == [score >= threshold for score in scores] and sum(at_risk) == 4
    assert risk.flag_rule == "per sample" and text.splitlines()[0].endswith(f"4/8 sample(s) at or above {threshold:g}")
    assert dataclasses.replace(demo_probes["star"][0], threshold=threshold, flagged=risk.flagged) == risk


def test_the_certificate_says_which_flag_rule_set_the_flag():
    per_prompt = {"score": 0.7, "at_risk": True, "threshold": 0.77, "flag_rule": "per prompt (batch mean)"}
    certificate = {"image": {"index": 0, "batch_size": 8}, "risk": {**per_prompt, "batch_mean": 0.981}}
    assert "risk 0.7 (AT RISK per prompt: batch mean 0.981, per-prompt threshold 0.77)" in certificate_text(certificate)
    certificate["risk"] = {"score": 0.7, "at_risk": False, "threshold": 0.77, "flag_rule": "per sample"}
    assert "risk 0.7 (not flagged, threshold 0.77)" in certificate_text(certificate)


def test_an_unknown_flag_rule_is_refused_by_name():
    assert flags((1.0, 3.0), 1.5, "per sample") == (False, True)
    assert flags((1.0, 3.0), 1.5, "per prompt (batch mean)") == (True, True)  # mean 2.0
    assert flags((1.0, 1.5), 1.5, "per prompt (batch mean)") == (False, False)  # mean 1.25
    with pytest.raises(ValueError, match="unknown flag rule 'per batch'"):
        flags((1.0,), 0.5, "per batch")
