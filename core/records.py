"""Per-run records that the patches keep for the Shield Report node, the frontend and the tests.

A patch creates one RunRecord at the start of each sampling run (never reusing the previous run's),
appends one entry per step, and the record lands in a process-wide book that keeps the newest runs.
Plain Python and torch; nothing here imports ComfyUI.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
from typing import Any, Optional

_run_counter = itertools.count(1)


@dataclasses.dataclass
class RunRecord:
    """What one patch did during one sampling run.

    kind: which method ("sparse_repellency", "transition_cfg", "procreate").
    patch_id: identifies the patch instance (one node execution), so two patches on one model keep
        separate records.
    steps: one dict per model evaluation step, in order; its keys are the method's own (documented
        where the method records them) and always include "sigma" (a list, one value per sample).
    summary: totals the method writes when the run ends.
    """

    kind: str
    patch_id: str
    label: str = ""
    run_number: int = dataclasses.field(default_factory=lambda: next(_run_counter))
    started: float = dataclasses.field(default_factory=time.time)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    finished: bool = False

    def add_step(self, **entry: Any) -> None:
        self.steps.append(entry)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RecordBook:
    """The newest runs of every patch, bounded so a long-lived server does not grow."""

    def __init__(self, max_runs: int = 256):
        self._runs: collections.deque[RunRecord] = collections.deque(maxlen=max_runs)
        self._lock = threading.Lock()

    def start(self, kind: str, patch_id: str, label: str = "") -> RunRecord:
        record = RunRecord(kind=kind, patch_id=patch_id, label=label)
        with self._lock:
            self._runs.append(record)
        return record

    def runs(self, kind: Optional[str] = None, patch_id: Optional[str] = None) -> list[RunRecord]:
        with self._lock:
            runs = list(self._runs)
        return [r for r in runs if (kind is None or r.kind == kind) and (patch_id is None or r.patch_id == patch_id)]

    def latest(self, kind: Optional[str] = None, patch_id: Optional[str] = None) -> Optional[RunRecord]:
        runs = self.runs(kind, patch_id)
        return runs[-1] if runs else None

    def clear(self) -> None:
        with self._lock:
            self._runs.clear()


RECORDS = RecordBook()
