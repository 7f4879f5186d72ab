"""Writes the README's node reference from the nodes' own schemas, so it never drifts from the code.

Usage (with ComfyUI importable, e.g. the host's python): python scripts/node_reference.py [--check]
--check exits 1 when README.md's section differs from what the schemas say (tests run this).
"""

from __future__ import annotations

import argparse
import pathlib
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- node-reference:start -->", "<!-- node-reference:end -->"


def input_line(socket) -> str:
    kind = getattr(socket, "io_type", type(socket).__qualname__.split(".")[0])
    optional = ", optional" if getattr(socket, "optional", False) else ""
    default = getattr(socket, "default", None)
    default_text = f", default {default!r}" if default is not None else ""
    return f"  - `{socket.id}` ({kind}{optional}{default_text}): {socket.tooltip or ''}"


def node_section(node) -> str:
    schema = node.GET_SCHEMA()
    experimental = " *(experimental)*" if getattr(schema, "is_experimental", False) else ""
    outputs = ", ".join(f"{output.io_type}" for output in schema.outputs) or "—"
    lines = [
        f"- **{schema.display_name}** (`{schema.node_id}`, {schema.category}) → {outputs}{experimental}.",
        f"  {schema.description or ''}".rstrip(),
    ]
    lines += [input_line(socket) for socket in schema.inputs]
    return "\n".join(lines)


def reference_text(node_list) -> str:
    return "\n".join(node_section(node) for node in node_list)


def replace_section(readme: str, body: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{body}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    arguments = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
    from harness.host import import_comfyui_in_process

    import_comfyui_in_process()
    from comfyui_shield.nodes import NODE_LIST

    readme = README.read_text()
    updated = replace_section(readme, reference_text(NODE_LIST))
    if arguments.check:
        return 0 if updated == readme else 1
    README.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
