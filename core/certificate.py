"""The per-output Shield certificate: what the pack knows about one saved image, as JSON in its PNG.

It is written as a PNG text chunk named `shield_certificate`, beside the `prompt` and `workflow` chunks
ComfyUI's Save Image writes, so any PNG reader gets it back (`read_certificate(path)`, or with PIL:
`json.loads(Image.open(path).text["shield_certificate"])`). Fields (format CERTIFICATE_FORMAT):

- pack, version: "Shield" and version.py's __version__.
- image: this output's index in its batch, and the batch size.
- risk: the Memorization Risk score of this sample, whether it was flagged, the threshold, the flag rule
  ("per sample", or "per prompt (batch mean)" with the batch's mean score that was compared with the
  threshold), the probe's steps and model evaluations, the seed (null when no risk was connected).
- nearest_protected: the nearest protected item by latent L2 (in the model's space when the model is
  known; distance and item name) and by the embedder's cosine similarity when an embedder was
  connected (null when no shield set was connected).
- shields: one entry per Shield method patch on the model, from its newest run record: method, title,
  label, the graph node that made it and that node's settings (its widget values in the prompt),
  whether it fired on this sample (changed its prediction at any evaluation), at which evaluations
  (indices in the run record) and sigmas, how many evaluations the run had, and for Transition-Point
  CFG the run's own risk score of this sample.

Plain Python, torch-free (the node gathers the pieces).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from .records import RunRecord

CHUNK = "shield_certificate"
CERTIFICATE_FORMAT = 1


def shield_entry(record: RunRecord, sample: int, node_id: Optional[str], settings: dict) -> dict[str, Any]:
    """What one method patch did to one sample in its newest run."""
    method = record.method
    fired_at = [index for index, step in enumerate(record.steps) if _touched(step, sample)]
    entry = {
        "method": record.kind,
        "title": method.title if method is not None else record.kind,
        "label": record.label,
        "node": node_id,
        "settings": settings,
        "fired": bool(fired_at),
        "steps": fired_at,
        "sigmas": [float(record.steps[index]["sigma"][sample]) for index in fired_at],
        "evaluations": len(record.steps),
        "run": record.run_number,
    }
    risk_scores = record.summary.get("risk_score")
    if isinstance(risk_scores, list) and sample < len(risk_scores):
        entry["risk_score"] = risk_scores[sample]
    return entry


def _touched(step: dict, sample: int) -> bool:
    touched = step.get("touched", ())
    return sample < len(touched) and bool(touched[sample])


def node_settings(prompt: Optional[dict], node_id: Optional[str]) -> dict[str, Any]:
    """A graph node's widget values from the prompt (links to other nodes left out)."""
    node = (prompt or {}).get(str(node_id)) if node_id is not None else None
    inputs = node.get("inputs", {}) if isinstance(node, dict) else {}
    return {name: value for name, value in inputs.items() if not isinstance(value, list)}


def build_certificate(
    *,
    index: int,
    batch: int,
    version: str,
    risk: Optional[dict],
    nearest: Optional[dict],
    shields: list[dict],
) -> dict[str, Any]:
    return {
        "format": CERTIFICATE_FORMAT,
        "pack": "Shield",
        "version": version,
        "image": {"index": index, "batch_size": batch},
        "risk": risk,
        "nearest_protected": nearest,
        "shields": shields,
    }


def certificate_text(certificate: dict[str, Any], file_name: str = "") -> str:
    """A few lines for the node in the frontend."""
    image = certificate["image"]
    lines = [f"image {image['index'] + 1}/{image['batch_size']}{': ' + file_name if file_name else ''}"]
    risk = certificate.get("risk")
    if risk:
        flag = "AT RISK" if risk["at_risk"] else "not flagged"
        rule = f"threshold {risk['threshold']:g}"
        if risk.get("batch_mean") is not None:  # flag rule "per prompt (batch mean)"
            rule = f"batch mean {risk['batch_mean']:.4g}, per-prompt {rule}"
            flag += " per prompt:"
        else:
            flag += ","
        lines.append(f"  risk {risk['score']:.4g} ({flag} {rule})")
    nearest = certificate.get("nearest_protected") or {}
    if nearest.get("latent_l2"):
        lines.append(
            f"  nearest protected (latent L2): {nearest['latent_l2']['item']} at {nearest['latent_l2']['distance']:.4g}"
        )
    if nearest.get("embedder"):
        embedder = nearest["embedder"]
        lines.append(
            f"  nearest protected ({embedder['embedder']}): {embedder['item']}, cosine {embedder['similarity']:.3f}"
        )
    for shield in certificate.get("shields", []):
        where = (
            f"fired at {len(shield['steps'])}/{shield['evaluations']} evaluations"
            if shield["fired"]
            else "did not fire"
        )
        lines.append(f"  {shield['title']}: {where}")
    if not certificate.get("shields"):
        lines.append("  no Shield method on the model (or no 'model' connected)")
    return "\n".join(lines)


def certificate_json(certificate: dict[str, Any]) -> str:
    return json.dumps(certificate, sort_keys=True)


def read_certificate(path) -> dict[str, Any]:
    """The certificate stored in a PNG written by Save Image with Shield Certificate."""
    from PIL import Image

    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
        if CHUNK not in text:
            raise ValueError(f"{path}: no '{CHUNK}' chunk (not saved by Save Image with Shield Certificate)")
        return json.loads(text[CHUNK])
