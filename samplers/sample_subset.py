"""Sampling some samples of a batch on their own: Early Copy Redraw probes only the samples still heading
into a shield, so a look-ahead costs the mean number of checks per sample instead of the largest.

A sub-batch follows the same trajectories as the whole batch only when nothing in the run draws noise for
the batch or depends on its size. `subset_sampling` checks that and returns None otherwise (the caller then
probes the whole batch, which is always exact):
- the sampler draws no noise (ancestral and SDE samplers draw it for the whole batch from the seed, so a
  sample's noise depends on the rows around it), checked by name against NOISELESS_SAMPLERS;
- every conditioning tensor is one row for the batch or one row per sample (then sliced); ControlNet and
  GLIGEN conditioning, per-sample masks and Shield gates (a gate answers for the whole batch) are not sliced;
- no Shield method on the model mixes samples (`intra_batch`: method_patch.MIXES_SAMPLES_KEY). Other packs'
  patches that mix the samples of a batch are not detected.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import comfy.conds
import comfy.samplers
import torch

from .method_patch import MIXES_SAMPLES_KEY, MODEL_GATES_KEY

# k-diffusion sampler functions that draw no noise with their default options (s_churn = 0)
NOISELESS_SAMPLERS = frozenset(
    f"sample_{name}"
    for name in (
        "euler", "heun", "heunpp2", "dpm_2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "res_multistep",
        "gradient_estimation", "euler_cfg_pp", "dpmpp_2m_cfg_pp", "res_multistep_cfg_pp", "unipc", "unipc_bh2",
    )
)  # fmt: skip
_UNSLICED_CONDITIONING = ("control", "gligen")


def draws_no_noise(sampler) -> bool:
    """True for a KSAMPLER whose function is known to draw no noise, with no noise-drawing option set."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        return False
    name = getattr(sampler.sampler_function, "__name__", "")
    options = sampler.extra_options or {}
    return name in NOISELESS_SAMPLERS and not options.get("s_churn") and not sampler.inpaint_options.get("random")


def subset_sampling(sampler, guider, model_options: dict, batch: int, latent_image, denoise_mask) -> bool:
    """Whether a sub-batch of this run samples its rows as the whole batch would (module doc)."""
    if not draws_no_noise(sampler) or model_options.get(MODEL_GATES_KEY) or model_options.get(MIXES_SAMPLES_KEY):
        return False
    if any(not _sliceable(tensor, batch) for tensor in (latent_image, denoise_mask) if tensor is not None):
        return False
    conds = getattr(guider, "conds", None)
    return isinstance(conds, dict) and _slice_conds(conds, torch.arange(batch), batch) is not None


@contextlib.contextmanager
def rows_of(guider, rows: torch.Tensor, batch: int) -> Iterator[None]:
    """Inside the block the guider's conditioning holds only `rows` (after `subset_sampling` said yes)."""
    whole = guider.conds
    guider.conds = _slice_conds(whole, rows, batch)
    try:
        yield
    finally:
        guider.conds = whole


def take_rows(tensor: Optional[torch.Tensor], rows: torch.Tensor) -> Optional[torch.Tensor]:
    """`rows` of a per-sample tensor; a one-row (or absent) tensor is shared by every sub-batch as it is."""
    if tensor is None or tensor.shape[0] == 1:
        return tensor
    return tensor[rows.to(tensor.device)]


def _sliceable(tensor: torch.Tensor, batch: int) -> bool:
    return isinstance(tensor, torch.Tensor) and tensor.shape[0] in (1, batch)


def _slice_conds(conds: dict, rows: torch.Tensor, batch: int) -> Optional[dict]:
    sliced = {}
    for kind, entries in conds.items():
        sliced[kind] = []
        for entry in entries:
            if any(entry.get(key) is not None for key in _UNSLICED_CONDITIONING):
                return None
            mask = entry.get("mask")
            if mask is not None and mask.ndim > 2 and mask.shape[0] != 1:
                return None
            model_conds = {}
            for name, value in entry.get("model_conds", {}).items():
                model_conds[name] = _slice_model_cond(value, rows, batch)
                if model_conds[name] is None:
                    return None
            sliced[kind].append({**entry, "model_conds": model_conds})
    return sliced


def _slice_model_cond(value, rows: torch.Tensor, batch: int):
    if isinstance(value, comfy.conds.CONDConstant):
        return value
    tensor = getattr(value, "cond", None)
    if not isinstance(value, comfy.conds.CONDRegular) or not _sliceable(tensor, batch):
        return None
    return value if tensor.shape[0] == 1 else value._copy_with(tensor[rows.to(tensor.device)])
