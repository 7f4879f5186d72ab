"""The method contract: what SPELL, Transition-Point CFG, ProCreate (and any later method) share.

A method is a `MethodPatch` subclass that supplies three things:
- its settings (a frozen dataclass; `start_percent`/`end_percent` fields, when present, are the
  active window),
- its step: `step(run, args)`, the body of ComfyUI's post-CFG (or pre-CFG) list hook, which records
  one entry per model evaluation with `run.record.add_step(...)` (the method's step TypedDict),
- its summary: `summarize(run)`, the fields of its summary TypedDict, written when the run ends,
and `new_run(record, context)`, the per-run state (a `MethodRun` subclass).

The base owns the rest: the patch id, clone-and-attach (a list hook through a plain closure, never a
single-slot hook), the keyed per-run state holder (run_state.py) that starts and finishes the run's
record, the window in sigma, the Shield Memory output (the one place a patch writes to a memory:
`remember_outputs`), and the per-sample gate (`add_sample_gate`: act on these samples only).
Node-side conventions (validation, "off" returns the input model, category, display name) are in
nodes/method_node.py. How to add a method: docs/adding_a_method.md.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Callable, ClassVar, Generic, Optional, TypeVar

import comfy.patcher_extension
import torch

from ..core.records import RECORDS, MethodRecord, RunRecord
from ..core.shield_memory import MEMORY
from ..core.shield_set import ShieldSet, latent_format_name
from .run_state import RunContext, RunStateHolder, attach_run_state

Settings = TypeVar("Settings")
Run = TypeVar("Run", bound="MethodRun")

# A gate decides, from the hook's args (both hooks carry "input" and "sigma"), which samples of the
# batch the method may act on: a bool tensor [B] (True = act), or None for all of them.
SampleGate = Callable[[dict], Optional[torch.Tensor]]
# Gates that apply to every Shield method on a model (the Shield Gate node puts them there): a list in
# the model's options, read from the hook's args["model_options"] at every evaluation, so the gate node
# may sit anywhere on the model path, before or after the method nodes.
MODEL_GATES_KEY = "shield_sample_gates"
HOOK_NAME = "shield_hook"  # the name of every method's list hook (without_shield_patches finds them by it)
RUN_STATE_PREFIX = "shield_"  # OUTER_SAMPLE wrapper keys: run state "shield_<patch id>", memory "shield_memory_<id>"
MEMORY_WRAPPER_PREFIX = "shield_memory_"
# A probe is a partial sampling run that a method starts inside the real one to look ahead (Early Copy Redraw
# runs the first steps of a batch to see where it is heading). Its evaluations carry this key in their
# model_options: every method then acts as in a fresh run of its own (so the probe sees what the real run
# will do) and records nothing (so the run's record lists only the real run's evaluations).
PROBE_KEY = "shield_probe"


# The samples whose starting noise a look-ahead replaced (Early Copy Redraw), in the model_options of its
# probes and of the real run: a gate that checks the sampler's starting noise (the Memorization Risk gate)
# skips them.
NEW_START_KEY = "shield_new_start_samples"
# Set in a model's options by a method whose step on a sample depends on the other samples of the batch
# (`intra_batch` on): a look-ahead then probes the whole batch, never a part of it (samplers/sample_subset.py).
MIXES_SAMPLES_KEY = "shield_mixes_samples"


def probe_options(model_options: dict, probe: int, new_starts: tuple[int, ...] = ()) -> dict:
    """A copy of a run's model_options that marks evaluations as belonging to probe number `probe`."""
    return {**model_options, PROBE_KEY: probe, NEW_START_KEY: new_starts}


def new_start_samples(args: dict) -> tuple[int, ...]:
    """The samples of this evaluation that start from a noise a look-ahead chose (NEW_START_KEY)."""
    return tuple((args.get("model_options") or {}).get(NEW_START_KEY, ()))


@dataclasses.dataclass
class MethodRun:
    """The state of one sampling run that every method has; a method's run state extends it.

    sigma_start/sigma_end: the active window in sigma, read from the sampling model at the first
    evaluation (so a model-sampling patch placed after ours, such as a shift, is taken into account).
    """

    record: RunRecord
    sigma_start: Optional[float] = None
    sigma_end: Optional[float] = None


def remember_outputs(memory_id: str, latent_format: str, latents: torch.Tensor) -> None:
    """Add a run's final latents (LATENT space) to a Shield Memory: the one write path of every method."""
    MEMORY.append(memory_id, latent_format, latents)


def read_memory(memory_id: str) -> ShieldSet:
    """A Shield Memory as it is now: the one read path of every method."""
    return MEMORY.snapshot(memory_id)


def memory_id_of(shield_set: ShieldSet) -> str:
    """The memory a shield set comes from ("" for a set that is not a Shield Memory)."""
    return str(shield_set.settings.get("shield_memory_id", ""))


def window_problem(title: str, start_percent: float, end_percent: float) -> Optional[str]:
    """The one check of a method's active window (0 <= start_percent <= end_percent <= 1), for its settings
    and its node; None when the window is valid."""
    if start_percent > end_percent:
        return f"{title}: start_percent ({start_percent}) must not exceed end_percent ({end_percent})"
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        return f"{title}: start_percent and end_percent must lie in [0, 1], got {start_percent} and {end_percent}"
    return None


class MethodPatch(Generic[Settings, Run]):
    """One node execution of a method: settings, hooks, per-run state, records and memory output."""

    method: ClassVar[MethodRecord]  # the registered record schema: kind and title
    hook_point: ClassVar[str] = "post_cfg"  # or "pre_cfg"
    disable_cfg1_optimization: ClassVar[bool] = False  # True when the step needs the uncond prediction

    def __init__(self, settings: Settings, label: str = "", patch_id: Optional[str] = None):
        self.settings = settings
        self.label = label
        self.patch_id = patch_id or f"{self.method.kind}-{uuid.uuid4().hex[:12]}"
        self.holder: RunStateHolder[Run] = RunStateHolder(self._start_run, self._finish_run)
        self.latent_format = ""
        self.sample_gates: list[SampleGate] = []
        self._probe: Optional[tuple[int, Run]] = None  # (probe number, its state): see PROBE_KEY

    # -- what each method supplies ----------------------------------------------------------------
    def new_run(self, record: RunRecord, context: Optional[RunContext]) -> Run:
        raise NotImplementedError

    def step(self, run: Run, args: dict) -> Any:
        """The hook body: returns the new denoised (post-CFG) or the new conds_out (pre-CFG)."""
        raise NotImplementedError

    def summarize(self, run: Run) -> dict:
        raise NotImplementedError

    def check_model(self, model_patcher) -> None:
        """Raise a clear error when the model cannot be patched with these inputs (optional)."""

    def memory_ids(self) -> list[str]:
        """The Shield Memories this patch adds its final outputs to (optional)."""
        return []

    def finish_run(self, run: Run) -> None:
        """Free what the run held once its record is finished (optional)."""

    # -- attaching --------------------------------------------------------------------------------
    def patch(self, model_patcher):
        """A patched clone; the input model is left as it was."""
        model = model_patcher.clone()
        self.attach(model)
        return model

    def attach(self, model_patcher) -> None:
        """Patch a (cloned) ModelPatcher in place: a list hook, the run-state wrapper, the memory wrapper."""
        self.check_model(model_patcher)
        self.latent_format = latent_format_name(model_patcher)

        # Plain closures, not bound methods: clone() deep-copies model_options, and a deep copy of a
        # bound method copies this object (and its run-state holder), so a patch stacked after this one
        # would leave the hook reading a holder that the OUTER_SAMPLE wrapper never fills.
        def shield_hook(args):
            probe = (args.get("model_options") or {}).get(PROBE_KEY)
            return self.step(self.current_run() if probe is None else self.probe_run(probe), args)

        def shield_memory_wrapper(executor, *args, **kwargs):
            return self._remember(executor(*args, **kwargs))

        if getattr(self.settings, "intra_batch", False):
            model_patcher.model_options[MIXES_SAMPLES_KEY] = True
        if self.hook_point == "pre_cfg":
            model_patcher.set_model_sampler_pre_cfg_function(shield_hook, self.disable_cfg1_optimization)
        else:
            model_patcher.set_model_sampler_post_cfg_function(shield_hook, self.disable_cfg1_optimization)
        attach_run_state(model_patcher, f"{RUN_STATE_PREFIX}{self.patch_id}", self.holder)
        if self.memory_ids():  # outermost-first order does not matter: it only reads the final output
            wrapper_type = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
            key = f"{MEMORY_WRAPPER_PREFIX}{self.patch_id}"
            model_patcher.remove_wrappers_with_key(wrapper_type, key)
            model_patcher.add_wrapper_with_key(wrapper_type, key, shield_memory_wrapper)

    # -- per run ----------------------------------------------------------------------------------
    def _start_run(self, context: Optional[RunContext]) -> Run:
        return self.new_run(RECORDS.start(self.method.kind, self.patch_id, self.label), context)

    def _finish_run(self, run: Run) -> None:
        self._probe = None
        run.record.set_summary(**self.summarize(run))
        RECORDS.finish(run.record)
        self.finish_run(run)

    def current_run(self) -> Run:
        """The run in progress; sampled without the OUTER_SAMPLE wrapper, a throwaway run that is kept
        until the next wrapped run starts (its record is never finished)."""
        if self.holder.current is None:
            self.holder.current = self._start_run(None)
        return self.holder.current

    def probe_run(self, probe: int) -> Run:
        """Fresh state for probe number `probe` of the run in progress, with a record that is never kept."""
        if self._probe is None or self._probe[0] != probe:
            record = RunRecord(kind=self.method.kind, patch_id=self.patch_id, label=self.label)
            self._probe = (probe, self.new_run(record, self.holder.context))
        return self._probe[1]

    def _remember(self, output):
        if isinstance(output, torch.Tensor) and not output.is_nested:
            latents = output.detach().to("cpu", torch.float32)
            for memory_id in self.memory_ids():
                remember_outputs(memory_id, self.latent_format, latents)
        return output

    # -- shared pieces of a step --------------------------------------------------------------------
    def in_window(self, run: Run, model, sigma: float) -> bool:
        """Whether `sigma` lies in [sigma(end_percent), sigma(start_percent)] (settings without a window:
        always)."""
        if run.sigma_start is None:
            sampling = model.model_sampling
            run.sigma_start = float(sampling.percent_to_sigma(getattr(self.settings, "start_percent", 0.0)))
            run.sigma_end = float(sampling.percent_to_sigma(getattr(self.settings, "end_percent", 1.0)))
        return run.sigma_end <= sigma <= run.sigma_start

    def add_sample_gate(self, gate: SampleGate) -> None:
        """Act only on the samples that every gate lets through (e.g. a memorization-risk score)."""
        self.sample_gates.append(gate)

    def acting_samples(self, args: dict, batch: int) -> Optional[torch.Tensor]:
        """bool [B] of the samples the method may act on at this evaluation (this patch's gates and the
        model's, MODEL_GATES_KEY); None: all of them."""
        mask = None
        model_gates = (args.get("model_options") or {}).get(MODEL_GATES_KEY, ())
        for gate in [*self.sample_gates, *model_gates]:
            allowed = gate(args)
            if allowed is not None:
                allowed = allowed.reshape(batch).to("cpu", torch.bool)
                mask = allowed if mask is None else mask & allowed
        return mask


# -- the Shield patches on a model (for the risk probe and the certificate) -------------------------------
def shield_patch_ids(model_patcher) -> list[str]:
    """The patch ids of the Shield methods attached to a model, in the order they were attached."""
    wrappers = model_patcher.wrappers.get(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, {})
    return [
        key[len(RUN_STATE_PREFIX) :]
        for key in wrappers
        if key.startswith(RUN_STATE_PREFIX) and not key.startswith(MEMORY_WRAPPER_PREFIX)
    ]


def without_shield_patches(model_patcher):
    """Remove every Shield method's hooks, run-state and memory wrappers and gates from a (cloned)
    ModelPatcher, in place; returns it. Other packs' patches stay."""
    options = model_patcher.model_options
    for key in ("sampler_pre_cfg_function", "sampler_post_cfg_function"):
        if key in options:
            options[key] = [fn for fn in options[key] if getattr(fn, "__name__", "") != HOOK_NAME]
    options.pop(MODEL_GATES_KEY, None)
    options.pop(MIXES_SAMPLES_KEY, None)
    for wrapper_type in (
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE,
        comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE,
    ):
        for key in [k for k in model_patcher.wrappers.get(wrapper_type, {}) if k.startswith(RUN_STATE_PREFIX)]:
            model_patcher.remove_wrappers_with_key(wrapper_type, key)
    return model_patcher


def add_model_gate(model_patcher, gate: SampleGate) -> None:
    """Gate every Shield method on a (cloned) model: they act only on the samples `gate` lets through."""
    options = model_patcher.model_options
    options[MODEL_GATES_KEY] = [*options.get(MODEL_GATES_KEY, ()), gate]
