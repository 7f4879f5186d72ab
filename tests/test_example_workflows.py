"""Every example workflow validates against the running server's /object_info; the demo ones run.

The validator itself is tested on broken copies, so a pass means something.
"""

import copy
import json
import os
import pathlib

import pytest
import torch
from workflow_validation import ui_to_api, validate_workflow

WORKFLOW_DIR = pathlib.Path(__file__).resolve().parents[1] / "example_workflows"
WORKFLOWS = sorted(WORKFLOW_DIR.glob("*.json"))
DEMO_WORKFLOWS = [path for path in WORKFLOWS if path.name.startswith("shield_demo_")]


def load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


EXPECTED = [
    # the bundled demo model: these run here
    "shield_demo_plain",
    "shield_demo_spell",
    "shield_demo_embedding_spell",
    "shield_demo_tpcfg",
    "shield_demo_procreate",
    "shield_demo_tpcfg_embedding_spell",
    "shield_demo_redraw",
    "shield_demo_memory",
    "shield_demo_protect_references",
    "shield_demo_check_then_shield",
    # real checkpoints: validated against /object_info only
    "shield_sd15_spell",
    "shield_sdxl_transition_cfg",
    "shield_sd3_spell",
    "shield_sd15_procreate_dreamsim",
    "shield_unclip_variations",
    "shield_flux_spell",
    "shield_wan_spell",
]
# real-checkpoint workflows of the model families whose random-weight fixtures (harness/families.py) run
FAMILY_WORKFLOWS = {
    "shield_sd15_spell": "sd15",
    "shield_sdxl_transition_cfg": "sdxl",
    "shield_sd3_spell": "sd3",
    "shield_wan_spell": "wan21",
    "shield_flux_spell": "flux",
}
SLOW = os.environ.get("SHIELD_SLOW_TESTS") == "1"  # Flux's fixture has 404M parameters: opt-in


def test_every_expected_workflow_exists():
    assert sorted(path.stem for path in WORKFLOWS) == sorted(EXPECTED)


def test_each_method_workflow_uses_its_node():
    uses = {
        "shield_demo_spell": "ShieldSparseRepellency",
        "shield_demo_embedding_spell": "ShieldEmbeddingRepellency",
        "shield_demo_redraw": "ShieldEarlyCopyRedraw",
        "shield_demo_tpcfg": "ShieldTransitionPointCFG",
        "shield_demo_procreate": "ShieldProCreateGuidance",
        "shield_demo_memory": "ShieldMemory",
        "shield_demo_check_then_shield": "ShieldGate",
        "shield_sd15_procreate_dreamsim": "ShieldDreamSimLoader",
        "shield_sdxl_transition_cfg": "ShieldTransitionPointCFG",
        "shield_flux_spell": "FluxGuidance",
        "shield_wan_spell": "EmptyHunyuanLatentVideo",
    }
    for name, node_type in uses.items():
        assert node_type in {node["type"] for node in load(WORKFLOW_DIR / f"{name}.json")["nodes"]}, name


def test_check_then_shield_gates_on_the_score_calibrated_for_the_demo_model():
    """The risk node of "check, then shield" uses the drop score flagged per prompt, at the probe steps and
    per-prompt threshold the risk bench calibrated on the demo model for batches of 8 (nodes/risk.py), not the
    magnitude default, which flags almost nothing there (docs/risk.md)."""
    from comfyui_shield.nodes.risk import DROP_PROBE_STEPS, DROP_PROMPT_THRESHOLD, PROMPT_BATCH

    workflow = load(WORKFLOW_DIR / "shield_demo_check_then_shield.json")
    risk = first(workflow, "ShieldMemorizationRisk")
    flag = "per prompt (batch mean)"
    assert risk["widgets_values"][-4:] == [DROP_PROBE_STEPS, DROP_PROMPT_THRESHOLD, "drop", flag]
    assert first(workflow, "EmptyChromaRadianceLatentImage")["widgets_values"][-1] == PROMPT_BATCH


def test_recipe_workflow_chains_tpcfg_then_both_spells():
    """TPCFG -> SPELL in the detector's space -> SPELL in pixel L2 -> KSampler, one shield set for both."""
    workflow = load(WORKFLOW_DIR / "shield_demo_tpcfg_embedding_spell.json")
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}

    def source(node: dict, input_name: str) -> dict:
        entry = next(e for e in node["inputs"] if e["name"] == input_name)
        return nodes[links[entry["link"]][1]]

    model = source(first(workflow, "KSampler"), "model")
    chain = []
    while model["type"] != "ShieldDemoModelLoader":
        chain.append(model["type"])
        model = source(model, "model")
    assert chain == ["ShieldSparseRepellency", "ShieldEmbeddingRepellency", "ShieldTransitionPointCFG"]
    spells = [first(workflow, "ShieldSparseRepellency"), first(workflow, "ShieldEmbeddingRepellency")]
    assert source(spells[0], "shield_set")["id"] == source(spells[1], "shield_set")["id"]


def test_image_variations_shield_the_input_image_itself():
    workflow = load(WORKFLOW_DIR / "shield_unclip_variations.json")
    links = {link[0]: link for link in workflow["links"]}

    def source_of(node_type: str, input_name: str) -> int:
        entry = next(e for e in first(workflow, node_type)["inputs"] if e["name"] == input_name)
        return links[entry["link"]][1]

    load_image = first(workflow, "LoadImage")["id"]
    assert source_of("CLIPVisionEncode", "image") == load_image
    assert source_of("ShieldSetFromImages", "images") == load_image
    assert source_of("ShieldSparseRepellency", "shield_set") == first(workflow, "ShieldSetFromImages")["id"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_validates_against_the_server(server, path):
    assert validate_workflow(load(path), server.object_info()) == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.name)
def test_workflow_has_a_thumbnail(path):
    from PIL import Image

    with Image.open(path.with_suffix(".jpg")) as thumbnail:
        assert thumbnail.format == "JPEG" and min(thumbnail.size) >= 64


def first(workflow: dict, node_type: str) -> dict:
    return next(node for node in workflow["nodes"] if node["type"] == node_type)


def test_validator_reports_each_kind_of_breakage(server):
    info = server.object_info()
    plain = load(WORKFLOW_DIR / "shield_demo_plain.json")

    unknown = copy.deepcopy(plain)
    first(unknown, "VAEDecode")["type"] = "NoSuchNode"
    assert any("unknown node type" in p for p in validate_workflow(unknown, info))

    out_of_range = copy.deepcopy(plain)
    first(out_of_range, "KSampler")["widgets_values"][2] = 100000  # steps
    assert any("outside" in p for p in validate_workflow(out_of_range, info))

    bad_choice = copy.deepcopy(plain)
    first(bad_choice, "ShieldDemoConditioning")["widgets_values"][0] = "dragon"
    assert any("'dragon' is not one of" in p for p in validate_workflow(bad_choice, info))

    wrong_type = copy.deepcopy(plain)
    vae_link = next(link for link in wrong_type["links"] if link[5] == "VAE")
    model_node = first(wrong_type, "ShieldDemoModelLoader")
    vae_link[1], vae_link[2], vae_link[5] = model_node["id"], 0, "MODEL"
    assert any("takes VAE" in p for p in validate_workflow(wrong_type, info))

    unconnected = copy.deepcopy(plain)
    decode = first(unconnected, "VAEDecode")
    decode["inputs"] = [entry for entry in decode["inputs"] if entry["name"] != "vae"]
    assert any("'vae' is not connected" in p for p in validate_workflow(unconnected, info))


@pytest.mark.parametrize("path", DEMO_WORKFLOWS, ids=lambda path: path.name)
def test_demo_workflow_runs_on_the_server(server, path):
    """The saved graph as it is, with fewer steps and samples so the suite stays fast."""
    workflow = load(path)
    graph = ui_to_api(workflow, server.object_info())
    save = str(next(n for n in workflow["nodes"] if n["type"] in ("SaveImage", "ShieldSaveImageWithCertificate"))["id"])
    latent, sampler = (str(first(workflow, kind)["id"]) for kind in ("EmptyChromaRadianceLatentImage", "KSampler"))
    graph[latent]["inputs"]["batch_size"] = 2
    graph[sampler]["inputs"]["steps"] = 4
    outputs = server.run(graph, timeout=600)
    assert len(outputs[save]["images"]) == 2


def test_server_serves_the_workflows_as_templates(server):
    templates = server.get("/api/workflow_templates")
    assert "shield_demo_plain" in templates["comfyui_shield"]


@pytest.mark.parametrize(
    "name", [name for name, family in FAMILY_WORKFLOWS.items() if family != "flux" or SLOW], ids=str
)
def test_family_workflow_runs_on_the_random_weight_fixture(server, family_files, name):
    """The saved real-checkpoint graph, with the family fixture's files substituted for the real ones
    (harness/family_graphs.with_fixture_files: loaders, conditioning, 64 px, 3 steps); its inputs (an
    image to protect, a saved shield set) are written where the graph expects them."""
    import numpy
    from PIL import Image

    from comfyui_shield.core.shield_files import save_shield_set
    from comfyui_shield.core.shield_set import from_latents
    from harness.family_graphs import with_fixture_files

    family = family_files.link_into(server.base_dir / "models", FAMILY_WORKFLOWS[name])
    workflow = load(WORKFLOW_DIR / f"{name}.json")
    graph = with_fixture_files(ui_to_api(workflow, server.object_info()), family)
    generator = numpy.random.default_rng(0)
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            pixels = generator.integers(0, 256, (64, 64, 3), dtype=numpy.uint8)
            Image.fromarray(pixels).save(server.base_dir / "input" / inputs["image"])
        if node["class_type"] == "ShieldLoadShieldSet":
            shields = torch.randn(3, *family.latent_shape(1, 64, 64, 5)[1:])
            folder = server.base_dir / "models" / "shield_sets"
            folder.mkdir(parents=True, exist_ok=True)
            save_shield_set(from_latents(shields, family.latent_format), folder / inputs["filename"], "float32", True)
    outputs = server.run(graph, timeout=900)
    saver = next(n for n in workflow["nodes"] if n["type"] in ("SaveImage", "SaveAnimatedWEBP"))
    saved = outputs[str(saver["id"])]["images"]
    assert saved and all(server.output_path(info).is_file() for info in saved)
