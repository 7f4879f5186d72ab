"""The family matrix: every Shield node on every model family, in the real server (issue #13 item 2).

Each family's random-weight file (harness/families.py) is loaded by ComfyUI's own loaders in a server
of this module (its models stay cached across the module's graphs: the loaders and the plain sampler
have the same ids and inputs in every graph, so ComfyUI reuses their outputs). Small latents (64 px,
Wan: 5 frames = 2 latent frames), batch 2, 3 steps, a sampler subset (euler everywhere; dpmpp_2m for
SPELL, heun for dynamic TPCFG, euler_ancestral for ProCreate).

What is asserted is measured here, in the family's model space (comfy.latent_formats process_in, as
samplers/latent_space.py does): SPELL's guarantee against the shields and within the batch, the
Report's distances against our own, Radius Calibration against our own median. Flux (404M parameters)
runs only with SHIELD_SLOW_TESTS=1 (docs/families.md gives its time).
"""

from __future__ import annotations

import os
import pathlib
import re

import comfy.latent_formats
import pytest
import torch
from conftest import FAMILY_TEST_NODES

from harness import families
from harness.family_graphs import FamilyGraph
from harness.server import ComfyServer, ServerError

SLOW = os.environ.get("SHIELD_SLOW_TESTS") == "1"
MATRIX = families.FAST_FAMILIES + (("flux",) if SLOW else ())
STEPS = 3
RADIUS_RELATIVE = 0.3  # ×√D; independent latents are ~1.4 apart in these units
REPORT_LINE = re.compile(r"output (\d+): nearest shield '([^']*)' L2 ([-+0-9.eE]+)")


@pytest.fixture(scope="module")
def matrix_server(tmp_path_factory, family_files):
    """A server for this module only, so the families' models are freed when the module ends."""
    base_dir = tmp_path_factory.mktemp("matrix-base")
    (base_dir / "custom_nodes").mkdir(parents=True)
    (base_dir / "custom_nodes" / "shield_family_test_nodes").symlink_to(FAMILY_TEST_NODES, target_is_directory=True)
    for name in MATRIX:
        family_files.link_into(base_dir / "models", name)
    server = ComfyServer(base_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# -- helpers -----------------------------------------------------------------------------------------
def model_space(latents: torch.Tensor, family: families.Family) -> torch.Tensor:
    latent_format = getattr(comfy.latent_formats, family.latent_format)()
    return latent_format.process_in(latents.float().clone()).flatten(1).double()


def absolute_radius(family: families.Family, graph: FamilyGraph) -> float:
    numel = torch.Size(family.latent_shape(1, graph.width, graph.height, graph.frames)).numel()
    return RADIUS_RELATIVE * numel**0.5


class Matrix:
    """One family's graph builder: the plain batch every branch starts from, plus helpers."""

    def __init__(self, server: ComfyServer, name: str):
        self.server, self.family = server, families.FAMILIES[name]
        self.graph = FamilyGraph(self.family)
        self.plain = self.graph.sample(self.graph.model, steps=STEPS)
        self.saves: dict[str, str] = {}
        self.save("plain", self.plain)

    def save(self, key: str, samples) -> None:
        self.saves[key] = self.graph.save_latent(samples, f"matrix/{self.family.name}/{key}")

    def sample(self, model, key: str, **options) -> list:
        samples = self.graph.sample(model, steps=STEPS, **options)
        self.save(key, samples)
        return samples

    def spell(self, shield_set=None, intra_batch=False, radius=RADIUS_RELATIVE, unit="relative") -> list:
        inputs = {} if shield_set is None else {"shield_set": shield_set}
        return self.graph.add(
            "ShieldSparseRepellency",
            model=self.graph.model,
            radius=radius,
            radius_unit=unit,
            overcompensation=1.6,
            intra_batch=intra_batch,
            start_percent=0.0,
            end_percent=1.0,
            search="exact",
            **inputs,
        )

    def report(self, samples, shield_set=None, radius: float = 0.0) -> str:
        inputs = {} if shield_set is None else {"shield_set": shield_set}
        return self.graph.add(
            "ShieldReport",
            latent=samples,
            model=self.graph.model,
            radius=radius,
            similarity_threshold=0.0,
            include_run_records=True,
            **inputs,
        )[0]

    def run(self) -> dict:
        self.outputs = self.server.run(self.graph.nodes, timeout=600)
        return self.outputs

    def latent(self, key: str) -> torch.Tensor:
        return self.server.saved_latent(self.outputs, self.saves[key])

    def text(self, node_id: str) -> str:
        return "\n".join(self.outputs[node_id]["text"])


def report_distances(text: str) -> list[float]:
    return [float(match[2]) for match in REPORT_LINE.findall(text)]


def min_distance(outputs: torch.Tensor, shields: torch.Tensor, family) -> float:
    return float(torch.cdist(model_space(outputs, family), model_space(shields, family)).min())


# -- the matrix --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MATRIX)
def test_spell_keeps_outputs_out_of_shields_from_latents(matrix_server, name):
    """Shield Set from Latents of the plain batch; SPELL (intra-batch off) with euler and dpmpp_2m must
    end every output ≥ r from every shield in the model's space, where the plain outputs sit at 0."""
    matrix = Matrix(matrix_server, name)
    shields = matrix.graph.add("ShieldSetFromLatents", latent=matrix.plain, model=matrix.graph.model)
    patched = matrix.spell(shields)
    euler = matrix.sample(patched, "spell_euler")
    matrix.sample(patched, "spell_dpmpp_2m", sampler="dpmpp_2m", scheduler="karras")
    radius = absolute_radius(matrix.family, matrix.graph)
    report = matrix.report(euler, shields, radius)
    matrix.run()

    plain = matrix.latent("plain")
    assert tuple(plain.shape) == matrix.family.latent_shape(2, 64, 64, 5)
    for key in ("spell_euler", "spell_dpmpp_2m"):
        shielded = matrix.latent(key)
        assert torch.isfinite(shielded).all()
        assert min_distance(shielded, plain, matrix.family) >= radius * (1 - 1e-4), key
    text = matrix.text(report)
    ours = torch.cdist(model_space(matrix.latent("spell_euler"), matrix.family), model_space(plain, matrix.family))
    assert report_distances(text) == pytest.approx(ours.min(dim=1).values.tolist(), rel=1e-3)
    assert f"inside the radius r={radius:g}: 0/2" in text
    assert re.search(r"Sparse Repellency \(run #\d+.*\n  touched [1-9]", text), text


@pytest.mark.parametrize("name", MATRIX)
def test_spell_intra_batch_separates_the_batch(matrix_server, name):
    """Radius Calibration reports the plain batch's median pairwise distance as we measure it; intra-batch
    SPELL at twice that (absolute) radius ends a batch of 2 ≥ r apart; at a radius far below it, SPELL
    is a bit-identical no-op."""
    matrix = Matrix(matrix_server, name)
    calibration = matrix.graph.add("ShieldRadiusCalibration", latent=matrix.plain, model=matrix.graph.model)
    matrix.run()
    plain = matrix.latent("plain")
    median = float(torch.pdist(model_space(plain, matrix.family)).median())
    assert f"median pairwise distance {median:.3f}" in matrix.text(calibration[0])

    matrix = Matrix(matrix_server, name)
    radius = 2 * median  # the plain pair is within r at the last step at least, so SPELL must act
    matrix.sample(matrix.spell(intra_batch=True, radius=radius, unit="absolute"), "intra")
    matrix.sample(matrix.spell(intra_batch=True, radius=median / 100, unit="absolute"), "intra_tiny")
    matrix.run()
    intra = matrix.latent("intra")
    assert float(torch.pdist(model_space(intra, matrix.family)).min()) >= radius * (1 - 1e-4)
    assert not torch.equal(intra, plain)
    assert torch.equal(matrix.latent("intra_tiny"), plain)


@pytest.mark.parametrize("name", MATRIX)
def test_shield_set_from_images_and_report_distances(matrix_server, name):
    """Shield Set from Images of the decoded plain batch at the generation's size: the set's latents have
    the generation's shape, and the Report's distances are ours in the model's space."""
    matrix = Matrix(matrix_server, name)
    images = matrix.graph.decode(matrix.plain)
    inputs = {"length": matrix.graph.frames} if matrix.family.video else {}
    shields = matrix.graph.add(
        "ShieldSetFromImages",
        images=images,
        vae=matrix.graph.vae,
        model=matrix.graph.model,
        width=64,
        height=64,
        **inputs,
    )
    saved = matrix.graph.add("ShieldSaveShieldSet", shield_set=shields, filename=f"matrix_{name}", overwrite=True)
    report = matrix.report(matrix.plain, shields)
    matrix.run()

    from comfyui_shield.core.shield_files import load_shield_set

    shield_set = load_shield_set(pathlib.Path(matrix.outputs[saved[0]]["text"][0].split(" to ", 1)[1]))
    plain = matrix.latent("plain")
    assert shield_set.latent_format == matrix.family.latent_format
    assert shield_set.item_shape == tuple(plain.shape[1:])
    expected = torch.cdist(model_space(plain, matrix.family), model_space(shield_set.latents.float(), matrix.family))
    assert report_distances(matrix.text(report)) == pytest.approx(expected.min(dim=1).values.tolist(), rel=1e-3)


@pytest.mark.parametrize("name", MATRIX)
def test_transition_point_cfg_modes(matrix_server, name):
    """Static, dynamic (heun) and opposite before-guidance: each changes the CFG result, and the run
    record of the static one shows every sample switching to normal CFG. Flux dev at cfg 1: a no-op
    that the record and the Report state."""
    matrix = Matrix(matrix_server, name)
    common = {"transition_sigma": 0.0, "opposite_scale": 2.0, "cap_percent": 1.0}
    variants = {
        "static": ("static", "unconditional", "euler"),
        "opposite": ("static", "opposite", "euler"),
        "dynamic": ("dynamic", "unconditional", "heun"),
    }
    reports = {}
    for key, (mode, before, sampler) in variants.items():
        patched = matrix.graph.add(
            "ShieldTransitionPointCFG",
            model=matrix.graph.model,
            mode=mode,
            transition_percent=0.5,
            before_guidance=before,
            **common,
        )
        reports[key] = matrix.report(matrix.sample(patched, f"tpcfg_{key}", sampler=sampler))
    matrix.run()

    plain = matrix.latent("plain")
    for key in variants:
        assert torch.isfinite(matrix.latent(f"tpcfg_{key}")).all(), key
    if matrix.family.distilled_guidance:  # cfg 1: no CFG to transition; a recorded no-op, no extra pass
        assert torch.equal(matrix.latent("tpcfg_static"), plain)
        assert "inactive: sampled at cfg 1" in matrix.text(reports["static"])
        return
    assert not torch.allclose(matrix.latent("tpcfg_static"), plain, atol=1e-4)
    assert not torch.allclose(matrix.latent("tpcfg_opposite"), matrix.latent("tpcfg_static"), atol=1e-4)
    assert "switched to normal CFG: 2/2 samples" in matrix.text(reports["static"])
    assert "Transition-Point CFG (run #" in matrix.text(reports["dynamic"])


def procreate_branch(matrix: Matrix, mode: str) -> list:
    graph = matrix.graph
    embedder = graph.add("ShieldPixelEmbedder", size=16)
    references = graph.add(
        "ShieldReferenceSetFromImages",
        images=graph.decode(matrix.plain),
        vae=graph.vae,
        embedder=embedder,
        model=graph.model,
    )
    return graph.add(
        "ShieldProCreateGuidance",
        model=graph.model,
        vae=graph.vae,
        embedder=embedder,
        reference_set=references,
        strength=100.0,
        element_clip=1.0,
        max_grad_norm=0.5,
        look_ahead_steps=0,
        start_percent=0.0,
        end_percent=1.0,
        gradient_mode=mode,
        similarity_threshold=-1.0,
    )


@pytest.mark.parametrize("name", MATRIX)
def test_procreate_fast_and_exact(matrix_server, name):
    """ProCreate steers away from the decoded plain batch in both gradient modes (euler_ancestral and
    euler): the outputs move and the record counts guided steps. Wan: frame-wise energy on the clip's
    most similar frame (the references are the plain clips' frames)."""
    matrix = Matrix(matrix_server, name)
    fast = matrix.sample(procreate_branch(matrix, "fast"), "procreate_fast", sampler="euler_ancestral")
    matrix.sample(procreate_branch(matrix, "exact"), "procreate_exact")
    plain_ancestral = matrix.sample(matrix.graph.model, "plain_ancestral", sampler="euler_ancestral")
    report = matrix.report(fast)
    matrix.run()

    for key, plain_key in (("procreate_fast", "plain_ancestral"), ("procreate_exact", "plain")):
        guided = matrix.latent(key)
        assert torch.isfinite(guided).all(), key
        assert not torch.allclose(guided, matrix.latent(plain_key), atol=1e-4), key
    assert plain_ancestral
    assert re.search(r"ProCreate \(run #\d+.*\n  touched [1-9]", matrix.text(report)), matrix.text(report)


@pytest.mark.parametrize("name", MATRIX)
def test_shield_memory_repels_the_previous_run(matrix_server, name):
    """Shield Memory as SPELL's shields: the first run fills it with its 2 outputs, the second run (same
    seed, which would repeat them) ends ≥ r from them."""
    outputs = []
    for reset in (True, False):
        matrix = Matrix(matrix_server, name)
        memory = matrix.graph.add("ShieldMemory", memory_id=f"matrix_{name}", reset=reset)
        matrix.sample(matrix.spell(memory), "memory")
        matrix.run()
        outputs.append(matrix.latent("memory"))
    size = matrix_server.get(f"/shield/memory/matrix_{name}")["size"]
    assert size == 4
    radius = absolute_radius(matrix.family, matrix.graph)
    assert min_distance(outputs[1], outputs[0], matrix.family) >= radius * (1 - 1e-4)


@pytest.mark.parametrize("name", [name for name in MATRIX if families.FAMILIES[name].video])
def test_procreate_intra_batch_is_refused_for_clips(matrix_server, name):
    matrix = Matrix(matrix_server, name)
    branch = procreate_branch(matrix, "fast")
    matrix.graph.nodes[branch[0]]["inputs"]["intra_batch"] = True
    matrix.sample(branch, "procreate_video_intra")
    with pytest.raises(ServerError, match="intra_batch is not supported for video clips"):
        matrix.run()


# -- video shields and shields of another family ---------------------------------------------------------
def test_video_shield_of_another_length_names_both_shapes(matrix_server):
    """A Wan clip shield set made at 5 frames (2 latent frames), used on a 9-frame generation (3)."""
    matrix = Matrix(matrix_server, "wan21")
    shields = matrix.graph.add("ShieldSetFromLatents", latent=matrix.plain, model=matrix.graph.model)
    longer = matrix.graph.add("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=2)
    matrix.sample(matrix.spell(shields), "longer", latent=longer)
    with pytest.raises(ServerError) as error:
        matrix.run()
    message = str(error.value)
    assert "16 channels x 2 latent frames at 8x8" in message and "16 channels x 3 latent frames at 8x8" in message
    assert "width and height and length" in message


def test_shield_set_of_another_family_is_refused_for_video(matrix_server):
    """An SD3 shield set (16 channels, 4-D) on Wan (16 channels, 5-D), and a Wan clip set on SD3."""
    for shield_family, model_family in (("sd3", "wan21"), ("wan21", "sd3")):
        source = FamilyGraph(families.FAMILIES[shield_family])
        source_plain = source.sample(source.model, steps=STEPS)
        matrix = Matrix(matrix_server, model_family)
        for node_id, node in source.nodes.items():  # both graphs number their nodes alike: prefix one
            matrix.graph.nodes[f"s_{node_id}"] = _renamed(node, "s_")
        shields = matrix.graph.add(
            "ShieldSetFromLatents", latent=["s_" + source_plain[0], 0], model=["s_" + source.model[0], 0]
        )
        matrix.sample(matrix.spell(shields), "other_family")
        with pytest.raises(ServerError) as error:
            matrix.run()
        message = str(error.value)
        assert f"holds {families.FAMILIES[shield_family].latent_format} latents" in message
        assert f"makes {families.FAMILIES[model_family].latent_format} latents" in message


def _renamed(node: dict, prefix: str) -> dict:
    """A node whose links point at `prefix`-ed node ids."""
    inputs = {
        key: [prefix + value[0], value[1]] if isinstance(value, list) else value
        for key, value in node["inputs"].items()
    }
    return {"class_type": node["class_type"], "inputs": inputs}


def test_length_is_refused_for_an_image_model(matrix_server):
    matrix = Matrix(matrix_server, "sd3")
    images = matrix.graph.decode(matrix.plain)
    shields = matrix.graph.add(
        "ShieldSetFromImages",
        images=images,
        vae=matrix.graph.vae,
        model=matrix.graph.model,
        width=64,
        height=64,
        length=5,
    )
    matrix.report(matrix.plain, shields)
    with pytest.raises(ServerError, match="length applies to video models only. Set length to 1"):
        matrix.run()
