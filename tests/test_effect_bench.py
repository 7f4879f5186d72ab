"""The effect benchmark's measurement on a tiny memorizer config: plain replicates, SPELL stops it, metrics are sane."""

import importlib.util
import itertools
import pathlib
import sys

import pytest
import torch

BENCH_FILE = pathlib.Path(__file__).resolve().parents[1] / "bench" / "effect_bench.py"


@pytest.fixture(scope="module")
def effect_bench():
    spec = importlib.util.spec_from_file_location("effect_bench", BENCH_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["effect_bench"] = module  # dataclasses resolve their module's annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("effect_bench", None)


@pytest.fixture(scope="module")
def tiny_results(effect_bench):
    setup = effect_bench.memorizer_setup(n_items=6, subsets=[(0,), (1, 2)], batch=4, steps=8)
    embedder = effect_bench.CentredPixelEmbedder(setup.item_images, "test")
    variants = effect_bench.build_variants(
        setup,
        embedder,
        effect_bench.pixel_vae(),
        spell_radii=(1.0,),
        procreate_strengths=(10.0,),
        families=["plain", "SPELL", "TPCFG"],
    )
    results = effect_bench.measure(setup, variants, embedder, warmup=False)
    return setup, {result.variant.name: result for result in results}


def test_plain_sampling_of_the_memorizer_replicates_its_prompt_items(tiny_results):
    setup, results = tiny_results
    plain = results["plain"]
    assert plain.metrics["replication"] == 1.0
    assert plain.metrics["median_distance"] < 1e-3
    assert plain.metrics["similarity_95pc"] == pytest.approx(1.0, abs=1e-6)
    # prompt {0}: every sample is item 0 (Vendi 1); prompt {1, 2}: two items at most
    assert 1.0 <= plain.metrics["vendi"] <= 1.5 + 1e-6
    nearest = torch.cdist(plain.latents.flatten(1), setup.items.flatten(1)).argmin(dim=1)
    assert set(nearest[plain.prompt_of == 0].tolist()) == {0}
    assert set(nearest[plain.prompt_of == 1].tolist()) <= {1, 2}


def test_spell_at_the_replication_radius_removes_every_copy_and_adds_diversity(tiny_results):
    setup, results = tiny_results
    plain, shielded = results["plain"], results["SPELL r=1τ"]
    assert shielded.metrics["replication"] == 0.0
    assert shielded.metrics["min_distance"] >= setup.threshold  # SPELL's guarantee, radius r = τ
    assert shielded.metrics["vendi"] > plain.metrics["vendi"]
    assert shielded.metrics["similarity_95pc"] < plain.metrics["similarity_95pc"]


def test_every_metric_lies_in_its_range_and_timings_are_ratios_to_plain(tiny_results):
    setup, results = tiny_results
    assert results["plain"].metrics["step_ratio"] == 1.0
    for result in results.values():
        m = result.metrics
        assert m["samples"] == len(setup.prompts) * setup.batch
        assert 0.0 <= m["replication"] <= 1.0
        assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
        assert 1.0 - 1e-6 <= m["vendi"] <= setup.batch + 1e-6
        assert -1.0 <= m["similarity_95pc"] <= 1.0 + 1e-6
        assert m["step_ratio"] > 0


def test_the_report_has_one_row_per_variant_and_the_chart_is_written(effect_bench, tiny_results, tmp_path):
    setup, results = tiny_results
    text = effect_bench.report(setup, list(results.values()))
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == list(results)
    chart = effect_bench.tradeoff_chart({"memorizer": (setup, list(results.values()))}, tmp_path / "chart.png")
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the Targets table's SPELL rows (issue #10), on a reduced sample count -----------------------------------
# A memorizable class: plain sampling copies its two duplicated items (95 % of 64 samples), and the model
# knows 192 unique moons to steer to. Not the few-shot heart: its 4 items are all the model knows of hearts
# (100 % copies), so any repellency from them leaves the class (docs/effects.md).
TARGET_CLASSES = ("moon",)


@pytest.fixture(scope="module")
def spell_rows(effect_bench):
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    setup = effect_bench.target_setup(seeds=effect_bench.HELD_OUT_SEEDS[:1], classes=TARGET_CLASSES)
    families = ("plain", "SPELL", "SPELL (embedding)")
    variants = [v for v in effect_bench.documented_methods(setup) if v.family in families]
    sampled = effect_bench.sample_targets(setup, variants)
    rows = {name: effect_bench.target_metrics(setup, *sampled[name]) for name in sampled}
    return setup, variants, sampled, rows


def test_the_spell_rows_at_the_documented_settings(effect_bench, spell_rows):
    """8 samples per method (a memorizable class × 1 held-out seed × batch 8). Plain copies a duplicated item
    (by the copy detector); SPELL in pixel L2 keeps every output at least r from every shield (its guarantee)
    and yet what the detector still calls a copy is left; SPELL in the detector's space leaves nothing that
    detector calls a copy and keeps the class (issue #10: latent L2 balls are escaped by colour and noise), but
    its copies are judged by either detector, since it repels in the first one's space."""
    setup, variants, sampled, rows = spell_rows
    plain, spell, embedded = rows["plain"], rows["SPELL"], rows["SPELL (embedding)"]
    assert plain["samples"] == spell["samples"] == embedded["samples"] == 8
    assert plain["copy_count"] >= 1, plain
    images, _ = sampled["SPELL"]
    distances, _ = effect_bench.replication.nearest_items(images, setup.shields)
    assert float(distances.min()) >= effect_bench.DOCUMENTED["spell_radius"] - 1e-3
    assert spell["pixel_copies"] == 0.0
    assert embedded["copies"] == 0.0, embedded
    # no output may stay a pixel copy (on 80 held-out samples 15 did, docs/effects.md "Targets"; none here)
    assert embedded["pixel_copies"] == 0.0, embedded
    assert embedded["agreement"] >= 0.9 * plain["agreement"], (embedded, plain)
    # It repels to just below the first detector's threshold, where the second, judging-only detector may still
    # see copies (when written: 4 of these 8; by eye all 8 are the duplicated moon, blurred): the verdict counts
    # a copy by either detector.
    target = effect_bench.TARGETS["SPELL (embedding)"]
    missed = effect_bench.check_target(target, embedded, plain, either=True)
    assert ("copies" in missed) == (embedded["copies_either"] > target.copies), (missed, embedded)
    assert embedded["copy_count_either"] == embedded["copy_count_second"]  # the first detector flags none


def test_the_targets_table_prints_one_row_per_method_with_its_verdict(effect_bench, spell_rows):
    setup, variants, _, rows = spell_rows
    text = effect_bench.targets_report(setup, variants, rows, seconds=1.0)
    lines = text.splitlines()
    header = next(index for index, line in enumerate(lines) if line.startswith("| method (its documented"))
    table = list(itertools.takewhile(lambda line: line.startswith("| "), lines[header + 2 :]))
    assert [line.split(" | ")[0].lstrip("| ").split(" (")[0] for line in table] == ["plain", "SPELL", "SPELL"]
    assert table[0].split(" | ")[4].startswith("1.00 (")  # plain's class agreement vs itself
    verdicts = [line.rstrip(" |").rsplit(" | ", 1)[1] for line in table[1:]]
    assert all(v == "yes" or v.startswith("no: ") for v in verdicts)
    per_class = lines[lines.index("| method | moon |") + 2 :][:3]
    assert [line.split(" | ")[0].lstrip("| ") for line in per_class] == ["plain", "SPELL", "SPELL (embedding)"]
    assert "| copies (2nd detector) | pixel L2 ≤ τ |" in text and f"{setup.judge.threshold:.3f}" in text
    assert f"threshold {setup.judge.second_detector.threshold:.3f}" in text and "EITHER detector" in text
    second = {name: rows[name] for name in ("plain", "SPELL", "SPELL (embedding)")}
    cells = [line.split(" | ")[2] for line in table]
    for cell, variant in zip(cells, variants, strict=True):
        m = second[variant.name]
        assert cell.startswith(f"{m['copies_second']:.1%} ({m['copy_count_second']}/{m['samples']})")
        assert variant.embeds_with_judge == (variant.name == "SPELL (embedding)")
        assert ("; either: " in cell) == (variant.name in ("plain", "SPELL (embedding)"))  # plain: the baseline
        assert max(m["copy_count"], m["copy_count_second"]) <= m["copy_count_either"]
        assert m["copy_count_either"] <= m["copy_count"] + m["copy_count_second"]


def test_early_copy_redraw_draws_new_moons_where_plain_copies(effect_bench, spell_rows):
    """The same 8 held-out moon samples: Early Copy Redraw at its documented setting starts every sample that
    heads into a duplicated moon again, so what comes out is the model's own new moons (fewer copies by either
    detector, the class kept, no noise added), at the cost of its look-ahead steps."""
    setup, _, _, plain_rows = spell_rows
    variants = [v for v in effect_bench.documented_methods(setup) if v.family in ("plain", "Redraw")]
    costs = {}
    sampled = effect_bench.sample_targets(setup, variants, step_costs=costs)
    redraw = effect_bench.target_metrics(setup, *sampled["Redraw"])
    plain = plain_rows["plain"]
    assert torch.equal(sampled["plain"][0], spell_rows[2]["plain"][0])  # the same plain samples
    assert redraw["copy_count_either"] <= plain["copy_count_either"] - 4, (redraw, plain)
    assert redraw["agreement"] >= 0.9 * plain["agreement"] and redraw["noise"] <= 1.5 * plain["noise"]
    assert costs["plain"] == 1.0 and costs["Redraw"] > 1.0


def test_the_verdict_counts_copies_by_either_detector_for_methods_that_embed_with_the_first(effect_bench):
    """A method that repels in the first detector's space can fool it: the verdict then counts a sample as a
    copy when either detector flags it, and a target relative to plain uses plain's count by either."""
    plain = {"copies": 0.90, "copies_either": 0.96, "copies_per_class": [0.9], "agreement": 1.0, "frechet": 1.0,
             "vendi": 2.0}  # fmt: skip
    fooled = {**plain, "copies": 0.0, "copies_either": 0.30, "vendi": 3.0}
    spell, procreate = effect_bench.TARGETS["SPELL (embedding)"], effect_bench.TARGETS["ProCreate"]
    assert effect_bench.check_target(spell, fooled, plain) == []
    assert effect_bench.check_target(spell, fooled, plain, either=True) == ["copies"]
    assert effect_bench.check_target(procreate, fooled, plain, either=True) == []  # 0.30 ≤ ⅓ × 0.96
    assert effect_bench.check_target(procreate, {**fooled, "copies_either": 0.33}, plain, either=True) == ["copies"]
