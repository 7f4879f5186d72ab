"""One validator for every node of the pack, driven by each node's own V3 schema.

ComfyUI 0.3.75 checks a widget's min/max only for nodes without `validate_inputs` (and for none of
their inputs when it takes **kwargs), never checks combo values of V3 nodes, lets JSON NaN and the
string "NaN" into FLOAT inputs, and turns the string "false" into True for BOOLEAN inputs (HOST.md).
So the pack checks every value itself, against what the node declares:

- INT: an integer (an integral float is accepted, a bool is not), within min/max;
- FLOAT: a finite number (not a bool), within min/max;
- BOOLEAN: true or false (not a string, not a number);
- COMBO: one of the options; STRING: a string.

`ShieldNode` is the base of every node of the pack. Its `validate_inputs` runs these checks on the
values the prompt holds (a linked input is not known yet and is skipped), then the node's own
`validate_inputs` for relations between inputs (start <= end, ...) if it defines one. Its `execute`
runs the schema checks on the values it really receives, linked ones included, before the node's code.
Every message names the node, the input and the allowed values.

Core converts INT/FLOAT/BOOLEAN/STRING values (`int()`, `float()`, `bool()`, `str()`) before any node
sees them, which loses "false" vs false, "NaN" vs NaN and null vs "None", and it hands a node None both
for a linked input and for a JSON null. `refuse_wrong_raw_types`, installed as an on-prompt handler of
the server, sees the raw prompt first and replaces a value of the wrong type (null included) with a
`RefusedValue`, whose conversion raises the validator's message (its str() keeps it), so the prompt is
refused with that message.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import numbers
from typing import Any, Callable, Optional

from comfy_api.v0_0_2 import io

logger = logging.getLogger(__name__)


class RefusedValue(str):
    """Stands in for a raw prompt value of the wrong type. Core's int()/float()/bool() of it raises the
    validator's message, so ComfyUI refuses the prompt with that message; it is a str (the raw value's
    repr) so the server can still send the error back as JSON."""

    def __new__(cls, raw: Any, message: str):
        refused = super().__new__(cls, repr(raw))
        refused.raw, refused.message = raw, message
        return refused

    def _refuse(self, *args):
        raise ValueError(self.message)

    __bool__ = __float__ = __int__ = __index__ = _refuse

    def __str__(self) -> str:  # core's str() of a STRING input keeps the refusal
        return self


# -- one value against its schema input -----------------------------------------------------------------
def _limits(socket) -> str:
    low = "-inf" if socket.min is None else f"{socket.min:g}"
    high = "inf" if socket.max is None else f"{socket.max:g}"
    return f"[{low}, {high}]"


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool) and not _fits_float(value):
        return f"a {len(str(abs(value)))}-digit integer"
    return f"{value!r} ({type(value).__name__})" if not isinstance(value, (int, float)) else repr(value)


def _fits_float(value: numbers.Real) -> bool:
    try:
        float(value)
    except OverflowError:  # an integer of hundreds of digits (JSON allows it)
        return False
    return True


def value_problem(socket, value: Any) -> Optional[str]:
    """What is wrong with `value` for this schema input ("'name' must be ..., got ..."), or None."""
    name = socket.id
    if isinstance(value, RefusedValue):
        return value.message
    if isinstance(socket, io.Boolean.Input):
        return None if isinstance(value, bool) else f"'{name}' must be true or false, got {_shown(value)}"
    if isinstance(socket, (io.Int.Input, io.Float.Input)):
        return _number_problem(socket, value)
    if isinstance(socket, io.Combo.Input):
        options = list(socket.options or [])
        if value in options and isinstance(value, type(options[0]) if options else str):
            return None
        shown = options if len(options) <= 20 else f"{len(options)} options, e.g. {options[:5]}"
        why = f" ({socket.tooltip.rstrip('.')})" if socket.tooltip else ""
        return f"'{name}' must be one of {shown}, got {_shown(value)}{why}"
    if isinstance(socket, io.String.Input):
        return None if isinstance(value, str) else f"'{name}' must be text, got {_shown(value)}"
    return None  # sockets (MODEL, LATENT, ...) are checked by ComfyUI's type matching


def _number_problem(socket, value: Any) -> Optional[str]:
    name, integer = socket.id, isinstance(socket, io.Int.Input)
    kind = "an integer" if integer else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"'{name}' must be {kind} in {_limits(socket)}, got {_shown(value)}"
    if not _fits_float(value):
        return f"'{name}' must be in {_limits(socket)}, got {_shown(value)}"
    if not math.isfinite(value):
        return f"'{name}' must be {kind} in {_limits(socket)}, got {value}"
    if integer and not float(value).is_integer():
        return f"'{name}' must be {kind} in {_limits(socket)}, got {value}"
    if (socket.min is not None and value < socket.min) or (socket.max is not None and value > socket.max):
        return f"'{name}' must be in {_limits(socket)}, got {value:g}"
    return None


def widget_inputs(schema: io.Schema) -> dict[str, Any]:
    """The schema's inputs that hold values (numbers, switches, choices, text), by id."""
    kinds = (io.Int.Input, io.Float.Input, io.Boolean.Input, io.Combo.Input, io.String.Input)
    return {socket.id: socket for socket in schema.inputs if isinstance(socket, kinds)}


def schema_problems(schema: io.Schema, values: dict[str, Any]) -> list[str]:
    """Every problem of the given values (None = not known yet: a linked input during validation)."""
    problems = []
    for name, socket in widget_inputs(schema).items():
        value = values.get(name)
        if value is not None:
            problem = value_problem(socket, value)
            if problem is not None:
                problems.append(problem)
    return problems


# -- the base class of every node ------------------------------------------------------------------------
class ShieldNode(io.ComfyNode):
    """A pack node: its inputs are checked against its schema at validation and again at execution.

    A node adds relations between its inputs by defining `validate_inputs` as usual (returning True or
    a message); it runs after the schema checks, skipped when a value it names is linked (None during
    validation). At execution the schema checks run again on the values that arrived (linked ones
    included); relations that involve a linked input are the node's `execute` to check (the method
    nodes do, through their settings).
    """

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return _check(cls, values) or True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own_check = cls.__dict__.get("validate_inputs")
        if own_check is not None and not getattr(own_check.__func__, "_shield_checked", False):
            cls._relations = staticmethod(functools.partial(_call_with_accepted, own_check.__func__))
            cls.validate_inputs = classmethod(_validating(own_check.__func__))
        execute = cls.__dict__.get("execute")
        if execute is not None and not getattr(execute.__func__, "_shield_checked", False):
            cls.execute = classmethod(_executing(execute.__func__))

    _relations: Optional[Callable] = None


def _call_with_accepted(function, klass, values: dict[str, Any]):
    """`function(klass, ...)` with the values its signature accepts (all of them with **kwargs). True
    (nothing to say yet) when a value it names is None: a linked input during validation; the check
    runs again at execution with the value that arrived."""
    parameters = dict(inspect.signature(function).parameters)
    parameters.pop(next(iter(parameters)))  # the class
    named = [name for name, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    if any(name in values and values[name] is None for name in named):
        return True
    if any(name not in values and parameters[name].default is inspect.Parameter.empty for name in named):
        return True  # a required input is missing: ComfyUI says so
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function(klass, **values)
    return function(klass, **{name: value for name, value in values.items() if name in parameters})


def _check(klass, values: dict[str, Any], relations: bool = True) -> Optional[str]:
    """The first problem: the schema's checks, then the node's own relations; None when all is well."""
    schema = klass.define_schema()
    problems = schema_problems(schema, values)
    if problems:
        return f"{schema.display_name}: " + "; ".join(problems)
    if relations and klass._relations is not None:
        answer = klass._relations(klass, values)
        if answer is not True:
            return str(answer) if answer else f"{schema.display_name}: the inputs were refused"
    return None


def _validating(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def validate_inputs(klass, *args, **values):
        if args:  # called directly with positional values (tests); ComfyUI passes keywords
            values = dict(signature.bind_partial(klass, *args, **values).arguments)
            values.pop(next(iter(signature.parameters)))
        return _check(klass, values) or True

    validate_inputs._shield_checked = True
    return validate_inputs


def _executing(function):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def execute(klass, *args, **kwargs):
        values = signature.bind_partial(klass, *args, **kwargs).arguments
        values.pop(next(iter(signature.parameters)))  # the class itself
        message = _check(klass, values, relations=False)
        if message is not None:
            raise ValueError(message)
        return function(klass, *args, **kwargs)

    execute._shield_checked = True
    return execute


# -- raw prompt values, before core converts them --------------------------------------------------------
def refuse_wrong_raw_types(node_classes: dict[str, type]) -> Callable[[dict], dict]:
    """An on-prompt handler: for the pack's nodes, a number or switch of the wrong JSON type (the string
    "NaN" or "abc" for a FLOAT, "false" for a BOOLEAN, 2.5 or true for an INT) becomes a RefusedValue."""

    def handler(json_data: dict) -> dict:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        if not isinstance(prompt, dict):
            return json_data
        for node in prompt.values():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            node_class = node_classes.get(class_type) if isinstance(class_type, str) else None
            if node_class is not None and isinstance(node.get("inputs"), dict):
                _refuse_in(node_class.define_schema(), node["inputs"])
        return json_data

    return handler


def _refuse_in(schema: io.Schema, inputs: dict) -> None:
    for name, socket in widget_inputs(schema).items():
        if name not in inputs:
            continue
        raw = inputs[name]
        if isinstance(raw, dict) and "__value__" in raw:
            raw = raw["__value__"]
        if isinstance(raw, list):  # a link: checked when the linked value arrives (execute)
            continue
        if _wrong_raw_type(socket, raw):
            inputs[name] = RefusedValue(raw, f"{schema.display_name}: {value_problem(socket, raw)}")


def _wrong_raw_type(socket, raw: Any) -> bool:
    """A value core's conversion would change silently ("false" -> True, "NaN" -> nan, 2.5 -> 2, null ->
    "None"), or that core would pass on as None, which nodes read as "linked, not known yet".
    A FLOAT that is NaN, infinite or out of range keeps its value, so validate_inputs refuses it."""
    if raw is None:
        return True
    if isinstance(socket, io.Boolean.Input):
        return not isinstance(raw, bool)
    if isinstance(socket, io.String.Input):
        return not isinstance(raw, str)
    if isinstance(socket, io.Combo.Input):
        return False  # no conversion: validate_inputs checks it against the options
    if isinstance(raw, bool) or not isinstance(raw, numbers.Real) or not _fits_float(raw):
        return not (isinstance(socket, io.Int.Input) and isinstance(raw, int) and not isinstance(raw, bool))
    return isinstance(socket, io.Int.Input) and not (math.isfinite(raw) and float(raw).is_integer())


def install_raw_type_check(node_list) -> None:
    """Add the on-prompt handler to the running server, once (nothing without a server)."""
    import sys

    server_module = sys.modules.get("server")
    instance = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if instance is None or getattr(instance, "_shield_raw_type_check", False):
        return
    classes = {node.GET_SCHEMA().node_id: node for node in node_list}
    instance.add_on_prompt_handler(refuse_wrong_raw_types(classes))
    instance._shield_raw_type_check = True
