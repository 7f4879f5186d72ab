"""Progress for long loops over a shield set (an index build, a large set's first finite check): a
ComfyUI progress bar that also honours the Stop button between chunks."""

from __future__ import annotations

from typing import Callable

import comfy.model_management
import comfy.utils


def progress_reporter() -> Callable[[int, int], None]:
    """An `on_chunk(done, total)` callback: raises if the user pressed Stop, else moves a progress bar
    (made at the first call, when the total is known)."""
    progress = None

    def on_chunk(done: int, total: int) -> None:
        nonlocal progress
        comfy.model_management.throw_exception_if_processing_interrupted()
        if progress is None:
            progress = comfy.utils.ProgressBar(total)
        progress.update_absolute(done, total)

    return on_chunk
