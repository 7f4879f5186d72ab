"""Save Image with Shield Certificate: Save Image, plus per output what the pack knows about it (#12 item 3).

The PNG gets ComfyUI's own `prompt` and `workflow` text chunks (from the hidden PROMPT / EXTRA_PNGINFO
inputs, as Save Image writes them; left out under --disable-metadata like Save Image does) and a
`shield_certificate` chunk (core/certificate.py lists its fields), which is always written: it is what
the node is for. The node shows each certificate as text (web/shield.js shows a Shield node's UI text).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional

import folder_paths
import numpy as np
import torch
from comfy.cli_args import args as comfy_args
from comfy_api.v0_0_2 import io
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ..core import paths
from ..core.certificate import CHUNK, build_certificate, certificate_json, certificate_text, node_settings, shield_entry
from ..core.records import RECORDS
from ..core.shield_set import ShieldSet, ShieldSetError
from ..samplers.method_patch import shield_patch_ids
from ..samplers.risk_probe import RiskResult
from ..version import __version__
from .common import CATEGORY, EMBEDDER, RISK, SHIELD_SET
from .report import build_report
from .run_summary import node_for_patch
from .validation import ShieldNode


class ShieldSaveImageWithCertificate(ShieldNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ShieldSaveImageWithCertificate",
            display_name="Save Image with Shield Certificate",
            category=f"{CATEGORY}/report",
            description=(
                "Saves images to the output folder as Save Image does (prompt and workflow in the PNG) and adds a "
                "'shield_certificate' text chunk per image: its memorization risk score, its nearest protected item "
                "(latent L2, and the embedder's similarity), which Shield methods fired on it and at which steps, "
                "their settings and the pack version."
            ),
            inputs=[
                io.Image.Input("images", tooltip="The images to save."),
                io.String.Input(
                    "filename_prefix",
                    default="shield",
                    tooltip="File name prefix in the output folder (may hold a subfolder, as in Save Image).",
                ),
                io.Model.Input(
                    "model",
                    optional=True,
                    tooltip="The model the sampler used, with its Shield methods: their newest run records say "
                    "whether each fired on each image. Unconnected: no shield entries.",
                ),
                RISK.Input("risk", optional=True, tooltip="From Memorization Risk: each image's score and flag."),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip="The sampler's output latents, for the L2 distance to the nearest protected item.",
                ),
                SHIELD_SET.Input(
                    "shield_set", optional=True, tooltip="The protected items to find the nearest one among."
                ),
                EMBEDDER.Input(
                    "embedder",
                    optional=True,
                    tooltip="A copy-detecting embedder (e.g. DreamSim): the nearest protected item by its cosine "
                    "similarity too.",
                ),
            ],
            outputs=[io.String.Output("certificates", tooltip="One JSON certificate per image, one per line.")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix, **unused) -> bool | str:
        return prefix_problem(filename_prefix) or True

    @classmethod
    def execute(
        cls,
        images: torch.Tensor,
        filename_prefix: str,
        model=None,
        risk: Optional[RiskResult] = None,
        latent: Optional[dict] = None,
        shield_set: Optional[ShieldSet] = None,
        embedder=None,
    ) -> io.NodeOutput:
        problem = prefix_problem(filename_prefix)  # again: a linked prefix is known only now
        if problem is not None:
            raise ValueError(problem)
        prompt = cls.hidden.prompt if cls.hidden is not None else None
        extra_pnginfo = cls.hidden.extra_pnginfo if cls.hidden is not None else None
        certificates = certificates_for(images, model, risk, latent, shield_set, embedder, prompt)
        saved = save_pngs(images, filename_prefix, certificates, prompt, extra_pnginfo)
        text = "\n".join(certificate_text(c, s["filename"]) for c, s in zip(certificates, saved, strict=True))
        lines = "\n".join(certificate_json(c) for c in certificates)
        return io.NodeOutput(lines, ui={"images": saved, "text": [text]})


def certificates_for(images, model, risk, latent, shield_set, embedder, prompt) -> list[dict]:
    batch = int(images.shape[0])
    if risk is not None and risk.batch_size != batch:
        raise ValueError(
            f"Save Image with Shield Certificate: 'risk' scored {risk.batch_size} samples but 'images' holds {batch}; "
            "connect the Memorization Risk node that mirrors the sampler of these images"
        )
    nearest = nearest_protected(images, latent, shield_set, embedder, model)
    records = []
    for patch_id in shield_patch_ids(model) if model is not None else []:
        record = RECORDS.latest(patch_id=patch_id)
        if record is not None:
            node_id = node_for_patch(patch_id)
            records.append((record, node_id, node_settings(prompt, node_id)))
    for record, _, _ in records:
        if record.steps and record.sample_count() != batch:
            raise ValueError(
                f"Save Image with Shield Certificate: the newest {record.kind} run on 'model' sampled "
                f"{record.sample_count()} samples but 'images' holds {batch}; connect the model and images of one run"
            )
    return [
        build_certificate(
            index=index,
            batch=batch,
            version=__version__,
            risk=risk_entry(risk, index),
            nearest=nearest[index] if nearest else None,
            shields=[shield_entry(record, index, node_id, settings) for record, node_id, settings in records],
        )
        for index in range(batch)
    ]


def risk_entry(risk: Optional[RiskResult], index: int) -> Optional[dict]:
    if risk is None:
        return None
    return {
        "score": risk.scores[index],
        "statistic": risk.statistic,
        "at_risk": risk.flagged[index],
        "threshold": risk.threshold,
        "flag_rule": risk.flag_rule,
        "batch_mean": risk.batch_mean if risk.per_prompt else None,
        "probe_steps": len(risk.sigmas),
        "model_evaluations": risk.model_evaluations,
        "seed": risk.seed,
    }


def nearest_protected(images, latent, shield_set, embedder, model) -> Optional[list[dict]]:
    """Per image: the nearest shield by latent L2 and by the embedder (the Shield Report's measurement)."""
    if shield_set is None or len(shield_set) == 0:
        return None
    report = build_report(images, latent, shield_set, embedder, 0.0, 0.0, False, model)
    entries = []
    for index in range(report.count):
        entry: dict = {"latent_l2": None, "embedder": None}
        if report.l2_distance is not None:
            entry["latent_l2"] = {
                "item": report.names[index],
                "distance": float(report.l2_distance[index]),
                "space": "model" if model is not None else "latent",
            }
        if report.cosine is not None:
            entry["embedder"] = {
                "item": report.cosine_names[index],
                "similarity": float(report.cosine[index]),
                "embedder": report.embedder_key,
            }
            copy_threshold = getattr(embedder, "copy_threshold", None)  # a copy detector's own verdict
            if copy_threshold is not None:
                entry["embedder"]["copy"] = bool(report.cosine[index] >= copy_threshold)
        entries.append(entry)
    return entries


PREFIX = "Save Image with Shield Certificate: filename_prefix"
COUNTER_SUFFIX = "_00001_.png"  # what the files' names add to the prefix (Save Image's counter)


def prefix_problem(filename_prefix: str) -> Optional[str]:
    """Why the prefix cannot name files inside ComfyUI's output directory, or None: the pack's path rule
    (core/paths.py) at /prompt, where core would refuse '..' only at run time and a NUL or an over-long
    name gave a raw OS error."""
    try:
        paths.real_path_inside(
            pathlib.Path(folder_paths.get_output_directory()),
            filename_prefix + COUNTER_SUFFIX,
            PREFIX,
            "a prefix such as 'shield' or 'my_folder/shield'",
            "ComfyUI's output directory",
        )
    except ShieldSetError as error:
        return str(error)
    return None


def save_pngs(images, filename_prefix, certificates, prompt, extra_pnginfo) -> list[dict]:
    """Save Image's files and metadata, plus the certificate chunk."""
    output_dir = folder_paths.get_output_directory()
    try:  # it creates the prefix's sub-folder
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, output_dir, images[0].shape[1], images[0].shape[0]
        )
    except OSError as error:
        path = pathlib.Path(output_dir, filename_prefix)
        raise ShieldSetError(paths.explain_write_error(error, PREFIX, path, "the filename_prefix input")) from error
    saved = []
    for index, (image, certificate) in enumerate(zip(images, certificates, strict=True)):
        pixels = np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8)
        metadata = PngInfo()
        if not comfy_args.disable_metadata:
            if prompt is not None:
                metadata.add_text("prompt", json.dumps(prompt))
            for key, value in (extra_pnginfo or {}).items():
                metadata.add_text(key, json.dumps(value))
        metadata.add_text(CHUNK, certificate_json(certificate))
        name = f"{filename.replace('%batch_num%', str(index))}_{counter + index:05}_.png"
        path = os.path.join(folder, name)
        try:
            Image.fromarray(pixels).save(path, pnginfo=metadata, compress_level=4)
        except OSError as error:
            raise ShieldSetError(
                paths.explain_write_error(error, PREFIX, pathlib.Path(path), "the filename_prefix input")
            ) from error
        saved.append({"filename": name, "subfolder": subfolder, "type": "output"})
    return saved


CERTIFICATE_NODES = [ShieldSaveImageWithCertificate]
