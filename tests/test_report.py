"""Shield Report: numbers match a direct computation, charts are drawn, run records are read tolerantly,
and the node runs on the real server."""

import re

import comfy.latent_formats
import folder_paths
import nodes as comfy_nodes
import numpy as np
import pytest
import torch

from comfyui_shield.core import metrics
from comfyui_shield.core.records import RECORDS
from comfyui_shield.core.report import method_curves
from comfyui_shield.core.shield_set import ShieldSetError, from_latents
from comfyui_shield.nodes.report import ShieldReport
from comfyui_shield.reference_models.memorizer import build_memorizer, subset_conditioning


class TinyEmbedder:
    """An embedder as the report sees one: `.key` and `.embed(images [B,H,W,3]) -> [B,D]`.

    Mean colour of each image quadrant (12 numbers), so images that differ in colour layout differ.
    """

    key = "tiny-quadrant-colours"

    def __init__(self):
        self.calls = 0

    def embed(self, images):
        self.calls += 1
        height, width = images.shape[1] // 2, images.shape[2] // 2
        quadrants = [
            images[:, :height, :width],
            images[:, :height, width:],
            images[:, height:, :width],
            images[:, height:, width:],
        ]
        return torch.cat([quadrant.mean(dim=(1, 2)) for quadrant in quadrants], dim=1)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Previews go to a temporary folder, and each test starts with an empty record book."""
    monkeypatch.setattr(folder_paths, "temp_directory", str(tmp_path))
    RECORDS.clear()
    yield
    RECORDS.clear()


def run_report(**inputs):
    output = ShieldReport.execute(**inputs)
    charts, text = output.result
    return charts, text, output.ui


def sample_memorizer(items, batch, seed=11):
    return sample_memorizer_model(build_memorizer(items), items, batch, seed)


def sample_memorizer_model(model, items, batch, seed=11):
    conditioning = subset_conditioning(len(items))
    latent = torch.zeros(batch, *items.shape[1:])
    (out,) = comfy_nodes.common_ksampler(
        model, seed, 12, 1.0, "euler", "karras", conditioning, conditioning, {"samples": latent}
    )
    return out


def numbers_after(label, text):
    return [float(value) for value in re.findall(rf"{label} (-?[\d.e+-]+)", text)]


def assert_chart_image(charts, min_height=300):
    assert charts.ndim == 4 and charts.shape[0] == 1 and charts.shape[-1] == 3
    assert charts.shape[1] >= min_height and charts.shape[2] >= 500
    assert 0.0 <= charts.min() and charts.max() <= 1.0
    pixels = charts[0].reshape(-1, 3)
    assert pixels.std() > 0.05  # not blank
    assert len(torch.unique((pixels * 255).round(), dim=0)) > 50  # text, bars and lines, not one colour


def test_latent_report_matches_direct_computation(memorizer_items):
    # the memorizer reproduces its items, so its outputs sit on (or very near) the shields
    latent = sample_memorizer(memorizer_items, batch=4)
    shields = from_latents(memorizer_items[:3], "SD15", names=["a", "b", "c"])
    radius = 1.0
    charts, text, ui = run_report(latent=latent, shield_set=shields, radius=radius)

    scale = comfy.latent_formats.SD15().scale_factor  # the set says SD15: distances in SD1.5's model space
    distances = torch.cdist(latent["samples"].flatten(1).double(), memorizer_items[:3].flatten(1).double()) * scale
    nearest, index = distances.min(dim=1)
    reported = numbers_after("L2", text)
    assert reported == pytest.approx(nearest.tolist(), rel=1e-3, abs=1e-3)
    for row, shield in enumerate(index.tolist()):
        assert f"output {row}: nearest shield '{'abc'[shield]}'" in text
    inside = int((nearest <= radius).sum())
    assert f"inside the radius r=1: {inside}/4" in text
    assert inside >= 1  # at least one output reproduced one of the three shielded items
    vendi = metrics.vendi_score(latent["samples"] * scale)
    assert f"Vendi {vendi:.4g} of 4" in text and "(latent cosine)" in text
    assert ui["text"] == [text]
    assert ui["images"] and (folder_paths.get_temp_directory()) is not None
    assert_chart_image(charts)


def test_embedder_report_matches_direct_computation():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(3, 16, 16, 3, generator=generator)
    shield_images = torch.cat([images[:1], torch.rand(2, 16, 16, 3, generator=generator)])  # output 0 is a copy
    shields = from_latents(torch.randn(3, 4, 2, 2, generator=generator), "SD15", images=shield_images)
    embedder = TinyEmbedder()
    charts, text, _ = run_report(images=images, shield_set=shields, embedder=embedder, similarity_threshold=0.999)

    expected = torch.nn.functional.cosine_similarity(
        embedder.embed(images)[:, None].double(), embedder.embed(shield_images)[None].double(), dim=-1
    ).max(dim=1)
    assert numbers_after("cosine", text)[:3] == pytest.approx(expected.values.tolist(), abs=1e-4)
    assert "output 0: cosine 1 to 'latent 0' SIMILAR" in text
    assert "cosine >= 0.999 (tiny-quadrant-colours): 1/3" in text
    assert f"Vendi {metrics.vendi_score(embedder.embed(images)):.4g} of 3" in text and "(embedder cosine)" in text
    assert "latent L2 distances to the shields are not measured" in text
    assert_chart_image(charts)


def test_stored_shield_embeddings_are_used_instead_of_embedding_again():
    images = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    embedder = TinyEmbedder()
    shields = from_latents(torch.zeros(1, 4, 1, 1), "SD15").with_embeddings(embedder.key, embedder.embed(images[:1]))
    embedder.calls = 0
    _, text, _ = run_report(images=images, shield_set=shields, embedder=embedder)
    assert embedder.calls == 1  # only the outputs
    assert numbers_after("cosine", text)[0] == pytest.approx(1.0, abs=1e-6)


def add_spell_step(record, sigma, touched, correction, hits):
    record.add_step(
        sigma=sigma,
        in_window=True,
        touched=touched,
        shield_hits=hits,
        batch_hits=[0] * len(sigma),
        relative_correction=correction,
    )


def test_run_records_become_a_timeline_and_curves():
    repel = RECORDS.start("sparse_repellency", "patch-1", label="r=4")
    for step in range(6):
        active = step < 3
        add_spell_step(
            repel,
            sigma=[10.0 / (step + 1)] * 2,
            touched=[active, step == 0],
            correction=[0.3 / (step + 1) if active else 0.0, 0.1 if step == 0 else 0.0],
            hits=[2 if active else 0, 1 if step == 0 else 0],
        )
    tp = RECORDS.start("transition_cfg", "patch-2")
    for step in range(5):
        switched = [step >= 4, step >= 1]
        tp.add_step(
            sigma=[1.0, 1.0],
            in_window=True,
            touched=[not s for s in switched],
            d_t=[5.0 - step, 3.0 - abs(step - 1)],
            guidance=[3.0 if s else 0.0 for s in switched],
            switched=switched,
            counted=[True, True],
            cfg=3.0,
        )
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    charts, text, _ = run_report(latent=latent)
    assert "Sparse Repellency (run #" in text and ", r=4): 6 steps recorded" in text
    assert "touched 4 step-samples in 3 steps, last at step 2; samples touched: [0, 1]" in text
    assert "max ‖λΔ‖ / ‖x − x̂0‖ 0.3" in text and "max shields within r at one step: 2" in text
    assert "switched to normal CFG: 2/2 samples, at steps [4, 1]" in text
    assert_chart_image(charts, min_height=600)  # summary + heatmap + curves: two rows of panels

    _, without, _ = run_report(latent=latent, include_run_records=False)
    assert "Sparse Repellency" not in without and "Transition-Point CFG" not in without


def test_procreate_records_become_similarity_curves():
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))}
    bare_charts, bare_text, _ = run_report(latent=latent)
    assert "ProCreate" not in bare_text
    record = RECORDS.start("procreate", "pc-1", label="test/embedder")
    record.add_step(sigma=[9.0, 9.0], touched=[False, False], in_window=False)  # outside the window
    for step, (first, second) in enumerate([(0.95, 0.4), (0.9, 0.42), (0.7, 0.41), (0.5, 0.4)]):
        record.add_step(
            sigma=[4.0 / (step + 1)] * 2,
            similarity=[first, second],
            nearest=[0, 1],
            touched=[first > 0.6, False],
            in_window=True,
        )
    record.set_summary(
        guided_steps=3, skipped_nonfinite=0, references=2, memory_id=None, embedder="test/embedder", settings={}
    )
    curves = method_curves(record)
    assert curves.field("similarity").shape == (5, 2) and np.isnan(curves.field("similarity")[0]).all()
    assert curves.touched[:, 0].tolist() == [False, True, True, True, False] and curves.touched_samples() == [0]
    assert curves.sample(0)["similarity"][1] == 0.95
    charts, text, _ = run_report(latent=latent)
    assert "ProCreate (run #" in text and ", test/embedder): 5 steps recorded, 2 references" in text
    assert "touched 3 step-samples in 3 steps, last at step 3; samples touched: [0]" in text
    assert "max nearest-reference similarity: first measured step 0.95, last 0.5" in text
    assert_chart_image(charts)
    assert charts.shape[2] >= 2 * bare_charts.shape[2] - 10  # a second panel: the similarity curves


def test_report_reads_a_real_procreate_run(memorizer_items):
    import comfy.sd

    from comfyui_shield.samplers.procreate_hook import ProCreateGuidance, ProCreateSettings
    from harness.procreate_parts import pooled_projection_embedder, rgb_items, to_images

    items = rgb_items(6)
    model = build_memorizer(items).clone()
    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
    reference = from_latents(items[:3], "LatentFormat", images=to_images(items[:3]))
    ProCreateGuidance(
        vae,
        pooled_projection_embedder(),
        reference,
        ProCreateSettings(gamma=80.0, gradient_mode="fast"),
        patch_id="report",
    ).attach(model)
    out = sample_memorizer_model(model, items, batch=3)
    _, text, _ = run_report(latent=out)
    record = RECORDS.latest("procreate")
    guided = sorted({i for step in record.steps for i, on in enumerate(step["touched"]) if on})
    assert guided and f"samples touched: {guided}" in text
    assert f"{len(record.steps)} steps recorded, 3 references" in text


def test_a_record_refuses_fields_its_method_does_not_declare():
    record = RECORDS.start("sparse_repellency", "p")
    with pytest.raises(KeyError, match=r"\['delta_ratio'\] not declared in SpellStep"):
        record.add_step(sigma=[1.0], in_window=True, touched=[True], shield_hits=[1], batch_hits=[0],
                        relative_correction=[0.1], delta_ratio=[0.1])  # fmt: skip
    with pytest.raises(KeyError, match=r"fields \['touched'\] missing"):
        record.add_step(sigma=[1.0], in_window=True, shield_hits=[1], batch_hits=[0], relative_correction=[0.1])
    with pytest.raises(KeyError, match="not declared in TransitionSummary"):
        RECORDS.start("transition_cfg", "q").set_summary(switch_steps=[1])
    assert record.steps == []
    unknown = RECORDS.start("not_a_method", "r")
    unknown.add_step(anything=1)  # unregistered kinds are kept, unchecked, and not reported
    assert method_curves(unknown) is None and method_curves(RECORDS.start("transition_cfg", "s")) is None
    _, text, _ = run_report(latent={"samples": torch.ones(3, 4, 2, 2)})
    assert "not_a_method" not in text and "Vendi 1 of 3" in text


# -- item 11: distances in the model's space, as Sparse Repellency measures them ---------------------------
FAMILIES = {"SD15": 4, "SDXL": 4, "SD3": 16}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_distances_and_diversity_are_measured_in_the_models_space(family):
    latent_format = getattr(comfy.latent_formats, family)()
    generator = torch.Generator().manual_seed(8)
    shields_latent = torch.randn(3, FAMILIES[family], 4, 4, generator=generator) * 3 + 0.5
    outputs = shields_latent[[0, 1]] + 0.4 * torch.randn(2, FAMILIES[family], 4, 4, generator=generator)
    _, text, _ = run_report(latent={"samples": outputs}, shield_set=from_latents(shields_latent, family))
    in_model = torch.cdist(
        latent_format.process_in(outputs).flatten(1), latent_format.process_in(shields_latent).flatten(1)
    )
    raw = torch.cdist(outputs.flatten(1), shields_latent.flatten(1))
    assert numbers_after("L2", text) == pytest.approx(in_model.min(dim=1).values.tolist(), rel=1e-3)  # 4 digits
    ratio = latent_format.scale_factor  # L2: the scale only (a shift cancels in differences)
    assert in_model.min(dim=1).values.tolist() == pytest.approx((raw.min(dim=1).values * ratio).tolist(), rel=1e-4)
    similarity = metrics.mean_pairwise_similarity(latent_format.process_in(outputs))  # cosine: a shift matters
    assert f"mean pairwise similarity {similarity:.4g}" in text
    if family == "SD3":
        assert f"mean pairwise similarity {metrics.mean_pairwise_similarity(outputs):.4g}" not in text


def test_the_report_agrees_with_sparse_repellency_on_an_sd15_model(memorizer_items):
    """SPELL keeps outputs r away from the shields in the model's space; the report says the same."""
    from comfyui_shield.nodes.spell import repellency_model

    sd15 = comfy.latent_formats.SD15()
    model = build_memorizer(memorizer_items).clone()
    model.add_object_patch("latent_format", sd15)  # an SD1.5 latent format (scale 0.18215) on the memorizer
    shields = from_latents(sd15.process_out(memorizer_items), "SD15")  # the set holds LATENTs, as VAE Encode gives
    radius = 6.0
    patched = repellency_model(model, shields, None, radius, "absolute", 1.6, False, 0.0, 1.0, "auto")
    out = sample_memorizer_model(patched, memorizer_items, batch=4)
    _, text, _ = run_report(latent=out, shield_set=shields, radius=radius, model=model)
    in_model = torch.cdist(sd15.process_in(out["samples"]).flatten(1), memorizer_items.flatten(1)).min(dim=1).values
    assert float(in_model.min()) >= radius - 1e-3  # SPELL's guarantee, in the model's space
    assert "inside the radius r=6: 0/4" in text
    assert numbers_after("L2", text) == pytest.approx(in_model.tolist(), rel=1e-3)  # printed with 4 digits
    _, same, _ = run_report(latent=out, shield_set=shields, radius=radius)  # the set's format, no model
    assert numbers_after("L2", same) == numbers_after("L2", text)
    with pytest.raises(ShieldSetError, match="Shield Report: shield_set.*SD15 latents but the model makes SDXL"):
        other = model.clone()
        other.add_object_patch("latent_format", comfy.latent_formats.SDXL())
        run_report(latent=out, shield_set=shields, model=other)
    _, unknown, _ = run_report(latent=out, shield_set=from_latents(out["samples"], "VAE4ch"))
    assert "L2 distances are in LATENT units" in unknown


def test_bad_connections_name_the_input_to_fix():
    with pytest.raises(ValueError, match="'images' input, the 'latent' input"):
        ShieldReport.execute()
    shields = from_latents(torch.zeros(2, 4, 8, 8), "SD15")
    with pytest.raises(ValueError, match="'shield_set' holds 2 shields of SD15 latents 4x8x8"):
        ShieldReport.execute(latent={"samples": torch.zeros(1, 4, 16, 16)}, shield_set=shields)
    with pytest.raises(ValueError, match="connect the decoded outputs to 'images'"):
        ShieldReport.execute(latent={"samples": torch.zeros(1, 4, 8, 8)}, embedder=TinyEmbedder())
    with pytest.raises(ValueError, match="no embeddings for embedder 'tiny-quadrant-colours' and no images"):
        ShieldReport.execute(images=torch.rand(1, 8, 8, 3), shield_set=shields, embedder=TinyEmbedder())
    with pytest.raises(ValueError, match="'latent' holds 2 items but 'images' holds 1"):
        ShieldReport.execute(images=torch.rand(1, 8, 8, 3), latent={"samples": torch.zeros(2, 4, 8, 8)})


def test_report_node_on_the_server(server):
    red, blue = 0xFF0000, 0x0000FF
    widgets = {"radius": 0.0, "similarity_threshold": 0.0, "include_run_records": True}
    graph = {
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "zeros": {"class_type": "ShieldReport", "inputs": {"latent": ["latent", 0], **widgets}},
        "red": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1, "color": red}},
        "blue": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": blue}},
        "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["red", 0], "image2": ["blue", 0]}},
        "colours": {
            "class_type": "ShieldReport",
            "inputs": {"images": ["batch", 0], "latent": ["latent", 0], **widgets},
        },
    }
    outputs = server.run(graph)
    zeros = "".join(outputs["zeros"]["text"])
    assert "Shield Report: 3 outputs" in zeros
    assert "diversity (latent cosine): Vendi 1 of 3, mean pairwise similarity 1" in zeros  # three identical latents
    colours = "".join(outputs["colours"]["text"])
    # red vs blue pixels are orthogonal: clusters of 1 and 2 give Vendi exp(H(1/3, 2/3)) and MSS 2/6
    vendi = np.exp(-(np.log(1 / 3) / 3 + 2 / 3 * np.log(2 / 3)))
    assert f"diversity (pixel cosine): Vendi {vendi:.4g} of 3, mean pairwise similarity 0.3333" in colours
    chart_file = server.output_path(outputs["colours"]["images"][0])
    from PIL import Image

    with Image.open(chart_file) as chart:
        assert chart.size[0] >= 500 and len(chart.convert("RGB").getcolors(maxcolors=1 << 20)) > 50
