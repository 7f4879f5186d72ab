"""Per-run records that the patches keep for the Shield Report node, the frontend and the tests.

A patch creates one RunRecord at the start of each sampling run (never reusing the previous run's),
appends one entry per step, and the record lands in a process-wide book that keeps the newest runs.
Plain Python and torch; nothing here imports ComfyUI.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

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
        self._listeners: list[Callable[[RunRecord], None]] = []

    def add_listener(self, listener: Callable[[RunRecord], None]) -> None:
        """Call `listener(record)` whenever a run finishes (e.g. to tell the frontend); added once."""
        with self._lock:
            if listener not in self._listeners:
                self._listeners.append(listener)

    def finish(self, record: RunRecord) -> None:
        """Mark a run finished and tell the listeners; a failing listener is logged, never raised."""
        record.finished = True
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # a display problem must not fail the sampling run
                logger.exception("Shield: run-record listener %r failed", listener)

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


def _touched_per_step(record: RunRecord) -> list[set[int]]:
    """Per step, the samples the patch changed; each method records it in its own words."""
    touched = []
    for step in record.steps:
        if "touched" in step:  # sparse repellency: indices of the samples it moved
            touched.append(set(step["touched"]))
        elif "switched" in step:  # transition-point CFG: samples still before their transition
            touched.append({i for i, switched in enumerate(step["switched"]) if not switched})
        elif "active" in step and isinstance(step["active"], list):  # ProCreate: samples it guided
            touched.append({i for i, active in enumerate(step["active"]) if active})
        else:
            touched.append(set())
    return touched


def touched_summary(record: RunRecord) -> dict[str, Any]:
    """How many samples and steps one run of a patch touched (changed), for the frontend and reports."""
    touched = _touched_per_step(record)
    samples = max((len(step.get("sigma", [])) for step in record.steps), default=0)
    return {
        "kind": record.kind,
        "label": record.label,
        "samples": samples,
        "samples_touched": len(set().union(*touched)) if touched else 0,
        "steps": len(record.steps),
        "steps_touched": sum(1 for step in touched if step),
    }


RECORDS = RecordBook()
