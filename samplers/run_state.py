"""Fresh state for every sampling run, through ComfyUI's keyed OUTER_SAMPLE wrapper.

A patch's hooks (pre/post-CFG functions) are closures shared by every run of the patched model and
by every clone of it. State that lives across steps must therefore be created at the start of each
run and dropped at its end, never guessed from sigma going up. `attach_run_state` installs a keyed,
idempotent wrapper that does exactly that; the hooks read `holder.current`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Generic, Optional, TypeVar

import comfy.patcher_extension
import torch

State = TypeVar("State")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What a new run's state may depend on: the guider running it and its sigma schedule."""

    guider: Any
    sigmas: torch.Tensor
    noise_shape: tuple[int, ...]


class RunStateHolder(Generic[State]):
    """Holds the state of the run in progress; None outside a run."""

    def __init__(self, factory: Callable[[RunContext], State], on_finish: Optional[Callable[[State], None]] = None):
        self.factory = factory
        self.on_finish = on_finish
        self.current: Optional[State] = None
        self.context: Optional[RunContext] = None  # the context the current run was started with

    def outer_sample_wrapper(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        previous = self.current, self.context  # a nested run (a guider inside a guider) restores the outer state
        self.context = RunContext(executor.class_obj, sigmas, tuple(noise.shape))
        self.current = self.factory(self.context)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            finished = self.current
            self.current, self.context = previous
            if self.on_finish is not None:
                self.on_finish(finished)


def attach_run_state(model_patcher, key: str, holder: RunStateHolder) -> None:
    """Install `holder` on a (cloned) model; re-attaching under the same key replaces, never stacks."""
    wrapper_type = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    model_patcher.remove_wrappers_with_key(wrapper_type, key)
    model_patcher.add_wrapper_with_key(wrapper_type, key, holder.outer_sample_wrapper)
