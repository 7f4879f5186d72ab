"""Checks UI-format workflow JSON (what the ComfyUI frontend saves) against a server's `/object_info`,
and converts it to the API format `/prompt` runs.

A UI workflow holds `nodes` (id, type, inputs with link ids, outputs, widgets_values) and `links`
([id, origin_id, origin_slot, target_id, target_slot, type]). `widgets_values` lists the node's widget
inputs in `/object_info`'s `input_order` (required, then optional); a widget with
`control_after_generate` (seeds) is followed by its control value ("fixed", "randomize", ...).
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
# Model-file choices depend on what a user has installed; a workflow may name a file this server lacks.
MODEL_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
# Likewise an input image (LoadImage) is the user's own file.
IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def input_specs(node_info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every input in the order the frontend lays out widgets."""
    order = node_info.get("input_order") or {
        section: list(node_info["input"].get(section, {})) for section in ("required", "optional")
    }
    specs = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            specs.append((name, node_info["input"][section][name]))
    return specs


def spec_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def combo_choices(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else spec_options(spec).get("options", [])


def is_widget(spec: list) -> bool:
    return spec_type(spec) in WIDGET_TYPES


def widget_names(node_info: dict) -> list[tuple[str, list, bool]]:
    """(name, spec, has_control_value) for every widget, in widgets_values order."""
    widgets = []
    for name, spec in input_specs(node_info):
        if is_widget(spec):
            options = spec_options(spec)
            widgets.append((name, spec, bool(options.get("control_after_generate"))))
    return widgets


def check_widget_value(where: str, spec: list, value) -> list[str]:
    kind, options = spec_type(spec), spec_options(spec)
    if kind == "COMBO":
        choices = combo_choices(spec)
        if value in choices:
            return []
        if isinstance(value, str) and value.lower().endswith(MODEL_FILE_SUFFIXES + IMAGE_FILE_SUFFIXES):
            return []
        return [f"{where}: {value!r} is not one of {choices[:12]}"]
    if kind in ("INT", "FLOAT"):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (kind == "INT" and not float(value).is_integer())
        ):
            return [f"{where}: {value!r} is not a {kind}"]
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        return [] if low <= value <= high else [f"{where}: {value} outside [{low}, {high}]"]
    if kind == "BOOLEAN":
        return [] if isinstance(value, bool) else [f"{where}: {value!r} is not a boolean"]
    if kind == "STRING":
        return [] if isinstance(value, str) else [f"{where}: {value!r} is not a string"]
    return []


def split_widget_values(node: dict, node_info: dict) -> tuple[dict, list[str]]:
    """{widget name: value} from a UI node's widgets_values, and the problems found."""
    values, problems = {}, []
    remaining = list(node.get("widgets_values") or [])
    where = f"node {node['id']} ({node['type']})"
    for name, spec, has_control in widget_names(node_info):
        if not remaining:
            problems.append(f"{where}: widgets_values ends before widget {name!r}")
            break
        values[name] = remaining.pop(0)
        problems += check_widget_value(f"{where}.{name}", spec, values[name])
        if has_control:
            control = remaining.pop(0) if remaining else None
            if control not in SEED_CONTROLS:
                problems.append(f"{where}.{name}: control value {control!r} not in {sorted(SEED_CONTROLS)}")
    if remaining:
        problems.append(f"{where}: {len(remaining)} widget values more than the node has widgets")
    return values, problems


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def validate_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Every problem found; an empty list means the workflow loads and validates on this server."""
    problems = []
    nodes = {node["id"]: node for node in workflow.get("nodes", [])}
    if not nodes:
        return ["workflow has no nodes"]
    for node in nodes.values():
        if node["type"] not in object_info:
            problems.append(f"node {node['id']}: unknown node type {node['type']!r}")
            continue
        problems += split_widget_values(node, object_info[node["type"]])[1]
        problems += check_required_inputs_connected(node, object_info[node["type"]])
    for link in workflow.get("links", []):
        problems += check_link(link, nodes, object_info)
    return problems


def check_required_inputs_connected(node: dict, node_info: dict) -> list[str]:
    linked = {entry["name"] for entry in node.get("inputs", []) if entry.get("link") is not None}
    return [
        f"node {node['id']} ({node['type']}): required input {name!r} is not connected"
        for name in node_info["input"].get("required", {})
        if not is_widget(node_info["input"]["required"][name]) and name not in linked
    ]


def check_link(link: list, nodes: dict, object_info: dict) -> list[str]:
    link_id, origin_id, origin_slot, target_id, target_slot, link_type = link[:6]
    where = f"link {link_id}"
    origin, target = nodes.get(origin_id), nodes.get(target_id)
    if origin is None or target is None:
        return [f"{where}: joins missing node {origin_id if origin is None else target_id}"]
    if origin["type"] not in object_info or target["type"] not in object_info:
        return []  # already reported as unknown node types
    outputs = object_info[origin["type"]]["output"]
    if not 0 <= origin_slot < len(outputs):
        return [f"{where}: {origin['type']} has no output slot {origin_slot}"]
    inputs = target.get("inputs", [])
    if not 0 <= target_slot < len(inputs):
        return [f"{where}: node {target_id} has no input slot {target_slot}"]
    entry = inputs[target_slot]
    if entry.get("link") != link_id:
        return [f"{where}: node {target_id} input {entry['name']!r} does not point back to it"]
    specs = dict(input_specs(object_info[target["type"]]))
    if entry["name"] not in specs:
        return [f"{where}: {target['type']} has no input {entry['name']!r}"]
    input_type, output_type = spec_type(specs[entry["name"]]), outputs[origin_slot]
    problems = []
    if not types_match(output_type, input_type):
        problems.append(
            f"{where}: {origin['type']} output {origin_slot} is {output_type}, "
            f"{target['type']}.{entry['name']} takes {input_type}"
        )
    if link_type not in (output_type, "*"):
        problems.append(f"{where}: declared type {link_type} but the output is {output_type}")
    return problems


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format graph of a validated UI workflow (muted/bypassed nodes are not supported)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    graph = {}
    for node in workflow["nodes"]:
        info = object_info[node["type"]]
        inputs, _ = split_widget_values(node, info)
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return graph
