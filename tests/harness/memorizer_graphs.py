"""Pieces of API-format graphs around the memorizer model that several server tests share."""

from __future__ import annotations


def sparse_repellency(model: list, shield_set: list, radius: float, **overrides) -> dict:
    """A Sparse Repellency node with the paper's overcompensation over the whole schedule."""
    inputs = {
        "model": model,
        "shield_set": shield_set,
        "radius": radius,
        "radius_unit": "absolute",
        "overcompensation": 1.6,
        "intra_batch": True,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "search": "auto",
    }
    return {"class_type": "ShieldSparseRepellency", "inputs": {**inputs, **overrides}}
