"""The pack's methods, one line each, in the order the Report and the benches show them.

Registering a method's record here is what makes the Report, the frontend run summary and the benches
show its runs (core/records.py); adding a method is one file trio plus one line in METHODS
(docs/adding_a_method.md).
"""

from ..core.records import register_method
from .embedding_spell_hook import EmbeddingRepellencyPatch
from .procreate_hook import ProCreateGuidance
from .redraw_hook import EarlyCopyRedrawPatch
from .spell_hook import SparseRepellencyPatch
from .transition_hook import TransitionCfgPatch

METHODS = (
    SparseRepellencyPatch,
    EmbeddingRepellencyPatch,
    EarlyCopyRedrawPatch,
    TransitionCfgPatch,
    ProCreateGuidance,
)

for _method in METHODS:
    register_method(_method.method)
