"""Per-run records of the methods, typed per method, and the registry that the Report, the frontend
run summary and the benches read them through.

Each method (SPELL, Transition-Point CFG, ProCreate, and any later one) registers one `MethodRecord`
beside its hook: the TypedDict of one step entry, the TypedDict of its summary, a chart panel and
optional report lines. Readers loop over `registered_methods()` and never name a method, so a new
method shows up in the Report and the frontend without edits there (docs/adding_a_method.md).

A patch creates one RunRecord at the start of each sampling run (never reusing the previous run's),
appends one entry per model evaluation, and the record lands in a process-wide book that keeps the
newest runs. A registered method's entries are checked against its TypedDict when they are added, so
a reader can never wait for a field that no method writes. Plain Python and torch; no ComfyUI import.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Mapping, Optional, Union

from typing_extensions import TypedDict

logger = logging.getLogger(__name__)

_run_counter = itertools.count(1)


# -- what every step and every method's record holds ------------------------------------------------
class StepEntry(TypedDict):
    """The fields every method records at every model evaluation; a method's own fields come beside.

    Convention for every step TypedDict: a `list` field holds one value per sample of the batch
    (so the Report can draw it as a [steps x samples] matrix); other fields are per step.

    sigma: the evaluation's sigma, per sample.
    in_window: the evaluation lies inside the method's active window (start/end percent).
    touched: per sample, whether the method changed that sample's prediction at this evaluation.
    """

    sigma: list[float]
    in_window: bool
    touched: list[bool]


@dataclasses.dataclass(frozen=True)
class Heatmap:
    """A chart panel: one per-sample step field as a [samples x steps] colour map."""

    value: str
    label: str


@dataclasses.dataclass(frozen=True)
class Curves:
    """A chart panel: one line per sample of a per-sample step field over the steps.

    markers "touched": a dot at every step where the method touched the sample; "last_touched": a
    circle at the first step after the sample's last touched step (Transition-Point CFG: where
    normal CFG starts).
    """

    value: str
    label: str
    markers: str = "touched"
    marker_label: str = "dot: touched"


ChartPanel = Union[Heatmap, Curves]


@dataclasses.dataclass(frozen=True)
class MethodRecord:
    """What one method records and how the readers show it.

    kind: the record kind (stable: tests, stored reports and the frontend use it).
    title: the method's name in the Report, the frontend run summary and the benches.
    step: the TypedDict of one step entry (a subclass of StepEntry).
    summary: the TypedDict of the summary written when a run ends.
    chart: the Report's chart panel for this method (None: text only).
    describe: extra Report lines from the run's curves (core/report.MethodCurves); None: only the
        generic lines (steps recorded, touched samples and steps).
    headline: summary fields shown after "N steps recorded" (e.g. ProCreate's reference count).
    """

    kind: str
    title: str
    step: type
    summary: type
    chart: Optional[ChartPanel] = None
    describe: Optional[Callable[[Any], list[str]]] = None
    headline: tuple[str, ...] = ()

    def per_sample_fields(self) -> list[str]:
        """The step fields that hold one value per sample (list annotations), `sigma` first."""
        return [name for name, hint in _annotations(self.step).items() if _is_list(hint)]

    def check_step(self, entry: Mapping[str, Any]) -> None:
        _check_keys(self.step, entry, f"{self.title} step record")

    def check_summary(self, summary: Mapping[str, Any]) -> None:
        _check_keys(self.summary, summary, f"{self.title} run summary")


def _annotations(typed_dict: type) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    for klass in reversed(typed_dict.__mro__):
        hints.update(getattr(klass, "__annotations__", {}))
    return hints


def _is_list(hint: Any) -> bool:
    """Whether an annotation is a list (also when it is a string: `from __future__ import annotations`)."""
    text = getattr(hint, "__forward_arg__", hint)
    text = text if isinstance(text, str) else repr(text)
    for prefix in ("typing_extensions.", "typing.", "NotRequired[", "Required["):
        text = text.replace(prefix, "")
    return text.lower().startswith("list[")


def _check_keys(typed_dict: type, entry: Mapping[str, Any], what: str) -> None:
    required = set(typed_dict.__required_keys__)
    allowed = required | set(typed_dict.__optional_keys__)
    missing, unknown = required - set(entry), set(entry) - allowed
    if missing or unknown:
        raise KeyError(
            f"{what}: fields {sorted(missing)} missing and {sorted(unknown)} not declared in "
            f"{typed_dict.__name__}; declare a field in the method's record TypedDict before writing it"
        )


_METHODS: dict[str, MethodRecord] = {}


def register_method(method: MethodRecord) -> MethodRecord:
    """Add a method to the registry (once per kind; registering the same record again is a no-op)."""
    if not issubclass(method.step, dict) or "touched" not in _annotations(method.step):
        raise TypeError(f"{method.kind}: the step type must be a TypedDict that extends StepEntry")
    existing = _METHODS.get(method.kind)
    if existing is not None and existing != method:
        raise ValueError(f"a method of kind {method.kind!r} is already registered ({existing.title})")
    _METHODS[method.kind] = method
    return method


def unregister_method(kind: str) -> None:
    """Remove a method (tests register toy methods and remove them again)."""
    _METHODS.pop(kind, None)


def registered_methods() -> list[MethodRecord]:
    return list(_METHODS.values())


def method_record(kind: str) -> Optional[MethodRecord]:
    return _METHODS.get(kind)


# -- one run and the book of runs -------------------------------------------------------------------
@dataclasses.dataclass
class RunRecord:
    """What one patch did during one sampling run.

    kind: which method (a registered MethodRecord's kind; unregistered kinds are kept unchecked).
    patch_id: identifies the patch instance (one node execution), so two patches on one model keep
        separate records.
    steps: one entry per model evaluation, in order (the method's step TypedDict).
    summary: totals the method writes when the run ends (the method's summary TypedDict).
    """

    kind: str
    patch_id: str
    label: str = ""
    run_number: int = dataclasses.field(default_factory=lambda: next(_run_counter))
    started: float = dataclasses.field(default_factory=time.time)
    steps: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    finished: bool = False

    @property
    def method(self) -> Optional[MethodRecord]:
        return method_record(self.kind)

    def add_step(self, **entry: Any) -> None:
        method = self.method
        if method is not None:
            method.check_step(entry)
        self.steps.append(entry)

    def set_summary(self, **summary: Any) -> None:
        method = self.method
        if method is not None:
            method.check_summary(summary)
        self.summary.update(summary)

    def touched_matrix(self) -> list[list[bool]]:
        """Per step, per sample: did the method change that sample's prediction (samples padded False)."""
        samples = self.sample_count()
        return [list(step["touched"]) + [False] * (samples - len(step["touched"])) for step in self.steps]

    def sample_count(self) -> int:
        return max((len(step.get("sigma", ())) for step in self.steps), default=0)

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


def touched_summary(record: RunRecord) -> dict[str, Any]:
    """How many samples and steps one run of a patch touched (changed), for the frontend and reports."""
    touched = record.touched_matrix()
    method = record.method
    return {
        "kind": record.kind,
        "title": method.title if method is not None else record.kind,
        "label": record.label,
        "samples": record.sample_count(),
        "samples_touched": sum(1 for column in zip(*touched, strict=True) if any(column)) if touched else 0,
        "steps": len(record.steps),
        "steps_touched": sum(1 for row in touched if any(row)),
        "note": str(record.summary.get("note", "")),
    }


RECORDS = RecordBook()
