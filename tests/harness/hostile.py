"""A hostile-input battery against the real ComfyUI server with the pack loaded (issue #11).

Every input of every pack node (listed from /object_info) gets hostile values, and the answer is judged
as a user would: a clear refusal or error that names the input, nothing written outside ComfyUI's
folders, no file clobbered, the server alive and its queue idle afterwards (every wait is bounded; a
prompt that does not finish is interrupted and reported as a hang). Sections:

- widgets: NaN/Infinity (JSON and strings), huge and out-of-range numbers, wrong JSON types (lists,
  dicts, bools, null, strings for numbers), bogus combo values, posted as literals (refused at /prompt);
- linked: hostile numbers that arrive through a link (checked at execution);
- relations: start > end and the other relations between inputs;
- shapes: empty batches, 3-D and 5-D latents, shield sets of another size, channel count or family;
- files: set names with dots, slashes, '..', absolute paths, 300 characters, NUL, unicode; overwrite off
  never clobbers and never loops; symlinks out of the allowed roots; damaged safetensors; folder inputs;
- memory: damaged memory files, dead or malformed Redis URLs;
- interrupts: /interrupt during long runs stops them, leaves no temp file or memory entry behind, and
  the next run gives what a fresh run gives;
- network and writes (run_battery with strace): every connect() and every file created, renamed or
  deleted by the server process while the battery ran, outside its base directory or to the network.

Run it all (about 5 minutes; it starts its own server under strace when strace exists):
    cd tests && OMP_NUM_THREADS=1 $SHIELD_PYTHON -m harness.hostile [--no-strace] [--keep]
The reduced CI version is tests/test_hostile_server.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Optional

from .host import PACK_NAME

PACK_MODULE = f"custom_nodes.{PACK_NAME}"  # object_info's python_module of the pack's nodes
ITEMS, RGB, EMPTY, FLAT, VIDEO, WIDE = (
    "hostile_items",
    "hostile_rgb",
    "hostile_empty",
    "hostile_flat",
    "hostile_video",
    "hostile_wide",
)
NAN = "hostile_nan"
GOOD_SET = "hostile/good.safetensors"
SETTLE_TIMEOUT = 20.0


def pack_nodes(server) -> dict[str, dict]:
    """object_info of the pack's nodes (not core's, nor those of the test node packs beside it)."""
    return {k: v for k, v in server.object_info().items() if v.get("python_module") == PACK_MODULE}


# -- results -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    section: str
    node: str
    input: str
    value: str
    expected: str
    ok: bool
    observed: str

    def line(self) -> str:
        mark = "ok  " if self.ok else "FAIL"
        return f"{mark} [{self.section}] {self.node}.{self.input} = {self.value}: {self.observed[:300]}"


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:40] + f"...({len(text)} chars)"


# -- the base graphs: every pack node wired so that it runs --------------------------------------------
def _latent(name: str) -> dict:
    return {"class_type": "LoadLatent", "inputs": {"latent": f"{name}.latent"}}


def _sampler(model: list, positive: list, latent: list, steps: int = 3, cfg: float = 1.0, seed: int = 1) -> dict:
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "scheduler": "karras",
            "denoise": 1.0,
            "positive": positive,
            "negative": positive,
            "latent_image": latent,
        },
    }


def _save_latent(source: list, prefix: str = "hostile/out") -> dict:
    return {"class_type": "SaveLatent", "inputs": {"samples": source, "filename_prefix": prefix}}


def _preview(source: list) -> dict:
    return {"class_type": "PreviewAny", "inputs": {"source": source}}


def common_parts() -> dict:
    """Nodes the base graphs draw from (unused ones are dropped by ComfyUI: only outputs' inputs run)."""
    return {
        "items": _latent(ITEMS),
        "mem": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["items", 0], "prediction": "eps"}},
        "rgb": _latent(RGB),
        "memrgb": {"class_type": "ShieldMemorizerModel", "inputs": {"latent": ["rgb", 0], "prediction": "eps"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 2, "color": 8421504}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "set": {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["items", 0], "model": ["mem", 0]}},
        "pix": {"class_type": "ShieldPixelEmbedder", "inputs": {"size": 8}},
        "refs": {
            "class_type": "ShieldReferenceSetFromImages",
            "inputs": {"images": ["img", 0], "vae": ["vae", 0], "embedder": ["pix", 0]},
        },
        "risk": {"class_type": "ShieldMemorizationRisk", "inputs": {**RISK_RUN, "model": ["mem", 0]}},
    }


# The Memorization Risk node mirrors one KSampler run (the Gate refuses a mismatch): these values on both.
RISK_RUN = {
    "positive": ["mem", 1],
    "negative": ["mem", 1],
    "latent_image": ["empty", 0],
    "seed": 1,
    "steps": 3,
    "cfg": 2.0,
    "sampler_name": "euler",
    "scheduler": "karras",
    "denoise": 1.0,
    "probe_steps": 1,
    "threshold": 0.0,
}


# Sockets of each node, wired to the common parts; widget values come from the schema defaults.
SOCKETS: dict[str, dict] = {
    "ShieldSetFromImages": {"images": ["img", 0], "vae": ["vae", 0], "model": ["memrgb", 0]},
    "ShieldSetFromLatents": {"latent": ["items", 0], "model": ["mem", 0]},
    "ShieldSaveShieldSet": {"shield_set": ["set", 0]},
    "ShieldRadiusCalibration": {"latent": ["items", 0], "model": ["mem", 0]},
    "ShieldSparseRepellency": {"model": ["mem", 0], "shield_set": ["set", 0]},
    "ShieldSparseRepellencyKSampler": {
        "model": ["mem", 0],
        "positive": ["mem", 1],
        "negative": ["mem", 1],
        "latent_image": ["empty", 0],
        "shield_set": ["set", 0],
    },
    "ShieldTransitionPointCFG": {"model": ["mem", 0]},
    "ShieldReferenceSetFromImages": {"images": ["img", 0], "vae": ["vae", 0], "embedder": ["pix", 0]},
    "ShieldProCreateGuidance": {
        "model": ["memrgb", 0],
        "vae": ["vae", 0],
        "embedder": ["pix", 0],
        "reference_set": ["refs", 0],
    },
    "ShieldReport": {"latent": ["items", 0], "shield_set": ["set", 0], "model": ["mem", 0]},
    "ShieldMemorizerModel": {"latent": ["items", 0]},
    "ShieldMemorizationRisk": {k: v for k, v in RISK_RUN.items() if isinstance(v, list)} | {"model": ["mem", 0]},
    "ShieldGate": {"model": ["mem", 0], "risk": ["risk", 0]},
    "ShieldSaveImageWithCertificate": {"images": ["img", 0]},
    "ShieldEmbeddingRepellency": {
        "model": ["memrgb", 0],
        "vae": ["vae", 0],
        "embedder": ["pix", 0],
        "shield_set": ["refs", 0],
    },
    "ShieldEarlyCopyRedraw": {
        "model": ["memrgb", 0],
        "vae": ["vae", 0],
        "embedder": ["pix", 0],
        "shield_set": ["refs", 0],
    },
}
# Widget values other than the schema defaults, so that the base graph runs.
OVERRIDES: dict[str, dict] = {
    "ShieldSetFromImages": {"width": 16, "height": 16},
    "ShieldSaveShieldSet": {"filename": "hostile/saved", "overwrite": True},
    "ShieldLoadShieldSet": {"filename": GOOD_SET},
    "ShieldMemory": {"memory_id": "hostile"},
    "ShieldSparseRepellencyKSampler": {"steps": 3, "sampler_name": "euler", "scheduler": "karras", "radius": 0.3},
    "ShieldSparseRepellency": {"radius": 0.3},
    "ShieldProCreateGuidance": {"strength": 10.0},
    "ShieldMemorizerConditioning": {"n_items": 6, "subset": "1"},
    "ShieldDreamSimLoader": {},
    "ShieldMemorizationRisk": {k: v for k, v in RISK_RUN.items() if not isinstance(v, list)},
    "ShieldSaveImageWithCertificate": {"filename_prefix": "hostile/cert"},
}
# What consumes the node's output so that it executes.
CONSUMERS: dict[str, Callable[[], dict]] = {
    "ShieldSparseRepellency": lambda: {
        "ks": _sampler(["n", 0], ["mem", 1], ["empty", 0]),
        "out": _save_latent(["ks", 0]),
    },
    "ShieldSparseRepellencyKSampler": lambda: {"out": _save_latent(["n", 0])},
    "ShieldTransitionPointCFG": lambda: {
        "cond": {"class_type": "ShieldMemorizerConditioning", "inputs": {"subset": "1", "n_items": 6}},
        "ks": {**_sampler(["n", 0], ["cond", 0], ["empty", 0], cfg=2.0)},
        "out": _save_latent(["ks", 0]),
    },
    "ShieldProCreateGuidance": lambda: {
        "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0]),
        "out": _save_latent(["ks", 0]),
    },
    "ShieldDemoTrainingSet": lambda: {"out": _preview(["n", 1])},
    "ShieldMemorizationRisk": lambda: {"out": _preview(["n", 3])},
    "ShieldGate": lambda: {
        "ks": _sampler(["n", 0], ["mem", 1], ["empty", 0], steps=RISK_RUN["steps"], cfg=RISK_RUN["cfg"]),
        "out": _save_latent(["ks", 0]),
    },
    "ShieldEmbeddingRepellency": lambda: {
        "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0]),
        "out": _save_latent(["ks", 0]),
    },
    "ShieldEarlyCopyRedraw": lambda: {
        "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0]),
        "out": _save_latent(["ks", 0]),
    },
    "ShieldMemorizerModel": lambda: {"out": _preview(["n", 2])},
}
OUTPUT_NODES = {
    "ShieldInfo",
    "ShieldSaveShieldSet",
    "ShieldRadiusCalibration",
    "ShieldReport",
    "ShieldSaveImageWithCertificate",
}


def default_value(spec: list) -> Any:
    kind, options = spec[0], spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    if isinstance(kind, list):
        return kind[0] if kind else None
    if kind == "COMBO":
        return (options.get("options") or [None])[0]
    return None


WIDGET_TYPES = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")


def widget_kind(spec: list) -> Optional[str]:
    kind = spec[0]
    if isinstance(kind, list):
        return "COMBO"
    return kind if kind in WIDGET_TYPES else None


def widgets(info: dict) -> dict[str, list]:
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return {name: spec for name, spec in inputs.items() if widget_kind(spec)}


def base_graph(node_id: str, info: dict, **values) -> dict:
    """The node `n` with every widget at its default (or override) and its sockets wired, plus what makes it run."""
    inputs = {name: default_value(spec) for name, spec in widgets(info).items()}
    inputs = {name: value for name, value in inputs.items() if value is not None}
    inputs.update(OVERRIDES.get(node_id, {}))
    inputs.update(SOCKETS.get(node_id, {}))
    inputs.update(values)
    graph = common_parts()
    graph["n"] = {"class_type": node_id, "inputs": inputs}
    if node_id in CONSUMERS:
        graph.update(CONSUMERS[node_id]())
    elif node_id not in OUTPUT_NODES:
        graph["out"] = _preview(["n", 0])
    return graph


# -- hostile values per widget type ----------------------------------------------------------------------
HUGE = 10**400  # JSON allows it; Python's json reads it as an int that float() cannot hold


def hostile_literals(kind: str, spec: list) -> list:
    options = spec[1] if len(spec) > 1 else {}
    low, high = options.get("min"), options.get("max")
    common = [None, {"a": 1}, [1, 2, 3]] + ([] if kind == "STRING" else [{"__value__": "x"}])
    if kind == "BOOLEAN":
        return ["false", "true", 0, 1, "", {"__value__": "false"}, *common]
    if kind == "COMBO":
        choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
        first = choices[0] if choices else "x"
        return ["bogus-option", 3, True, "", f" {first}", str(first).upper() + "!", *common]
    if kind == "STRING":
        return [5, 2.5, True, *common]
    values = ["abc", "NaN", "Infinity", "1", True, math.nan, math.inf, -math.inf, HUGE, -HUGE, *common]
    values += [{"__value__": math.nan}]
    if high is not None:
        values += [high * 10 + 1]
    if low is not None:
        values += [low - 1 - abs(low)]
    if kind == "INT":
        values += [2.5]
    return values


def linked_values(kind: str, spec: list) -> list:
    """Hostile values that can arrive through a link from ComfyUI's Primitive nodes (within their own range)."""
    options = spec[1] if len(spec) > 1 else {}
    low, high = options.get("min"), options.get("max")
    values = []
    if kind == "FLOAT":
        values.append(math.nan)
    if high is not None and high * 10 + 1 < 2**62:
        values.append(high * 10 + 1 if kind == "FLOAT" else int(high) * 10 + 1)
    if low is not None:
        values.append(low - 1 - abs(low))
    return values


PRIMITIVE = {
    "INT": "PrimitiveInt",
    "FLOAT": "PrimitiveFloat",
    "BOOLEAN": "PrimitiveBoolean",
    "STRING": "PrimitiveString",
}


def json_safe(value: Any) -> Any:
    """NaN and Infinity as Python's json writes them (what a hostile client sends)."""
    return value


# -- the battery ---------------------------------------------------------------------------------------
class Battery:
    def __init__(self, server, log: Callable[[str], None] = print):
        self.server = server
        self.log = log
        self.results: list[Result] = []
        self.info = pack_nodes(server)
        self.base = server.base_dir

    # -- bookkeeping ---------------------------------------------------------------------------------
    def record(self, section, node, name, value, expected, ok, observed) -> Result:
        result = Result(section, node, name, shown(value), expected, bool(ok), str(observed))
        self.results.append(result)
        if not result.ok:
            self.log(result.line())
        return result

    def failures(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def summary(self) -> str:
        by_section: dict[str, list[int]] = {}
        for r in self.results:
            counts = by_section.setdefault(r.section, [0, 0])
            counts[0 if r.ok else 1] += 1
        lines = [f"{section}: {ok} ok, {bad} failed" for section, (ok, bad) in by_section.items()]
        per_node: dict[str, int] = {}
        for r in self.results:
            per_node[r.node] = per_node.get(r.node, 0) + 1
        lines.append("cases per node: " + ", ".join(f"{n} {c}" for n, c in sorted(per_node.items())))
        lines.append(f"total: {len(self.results)} cases, {len(self.failures())} failed")
        return "\n".join(lines)

    # -- talking to the server -------------------------------------------------------------------------
    def post(self, graph: dict) -> tuple[int, Any]:
        body = json.dumps({"prompt": graph, "client_id": self.server.client_id}).encode()
        request = urllib.request.Request(
            self.server.url + "/prompt", data=body, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode(errors="replace")
            try:
                return error.code, json.loads(text)
            except ValueError:
                return error.code, text

    def wait(self, prompt_id: str, timeout: float) -> tuple[str, str, dict]:
        """(status, error text, outputs); status 'hang' after interrupting a prompt that did not finish."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                return "dead", self.server.log_tail(), {}
            entry = self.server.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                state = status.get("status_str", "?")
                messages = status.get("messages", [])
                if any(kind == "execution_interrupted" for kind, _ in messages):
                    state = "interrupted"
                errors = [m[1] for m in messages if m[0] == "execution_error"]
                text = " | ".join(f"{e.get('node_type')}: {e.get('exception_message', '')}" for e in errors)
                return state, text, entry.get("outputs", {})
            time.sleep(0.1)
        self.interrupt()
        return "hang", f"did not finish within {timeout} s (interrupted)", {}

    def interrupt(self) -> None:
        with contextlib.suppress(Exception):
            self.server.post("/interrupt", {})

    def settle(self, timeout: float = SETTLE_TIMEOUT) -> Optional[str]:
        """None once the queue is idle; else what is stuck (after an interrupt and a clear)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.server.process.poll() is not None:
                return "the server died"
            queue = self.server.get("/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                return None
            time.sleep(0.1)
        self.interrupt()
        with contextlib.suppress(Exception):
            self.server.post("/queue", {"clear": True})
        return f"the queue was not idle after {timeout} s"

    def errors_text(self, body: Any) -> str:
        if not isinstance(body, dict):
            return str(body)
        parts = []
        error = body.get("error")
        if isinstance(error, dict):
            parts.append(f"{error.get('message')}: {error.get('details')}")
        for node_id, node in (body.get("node_errors") or {}).items():
            for e in node.get("errors", []):
                parts.append(f"[{node_id} {e.get('type')}] {e.get('message')}: {e.get('details')}")
        return " | ".join(parts)

    def node_errors(self, body: Any, node_key: str = "n") -> list[dict]:
        if not isinstance(body, dict):
            return []
        return (body.get("node_errors") or {}).get(node_key, {}).get("errors", [])

    # -- the three kinds of expectation ----------------------------------------------------------------
    def expect_refused(self, section, node, name, value, graph, names: Iterable[str] = (), node_key="n") -> None:
        """POST must be refused (400) with an error on `node_key` that names the input and is no crash."""
        status, body = self.post(graph)
        text = self.errors_text(body)
        problems = []
        if status == 200:
            problems.append("accepted")
            if isinstance(body, dict) and "prompt_id" in body:
                self.wait(body["prompt_id"], 60)
        elif status != 400:
            problems.append(f"HTTP {status}")
        own = " | ".join(
            f"{e.get('type')}: {e.get('message')}: {e.get('details')}" for e in self.node_errors(body, node_key)
        )
        if status == 400:
            if not own:
                problems.append("no error on the node")
            if "exception_during" in own or "Traceback" in own:
                problems.append("an exception, not a message")
            for expected_name in (name, *names):
                if expected_name and expected_name not in own:
                    problems.append(f"does not name {expected_name!r}")
        stuck = self.settle()
        if stuck:
            problems.append(stuck)
        self.record(
            section,
            node,
            name,
            value,
            "refused naming the input",
            not problems,
            "; ".join(problems) + " :: " + (own or text),
        )

    def expect_error(self, section, node, name, value, graph, pattern: str, timeout: float = 60.0) -> str:
        """The prompt is accepted or refused, and ends with an error matching `pattern` (no hang, no crash)."""
        status, body = self.post(graph)
        if status != 200:
            text = self.errors_text(body)
            ok = status == 400 and re.search(pattern, text) and "exception_during" not in text
            self.record(section, node, name, value, f"error /{pattern}/", ok, f"refused: {text}")
            self.settle()
            return text
        state, text, _ = self.wait(body["prompt_id"], timeout)
        stuck = self.settle()
        ok = state == "error" and re.search(pattern, text) is not None and not stuck
        observed = f"{state}: {text}" + (f"; {stuck}" if stuck else "")
        self.record(section, node, name, value, f"error /{pattern}/", ok, observed)
        return text

    def expect_runs(self, section, node, name, value, graph, timeout: float = 60.0, check=None) -> dict:
        status, body = self.post(graph)
        if status != 200:
            self.record(section, node, name, value, "runs", False, f"refused: {self.errors_text(body)}")
            self.settle()
            return {}
        state, text, outputs = self.wait(body["prompt_id"], timeout)
        stuck = self.settle()
        problem = None if state == "success" and not stuck else f"{state}: {text} {stuck or ''}"
        if problem is None and check is not None:
            problem = check(outputs)
        self.record(section, node, name, value, "runs", problem is None, problem or "ran")
        return outputs

    # -- inputs written into the server's folders -------------------------------------------------------
    def setup(self) -> None:
        import torch

        generator = torch.Generator().manual_seed(4321)  # not the fixtures' items: no shared caches
        self.server.write_input_latent(ITEMS, torch.randn(6, 4, 8, 8, generator=generator))
        self.server.write_input_latent(RGB, torch.rand(4, 3, 16, 16, generator=generator) * 2 - 1)
        self.server.write_input_latent(EMPTY, torch.zeros(0, 4, 8, 8))
        self.server.write_input_latent(FLAT, torch.randn(4, 8, 8, generator=generator))
        self.server.write_input_latent(VIDEO, torch.randn(2, 4, 3, 8, 8, generator=generator))
        self.server.write_input_latent(WIDE, torch.randn(2, 4, 8, 16, generator=generator))
        self.server.write_input_latent(NAN, torch.full((2, 4, 8, 8), math.nan))
        save = {
            **common_parts(),
            "n": {
                "class_type": "ShieldSaveShieldSet",
                "inputs": {"shield_set": ["set", 0], "filename": GOOD_SET, "overwrite": True},
            },
        }
        self.server.run(save, timeout=120)
        self.info = pack_nodes(self.server)

    def pack_nodes(self) -> list[str]:
        return sorted(self.info)

    # -- sections --------------------------------------------------------------------------------------
    def base_graphs_run(self) -> None:
        """Sanity: each node's base graph runs (else the later sections would test nothing)."""
        for node_id in self.pack_nodes():
            if node_id in ("ShieldDreamSimLoader", "ShieldClipVisionEmbedder"):
                continue  # need weight files / a CLIP vision model: validation-only here
            self.expect_runs("base", node_id, "-", "defaults", base_graph(node_id, self.info[node_id]), timeout=180)

    def widget_literals(self) -> None:
        for node_id in self.pack_nodes():
            info = self.info[node_id]
            for name, spec in widgets(info).items():
                kind = widget_kind(spec)
                for value in hostile_literals(kind, spec):
                    graph = base_graph(node_id, info, **{name: value})
                    display = info["display_name"].split(" (")[0]  # "Shield Memorizer Conditioning (test)"
                    self.expect_refused("widgets", node_id, name, value, graph, names=(display,))

    def one_bad_value_does_not_shield_another(self) -> None:
        """A value that breaks one node's check must not let another node's bad value through."""
        graph = base_graph("ShieldSparseRepellency", self.info["ShieldSparseRepellency"], intra_batch="false")
        graph["cond"] = {"class_type": "ShieldMemorizerConditioning", "inputs": {"subset": "", "n_items": HUGE}}
        graph["cond_out"] = _preview(["cond", 0])
        ordered = {"cond": graph.pop("cond"), "cond_out": graph.pop("cond_out"), **graph}
        self.expect_refused(
            "widgets", "ShieldSparseRepellency", "intra_batch", "'false' after a huge int elsewhere", ordered
        )

    def numbers(self):
        """(node id, its object_info, input name, kind, spec) of every INT and FLOAT of the nodes that run here."""
        for node_id in self.pack_nodes():
            if node_id in ("ShieldDreamSimLoader", "ShieldClipVisionEmbedder"):
                continue  # need weight files / a CLIP vision model: validation-only here
            for name, spec in widgets(self.info[node_id]).items():
                if widget_kind(spec) in ("INT", "FLOAT"):
                    yield node_id, self.info[node_id], name, widget_kind(spec), spec

    def linked_hostile_values(self) -> None:
        for node_id, info, name, kind, spec in self.numbers():
            for value in linked_values(kind, spec):
                graph = base_graph(node_id, info, **{name: ["lk", 0]})
                graph["lk"] = {"class_type": PRIMITIVE[kind], "inputs": {"value": value}}
                self.expect_error("linked", node_id, name, value, graph, rf"'{name}' must", timeout=120)

    # Values in range but at the ends that are too slow or too large for this machine (they are ComfyUI's own
    # limits: 16384 px, 10000 steps); the interrupt section covers long runs.
    EXTREME_SKIPS = {
        ("ShieldSetFromImages", "width", "max"),
        ("ShieldSetFromImages", "height", "max"),
        ("ShieldSparseRepellencyKSampler", "steps", "max"),
    }

    def extremes(self) -> None:
        """Every number at its min and at its max (valid values): runs with finite outputs, or an error naming it."""
        for node_id, info, name, _, spec in self.numbers():
            for end in ("min", "max"):
                value = (spec[1] if len(spec) > 1 else {}).get(end)
                if value is None or (node_id, name, end) in self.EXTREME_SKIPS:
                    continue
                status, body = self.post(base_graph(node_id, info, **{name: value}))
                text, outputs = self.errors_text(body), {}
                if status == 200:
                    state, text, outputs = self.wait(body["prompt_id"], 120)
                    text = "" if state == "success" else f"{state}: {text}"
                problem = self.settle() or (self._infinite_output(outputs) if not text else None)
                if text and (name not in text or "exception_during" in text):
                    problem = f"an error that does not name {name!r}: {text}"
                observed = problem or text[:200] or "ran"
                self.record(
                    "extremes", node_id, name, f"{end} {value}", "runs or names the input", not problem, observed
                )

    def _infinite_output(self, outputs: dict) -> Optional[str]:
        import torch

        if "latents" in outputs.get("out", {}) and not torch.isfinite(self.server.saved_latent(outputs, "out")).all():
            return "the output latent holds NaN or inf"
        return None

    def relations(self) -> None:
        cases = [
            ("ShieldSparseRepellency", {"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
            ("ShieldSparseRepellencyKSampler", {"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
            ("ShieldProCreateGuidance", {"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
            ("ShieldEmbeddingRepellency", {"start_percent": 0.8, "end_percent": 0.2}, "start_percent"),
            ("ShieldTransitionPointCFG", {"before_guidance": "opposite", "opposite_scale": 0}, "opposite_scale"),
            (
                "ShieldTransitionPointCFG",
                {"mode": "static", "transition_percent": 0.9, "cap_percent": 0.1},
                "cap_percent",
            ),
            ("ShieldSparseRepellency", {"radius": 9.0, "radius_unit": "relative"}, "radius"),
            ("ShieldMemorizerConditioning", {"subset": "7", "n_items": 6}, "subset"),
        ]
        for node_id, values, name in cases:
            graph = base_graph(node_id, self.info[node_id], **values)
            self.expect_error("relations", node_id, name, values, graph, re.escape(name))
        # the same relations with one side linked (unknown at validation, checked at execution)
        linked = [
            ("ShieldSparseRepellency", "start_percent", 0.8, {"end_percent": 0.2}),
            ("ShieldSparseRepellencyKSampler", "start_percent", 0.8, {"end_percent": 0.2}),
            ("ShieldProCreateGuidance", "start_percent", 0.8, {"end_percent": 0.2}),
            ("ShieldEmbeddingRepellency", "start_percent", 0.8, {"end_percent": 0.2}),
            ("ShieldTransitionPointCFG", "opposite_scale", 0.0, {"before_guidance": "opposite"}),
            ("ShieldMemorizerConditioning", "n_items", 2, {"subset": "5"}),
        ]
        for node_id, name, value, others in linked:
            kind = "INT" if isinstance(value, int) and not isinstance(value, bool) else "FLOAT"
            graph = base_graph(node_id, self.info[node_id], **{name: ["lk", 0]}, **others)
            graph["lk"] = {"class_type": PRIMITIVE[kind], "inputs": {"value": value}}
            pattern = "start_percent|subset|opposite_scale"
            self.expect_error("relations", node_id, f"{name} (linked)", {name: value, **others}, graph, pattern)

    def shapes(self) -> None:
        info = self.info
        latent_nodes = {
            "ShieldSetFromLatents": "latent",
            "ShieldRadiusCalibration": "latent",
            "ShieldReport": "latent",
            "ShieldMemorizerModel": "latent",
        }
        for latent_name, label in ((EMPTY, "empty batch"), (FLAT, "3-D latent"), (VIDEO, "5-D latent"), (NAN, "NaN")):
            graph_parts = {"bad": _latent(latent_name)}
            for node_id, name in latent_nodes.items():
                graph = base_graph(node_id, info[node_id], **{name: ["bad", 0]})
                graph.update(graph_parts)
                if latent_name == VIDEO and node_id in ("ShieldSetFromLatents", "ShieldRadiusCalibration"):
                    self.expect_runs("shapes", node_id, name, label, graph)  # video latents are supported
                elif latent_name == NAN:
                    self.expect_error(
                        "shapes", node_id, name, label, graph, rf"'{name}' contains NaN|latents contain NaN"
                    )
                else:
                    self.expect_error("shapes", node_id, name, label, graph, rf"{name}|latent|batch|shape|items")
            # as the sampler's latent_image (SPELL patches the model; the sampler runs it)
            graph = base_graph(
                "ShieldSparseRepellencyKSampler", info["ShieldSparseRepellencyKSampler"], latent_image=["bad", 0]
            )
            graph.update(graph_parts)
            if latent_name in (EMPTY, NAN):
                self.expect_error(
                    "shapes", "ShieldSparseRepellencyKSampler", "latent_image", label, graph, r"'latent_image' (is|con)"
                )
            else:
                self.expect_error(
                    "shapes", "ShieldSparseRepellencyKSampler", "latent_image", label, graph, r"shield|shape|latent"
                )
        # a shield set of another size (8x16 latents against 8x8 generations)
        graph = base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"], shield_set=["wset", 0])
        graph["wide"] = _latent(WIDE)
        graph["wset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["wide", 0], "model": ["mem", 0]}}
        self.expect_error(
            "shapes",
            "ShieldSparseRepellency",
            "shield_set",
            "set of another size",
            graph,
            r"shield_set|Rebuild the set",
        )
        # a shield set of another channel count (3-channel pixel latents against a 4-channel model)
        graph = base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"], shield_set=["cset", 0])
        graph["cset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["rgb", 0], "model": ["memrgb", 0]}}
        self.expect_error(
            "shapes", "ShieldSparseRepellency", "shield_set", "set of another channel count", graph, r"shield"
        )
        # a shield set of another family (the demo model's format) against the memorizer
        graph = base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"], shield_set=["fset", 0])
        graph["demo"] = {"class_type": "ShieldDemoModelLoader", "inputs": {}}
        graph["fset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["items", 0], "model": ["demo", 0]}}
        self.expect_error("shapes", "ShieldSparseRepellency", "shield_set", "set of another family", graph, r"shield")
        # Report: a set of another size, latents and images of different counts, an embedder without images
        graph = base_graph("ShieldReport", info["ShieldReport"], shield_set=["wset", 0])
        graph["wide"] = _latent(WIDE)
        graph["wset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["wide", 0], "model": ["mem", 0]}}
        self.expect_error("shapes", "ShieldReport", "shield_set", "set of another size", graph, r"shield_set")
        graph = base_graph("ShieldReport", info["ShieldReport"], images=["img", 0])
        self.expect_error("shapes", "ShieldReport", "images", "2 images for 6 latents", graph, r"'images'")
        graph = base_graph("ShieldReport", info["ShieldReport"], embedder=["pix", 0])
        self.expect_error("shapes", "ShieldReport", "embedder", "embedder without images", graph, r"'images'|embedder")
        # images of 1x1 pixels (an empty IMAGE batch cannot be made in a graph: core nodes refuse it first)
        tiny = {"class_type": "EmptyImage", "inputs": {"width": 1, "height": 1, "batch_size": 1, "color": 0}}
        for node_id in ("ShieldSetFromImages", "ShieldReferenceSetFromImages"):
            graph = base_graph(node_id, info[node_id], images=["tiny", 0])
            graph["tiny"] = tiny
            self.expect_runs("shapes", node_id, "images", "1x1 image", graph)
        self.newer_node_shapes()
        # ProCreate: a reference set without images or embeddings (from latents)
        graph = base_graph("ShieldProCreateGuidance", info["ShieldProCreateGuidance"], reference_set=["lset", 0])
        graph["lset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["rgb", 0], "model": ["memrgb", 0]}}
        self.expect_error(
            "shapes",
            "ShieldProCreateGuidance",
            "reference_set",
            "set without images",
            graph,
            r"reference_set|reference",
        )
        # ProCreate on a 4-channel model with pixel references (a VAE that does not fit the model)
        graph = base_graph("ShieldProCreateGuidance", info["ShieldProCreateGuidance"], model=["mem", 0])
        graph["ks"] = _sampler(["n", 0], ["mem", 1], ["empty", 0])
        self.expect_error("shapes", "ShieldProCreateGuidance", "vae", "VAE of another model", graph, r"vae|VAE|channel")

    def newer_node_shapes(self) -> None:
        """Memorization Risk, Shield Gate, the certificate, Embedding Repellency and the video length input."""
        info = self.info
        for latent_name, label in ((EMPTY, "empty batch"), (NAN, "NaN"), (FLAT, "3-D latent")):
            graph = base_graph("ShieldMemorizationRisk", info["ShieldMemorizationRisk"], latent_image=["bad", 0])
            graph["bad"] = _latent(latent_name)
            pattern = r"'latent_image' (is an empty batch|has shape|contains NaN)"
            self.expect_error("shapes", "ShieldMemorizationRisk", "latent_image", label, graph, pattern)
        # the gate with a risk scored on another batch (1 sample) than the sampler's (2)
        graph = base_graph("ShieldGate", info["ShieldGate"], model=["spell", 0])  # a method for the gate to gate
        graph["spell"] = base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"])["n"]
        graph["one"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        graph["risk"]["inputs"]["latent_image"] = ["one", 0]
        self.expect_error("shapes", "ShieldGate", "risk", "risk of another batch size", graph, r"risk|batch|seed")
        # the certificate: 2 images, a risk of 2 samples from another run is fine; 1 image against it is not
        graph = base_graph("ShieldSaveImageWithCertificate", info["ShieldSaveImageWithCertificate"], risk=["risk", 0])
        graph["one"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}}
        graph["n"]["inputs"]["images"] = ["one", 0]
        self.expect_error("shapes", "ShieldSaveImageWithCertificate", "risk", "1 image, 2 scores", graph, r"'risk'")
        graph = base_graph(
            "ShieldSaveImageWithCertificate", info["ShieldSaveImageWithCertificate"], latent=["items", 0]
        )
        graph["n"]["inputs"]["shield_set"] = ["set", 0]
        self.expect_error("shapes", "ShieldSaveImageWithCertificate", "latent", "6 latents, 2 images", graph, r"latent")
        # Embedding Repellency with a set that has neither images nor embeddings: its latents are decoded
        graph = base_graph("ShieldEmbeddingRepellency", info["ShieldEmbeddingRepellency"], shield_set=["lset", 0])
        graph["lset"] = {"class_type": "ShieldSetFromLatents", "inputs": {"latent": ["rgb", 0], "model": ["memrgb", 0]}}
        self.expect_runs("shapes", "ShieldEmbeddingRepellency", "shield_set", "set without images", graph)
        # length (video frames) with an image VAE
        graph = base_graph("ShieldSetFromImages", info["ShieldSetFromImages"], length=5)
        self.expect_error("shapes", "ShieldSetFromImages", "length", "5 with an image VAE", graph, r"length")

    # -- files -------------------------------------------------------------------------------------------
    @property
    def sets_dir(self) -> pathlib.Path:
        return self.base / "models" / "shield_sets"

    def save_graph(self, filename: Any, overwrite: Any = False, **extra) -> dict:
        return base_graph(
            "ShieldSaveShieldSet", self.info["ShieldSaveShieldSet"], filename=filename, overwrite=overwrite, **extra
        )

    def file_names(self) -> None:
        node = "ShieldSaveShieldSet"
        refused = [
            "",
            "   ",
            " padded",
            "nul\x00byte",
            "../escape",
            "a/../../escape",
            "/etc/escape",
            "/tmp/escape",
            "x" * 300,
            "é" * 200,
            "sub/" + "y" * 300,
        ]
        for name in refused:
            self.expect_refused("files", node, "filename", name, self.save_graph(name, True))
        if (self.base / "models" / "escape.safetensors").exists() or pathlib.Path("/tmp/escape.safetensors").exists():
            self.record("files", node, "filename", "../escape", "nothing written outside", False, "a file escaped")
        allowed = ["v1.5", "dots.in.name", "sub/dir/name", "ünïcödé-名前", "x" * 200, "trailing.", ".hidden", "a b"]
        for name in allowed:

            def check(outputs, name=name):
                written = outputs.get("n", {}).get("text", [""])[0]
                path = pathlib.Path(written.rsplit(" to ", 1)[-1])
                if not path.is_file() or self.sets_dir.resolve() not in path.resolve().parents:
                    return f"not written inside shield_sets: {written}"
                return None

            self.expect_runs("files", node, "filename", name, self.save_graph(name, True), check=check)

    def certificate_prefixes(self) -> None:
        """Save Image with Shield Certificate's filename_prefix: inside output/ only, with a clear error otherwise."""
        node = "ShieldSaveImageWithCertificate"
        output = self.base / "output"
        for prefix in (
            "../escape",
            "../../escape",
            "/tmp/escape",
            "/etc/escape",
            "a/../../escape",
            "nul\x00",
            "x" * 300,
        ):
            graph = base_graph(node, self.info[node], filename_prefix=prefix)
            self.expect_error("files", node, "filename_prefix", prefix, graph, r"filename_prefix")
        for prefix in ("sub/dir/name", "ünï 名", "v1.5", ""):
            graph = base_graph(node, self.info[node], filename_prefix=prefix)

            def inside(outputs):
                images = outputs.get("n", {}).get("images", [])
                paths = [self.server.output_path(image) for image in images]
                if not paths or not all(p.is_file() and output.resolve() in p.resolve().parents for p in paths):
                    return f"not all written inside output/: {paths}"
                return None

            self.expect_runs("files", node, "filename_prefix", prefix, graph, check=inside)
        escaped = [p for p in (self.base / "escape_00001_.png", pathlib.Path("/tmp/escape_00001_.png")) if p.exists()]
        self.record("files", node, "filename_prefix", "escapes", "nothing written outside", not escaped, str(escaped))

    def no_clobber(self) -> None:
        """overwrite off: an existing file is never replaced, whatever the name; numbered names are bounded."""
        node = "ShieldSaveShieldSet"
        folder = self.sets_dir / "clobber"
        folder.mkdir(parents=True, exist_ok=True)
        names = ["plain", "v1.5", "v1", "clash.index", "clash", "plain_1", "with", "with.safetensors"]
        for stem in names:
            (folder / f"{stem}.safetensors").write_bytes(b"precious " + stem.encode())
        for filename in (
            "clobber/plain",
            "clobber/plain.safetensors",
            "clobber/v1.5",
            "clobber/clash.index",
            "clobber/with.safetensors",
        ):
            self.expect_runs(
                "files", node, "filename", f"{filename} (overwrite off)", self.save_graph(filename, False), timeout=60
            )
        changed = [
            stem for stem in names if (folder / f"{stem}.safetensors").read_bytes() != b"precious " + stem.encode()
        ]
        self.record("files", node, "overwrite", False, "existing files untouched", not changed, f"changed: {changed}")
        # every numbered name taken: a clear error within a bounded time, nothing replaced
        full = self.sets_dir / "full"
        full.mkdir(exist_ok=True)
        for name in ["taken"] + [f"taken_{n}" for n in range(1, 10_000)]:
            (full / f"{name}.safetensors").touch()
        started = time.monotonic()
        self.expect_error(
            "files",
            node,
            "filename",
            "all numbered names taken",
            self.save_graph("full/taken", False),
            r"filename",
            timeout=60,
        )
        self.record(
            "files",
            node,
            "filename",
            "all numbered names taken",
            "answers within 20 s",
            time.monotonic() - started < 20,
            f"{time.monotonic() - started:.1f} s",
        )
        shutil.rmtree(full)
        # a directory where the file would go, and a file where a sub-folder would go
        (self.sets_dir / "isdir.safetensors").mkdir(exist_ok=True)
        self.expect_error(
            "files",
            node,
            "filename",
            "name of an existing folder (overwrite on)",
            self.save_graph("isdir", True),
            r"filename",
        )
        self.expect_runs(
            "files", node, "filename", "name of an existing folder (overwrite off)", self.save_graph("isdir", False)
        )
        (self.sets_dir / "afile").write_bytes(b"a file")
        self.expect_error(
            "files", node, "filename", "a file used as a folder", self.save_graph("afile/x", True), r"filename"
        )
        leftovers = [p for p in self.sets_dir.rglob(".shield-*.tmp")]
        self.record("files", node, "-", "temp files after the saves", "none left", not leftovers, str(leftovers[:3]))

    def symlinks(self, outside: pathlib.Path) -> None:
        node = "ShieldSaveShieldSet"
        (outside / "victim.safetensors").write_bytes(b"outside victim")
        (self.sets_dir / "outlink.safetensors").symlink_to(outside / "victim.safetensors")
        (self.sets_dir / "outdir").symlink_to(outside, target_is_directory=True)
        (self.sets_dir / "dangling.safetensors").symlink_to(outside / "does_not_exist.safetensors")
        for name, what in [
            ("outlink", "symlink to a file outside"),
            ("outdir/new", "through a symlinked folder outside"),
            ("dangling", "dangling symlink to outside"),
        ]:
            for overwrite in (True, False):
                label = f"{what} (overwrite {'on' if overwrite else 'off'})"
                self.expect_refused("files", node, "filename", label, self.save_graph(name, overwrite))
        escaped = sorted(p.name for p in outside.iterdir())
        self.record(
            "files",
            node,
            "filename",
            "symlinks",
            "nothing written outside",
            escaped == ["victim.safetensors"] and (outside / "victim.safetensors").read_bytes() == b"outside victim",
            str(escaped),
        )
        # Load: symlinked set files and folders outside the root (they are listed by ComfyUI)
        shutil.copy(self.sets_dir / GOOD_SET, outside / "theirs.safetensors")
        (self.sets_dir / "escape.safetensors").symlink_to(outside / "theirs.safetensors")
        self.info = pack_nodes(self.server)
        for name in ("escape.safetensors", "outdir/theirs.safetensors"):
            graph = base_graph("ShieldLoadShieldSet", self.info["ShieldLoadShieldSet"], filename=name)
            self.expect_error(
                "files", "ShieldLoadShieldSet", "filename", name, graph, r"points outside the shield set folder"
            )
        # a symlink loop inside an image folder, and a folder input through a loop
        folder = self.base / "input" / "loops"
        folder.mkdir(parents=True, exist_ok=True)
        self._png(folder / "ok.png")
        with contextlib.suppress(FileExistsError):
            (folder / "loop_a").symlink_to(folder / "loop_b")
            (folder / "loop_b").symlink_to(folder / "loop_a")
        graph = base_graph("ShieldSetFromImages", self.info["ShieldSetFromImages"], folder="loops")
        graph["n"]["inputs"].pop("images")
        self.expect_error("files", "ShieldSetFromImages", "folder", "folder with a symlink loop", graph, r"folder")
        graph = base_graph("ShieldSetFromImages", self.info["ShieldSetFromImages"], folder="loops/loop_a")
        graph["n"]["inputs"].pop("images")
        self.expect_refused("files", "ShieldSetFromImages", "folder", "a symlink loop as the folder", graph)

    @staticmethod
    def _png(path: pathlib.Path, size=(16, 16), colour=(200, 10, 10)) -> None:
        from PIL import Image

        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(path)

    def damaged_sets(self) -> None:
        import torch
        from safetensors.torch import save_file

        folder = self.sets_dir / "hostile_damaged"
        folder.mkdir(parents=True, exist_ok=True)
        good = (self.sets_dir / GOOD_SET).read_bytes()
        (header_size,) = struct.unpack("<Q", good[:8])
        files = {
            "truncated": good[: len(good) // 2],
            "header_only": good[: 8 + header_size],
            "empty_file": b"",
            "seven_bytes": b"\x01\x02\x03\x04\x05\x06\x07",
            "huge_header_length": struct.pack("<Q", 2**62) + good[8:],
            "header_not_json": struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 32,
            "header_a_list": struct.pack("<Q", 2) + b"[]",
            "text_file": b"hello, I am not a tensor file\n" * 10,
            "a_pickle": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01a\x94K\x01s.",
            "offsets_past_end": good.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1),
        }
        for name, data in files.items():
            (folder / f"{name}.safetensors").write_bytes(data)
        metadata_cases = {
            "meta_names_number": {"names": "5"},
            "meta_settings_list": {"settings": "[1, 2]"},
            "meta_version_9": {"shield_format_version": "9"},
            "meta_format_empty": {"latent_format": ""},
            "meta_hashes_short": {"hashes": "[]"},
            "meta_shape_wrong": {"latent_shape": "[1, 2, 3]"},
            "meta_count_text": {"count": "many"},
            "meta_count_bool": {"count": "true"},
            "meta_names_huge": {"names": json.dumps(["n"] * 100000)},
        }
        from safetensors import safe_open

        with safe_open(str(self.sets_dir / GOOD_SET), framework="pt") as handle:
            metadata = handle.metadata()
            latents = handle.get_tensor("latents")
        for name, change in metadata_cases.items():
            save_file({"latents": latents}, str(folder / f"{name}.safetensors"), metadata={**metadata, **change})
        save_file({"latents": latents.to(torch.int32)}, str(folder / "int_latents.safetensors"), metadata=metadata)
        save_file(
            {"latents": latents, "images": torch.zeros(2, 3)}, str(folder / "bad_images.safetensors"), metadata=metadata
        )
        save_file(
            {"latents": latents[:0]},
            str(folder / "zero_rows.safetensors"),
            metadata={**metadata, "count": "0", "names": "[]", "hashes": "[]"},
        )
        self.info = pack_nodes(self.server)
        options = self.info["ShieldLoadShieldSet"]["input"]["required"]["filename"][1]["options"]
        for path in sorted(folder.iterdir()):
            name = f"hostile_damaged/{path.name}"
            if name not in options:
                self.record("files", "ShieldLoadShieldSet", "filename", name, "listed", False, "not offered")
                continue
            graph = base_graph("ShieldLoadShieldSet", self.info["ShieldLoadShieldSet"], filename=name)
            self.expect_error(
                "files", "ShieldLoadShieldSet", "filename", name, graph, rf"Load Shield Set: {re.escape(path.name)}"
            )
        # SPELL through a damaged search-index cache beside a good set: only a cache, rebuilt
        index = self.sets_dir / (GOOD_SET + ".shield-index")
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_bytes(b"garbage index")
        graph = base_graph(
            "ShieldSparseRepellency", self.info["ShieldSparseRepellency"], shield_set=["load", 0], search="clustered"
        )
        graph["load"] = {"class_type": "ShieldLoadShieldSet", "inputs": {"filename": GOOD_SET}}
        self.expect_runs("files", "ShieldSparseRepellency", "search", "clustered with a damaged index cache", graph)

    def image_folders(self, outside: pathlib.Path) -> None:
        node = "ShieldSetFromImages"
        info = self.info[node]
        input_dir = self.base / "input"

        def graph_for(folder):
            graph = base_graph(node, info, folder=folder)
            graph["n"]["inputs"].pop("images")
            return graph

        for folder in ("..", "../..", "/", "/etc", "/tmp", "a/../../..", "x" * 300, "nul\x00", " ", "../input_x"):
            self.expect_refused("files", node, "folder", folder, graph_for(folder))
        self.expect_error("files", node, "folder", "missing folder", graph_for("does_not_exist"), r"folder")
        (input_dir / "afile.txt").write_text("x")
        self.expect_error("files", node, "folder", "a file, not a folder", graph_for("afile.txt"), r"folder")
        cases = {
            "emptyf": {},
            "textonly": {"notes.txt": b"text"},
            "corrupt": {"bad.png": b"\x89PNG\r\n\x1a\n broken"},
            "zero": {"zero.png": b""},
            "truncated": {"cut.png": None},
        }
        for folder, files in cases.items():
            path = input_dir / folder
            path.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                if data is None:
                    self._png(path / "full.png", size=(64, 64))
                    whole = (path / "full.png").read_bytes()
                    (path / "full.png").unlink()
                    data = whole[: len(whole) // 2]
                (path / name).write_bytes(data)
            self.expect_error("files", node, "folder", f"{folder} folder", graph_for(folder), r"folder")
        # odd but valid images: 16-bit, palette with transparency, CMYK, 1x1, animated GIF, a FIFO named .png
        from PIL import Image

        odd = input_dir / "odd"
        odd.mkdir(exist_ok=True)
        Image.new("I;16", (20, 10), 300).save(odd / "sixteen.png")
        Image.new("P", (8, 8)).save(odd / "palette.png", transparency=0)
        Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(odd / "cmyk.jpg")
        Image.new("RGB", (1, 1)).save(odd / "one.bmp")
        frames = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(3)]
        frames[0].save(odd / "anim.gif", save_all=True, append_images=frames[1:])
        Image.new("LA", (8, 8)).save(odd / "la.webp")
        with contextlib.suppress(OSError):
            os.mkfifo(odd / "pipe.png")
        self.expect_runs("files", node, "folder", "odd image modes and a FIFO", graph_for("odd"), timeout=60)
        # a symlinked image that points outside input/
        self._png(outside / "secret.png")
        links = input_dir / "links"
        links.mkdir(exist_ok=True)
        self._png(links / "mine.png")
        with contextlib.suppress(FileExistsError):
            (links / "secret.png").symlink_to(outside / "secret.png")
        self.expect_error("files", node, "folder", "symlinked image outside input", graph_for("links"), r"symlink")

    # -- memory ------------------------------------------------------------------------------------------
    def memory(self) -> None:
        node = "ShieldMemory"
        info = self.info[node]
        for memory_id in ("", "   "):
            self.expect_refused("memory", node, "memory_id", memory_id, base_graph(node, info, memory_id=memory_id))
        for memory_id in ("../x", "a/b", ".hidden", "x" * 101, "émoji", "nul\x00", "file:x", "C:\\x"):
            graph = base_graph(node, info, memory_id=memory_id, store="file")
            self.expect_refused("memory", node, "memory_id", f"{memory_id} (file store)", graph)
        for memory_id in ("any name / é 名", "x" * 5000):
            self.expect_runs(
                "memory",
                node,
                "memory_id",
                f"{shown(memory_id)} (server store)",
                base_graph(node, info, memory_id=memory_id),
            )
        memories = self.sets_dir / "memories"
        memories.mkdir(parents=True, exist_ok=True)
        damaged = {
            "garbage": b"this is not a memory file",
            "header_only": b"SHIELD-MEMORY v1\n",
            "bad_magic": b"SHIELD-MEMORY v1\n" + b"XXXX" + b"\x00" * 40,
            "huge_length": b"SHIELD-MEMORY v1\n" + struct.pack("<4sQ32s", b"SMR1", 2**62, b"\x00" * 32),
            "bad_checksum": b"SHIELD-MEMORY v1\n" + struct.pack("<4sQ32s", b"SMR1", 4, b"\x00" * 32) + b"abcd",
        }
        for kind, data in damaged.items():
            memory_id = f"hostile_{kind}"
            (memories / f"{memory_id}.shield-memory").write_bytes(data)
            graph = base_graph(node, info, memory_id=memory_id, store="file")
            if kind in ("header_only", "huge_length"):  # an empty memory; a torn last record (ignored)
                self.expect_runs("memory", node, "memory_id", f"{memory_id} memory file", graph)
            else:
                self.expect_error("memory", node, "memory_id", f"{memory_id} memory file", graph, r"damaged.*reset")
                (memories / f"{memory_id}.shield-memory").write_bytes(data)
        # a memory folder that is a file; a memory file that is a folder
        (memories / "hostile_adir.shield-memory").mkdir(exist_ok=True)
        graph = base_graph(node, info, memory_id="hostile_adir", store="file")
        self.expect_error("memory", node, "memory_id", "memory file is a folder", graph, r"memory")
        # Redis: a dead server, malformed URLs; each answers within the bounded time, naming redis_url
        for url in (
            "redis://127.0.0.1:1/0",
            "not a url",
            "http://127.0.0.1:6379/0",
            "redis://127.0.0.1:99999/0",
            "redis://127.0.0.1:6379/notanumber",
            "redis://",
        ):
            started = time.monotonic()
            graph = base_graph(node, info, memory_id="shared", store="redis", redis_url=url)
            self.expect_error("memory", node, "redis_url", url, graph, r"redis_url", timeout=60)
            self.record(
                "memory",
                node,
                "redis_url",
                url,
                "answers within 15 s",
                time.monotonic() - started < 15,
                f"{time.monotonic() - started:.1f} s",
            )
        # the memory routes of the frontend with hostile bodies
        for body in (
            {"memory_id": "../x", "store": "file"},
            {"memory_id": ""},
            {"store": "bogus", "memory_id": "a"},
            [],
            "x",
        ):
            try:
                self.server.post("/shield/memory/reset", body)
                ok, observed = False, "accepted"
            except Exception as error:  # noqa: BLE001
                ok, observed = "400" in str(error), str(error)
            self.record("memory", "route /shield/memory/reset", "body", body, "400 with a message", ok, observed)

    # -- interrupts --------------------------------------------------------------------------------------
    def interrupts(self) -> None:
        import torch

        info = self.info
        fresh_prefix = "hostile/fresh"
        graph = base_graph("ShieldSparseRepellencyKSampler", info["ShieldSparseRepellencyKSampler"], steps=8, seed=5)
        graph["out"] = _save_latent(["n", 0], fresh_prefix)
        fresh = self.expect_runs("interrupts", "ShieldSparseRepellencyKSampler", "-", "fresh run", graph)
        long_runs = {
            "ShieldSparseRepellencyKSampler": base_graph(
                "ShieldSparseRepellencyKSampler", info["ShieldSparseRepellencyKSampler"], steps=10000, seed=6
            ),
            "ShieldSparseRepellency": {
                **base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"]),
                "ks": _sampler(["n", 0], ["mem", 1], ["empty", 0], steps=10000),
            },
            "ShieldTransitionPointCFG": {
                **base_graph("ShieldTransitionPointCFG", info["ShieldTransitionPointCFG"]),
                "ks": _sampler(["n", 0], ["mem", 1], ["empty", 0], steps=10000, cfg=2.0),
            },
            "ShieldProCreateGuidance": {
                **base_graph(
                    "ShieldProCreateGuidance",
                    info["ShieldProCreateGuidance"],
                    gradient_mode="exact",
                    look_ahead_steps=5,
                ),
                "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0], steps=10000),
            },
            "ShieldEmbeddingRepellency": {
                **base_graph("ShieldEmbeddingRepellency", info["ShieldEmbeddingRepellency"]),
                "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0], steps=10000),
            },
            "ShieldEarlyCopyRedraw": {  # every check heads into a shield: a thousand look-aheads of 5000 steps
                **base_graph(
                    "ShieldEarlyCopyRedraw",
                    info["ShieldEarlyCopyRedraw"],
                    similarity=-1.0,
                    check_percent=0.5,
                    max_attempts=1000,
                ),  # fmt: skip
                "ks": _sampler(["n", 0], ["memrgb", 1], ["rgb", 0], steps=10000),
            },
            "ShieldMemorizationRisk": base_graph(
                "ShieldMemorizationRisk", info["ShieldMemorizationRisk"], steps=10000, probe_steps=50
            ),
        }
        memory_graph = base_graph("ShieldSparseRepellency", info["ShieldSparseRepellency"], shield_set=["memory", 0])
        memory_graph["memory"] = {
            "class_type": "ShieldMemory",
            "inputs": {"memory_id": "hostile_interrupted", "reset": False, "store": "file"},
        }
        memory_graph["ks"] = _sampler(["n", 0], ["mem", 1], ["empty", 0], steps=10000)
        long_runs["ShieldMemory"] = memory_graph
        many = self.base / "input" / "many"
        many.mkdir(parents=True, exist_ok=True)
        for index in range(400):
            self._png(many / f"{index:04d}.png", size=(8, 8), colour=(index % 255, 0, 0))
        folder_graph = base_graph(
            "ShieldSetFromImages", info["ShieldSetFromImages"], folder="many", width=2048, height=2048
        )
        folder_graph["n"]["inputs"].pop("images")
        long_runs["ShieldSetFromImages"] = folder_graph
        for node_id, graph in long_runs.items():
            status, body = self.post(graph)
            if status != 200:
                self.record("interrupts", node_id, "-", "long run", "accepted", False, self.errors_text(body))
                continue
            time.sleep(2.0)
            started = time.monotonic()
            self.interrupt()
            state, text, _ = self.wait(body["prompt_id"], 30)
            took = time.monotonic() - started
            stuck = self.settle()
            # the risk probe is short by design (at most 50 steps): it may finish before the interrupt arrives
            finished_first = state == "success" and node_id == "ShieldMemorizationRisk"
            ok = (state == "interrupted" or finished_first) and took < 10 and not stuck
            self.record(
                "interrupts",
                node_id,
                "-",
                "/interrupt after 2 s",
                "stops within 10 s",
                ok,
                f"{state} after {took:.1f} s: {text[:200]} {stuck or ''}",
            )
        memory_file = self.sets_dir / "memories" / "hostile_interrupted.shield-memory"
        size = memory_file.stat().st_size if memory_file.exists() else 0
        self.record(
            "interrupts",
            "ShieldMemory",
            "-",
            "after an interrupted run",
            "no entry written",
            size <= len(b"SHIELD-MEMORY v1\n"),
            f"{size} bytes",
        )
        memory_graph["ks"] = _sampler(["n", 0], ["mem", 1], ["empty", 0], steps=3)
        self.expect_runs(
            "interrupts",
            "ShieldMemory",
            "-",
            "the same memory graph, not interrupted",
            memory_graph,
            check=lambda outputs: (
                None
                if memory_file.exists() and memory_file.stat().st_size > size
                else "the finished run was not remembered"
            ),
        )
        leftovers = [p for p in self.sets_dir.rglob("*.tmp")] + [p for p in self.sets_dir.rglob(".shield-*")]
        self.record("interrupts", "-", "-", "temp files", "none left", not leftovers, str(leftovers[:3]))
        graph = base_graph("ShieldSparseRepellencyKSampler", info["ShieldSparseRepellencyKSampler"], steps=8, seed=5)
        graph["out"] = _save_latent(["n", 0], fresh_prefix + "_again")
        again = self.expect_runs(
            "interrupts", "ShieldSparseRepellencyKSampler", "-", "the same run after the interrupts", graph
        )
        if fresh and again:
            a, b = self.server.saved_latent(fresh, "out"), self.server.saved_latent(again, "out")
            self.record(
                "interrupts",
                "ShieldSparseRepellencyKSampler",
                "-",
                "after interrupts",
                "same output as fresh",
                torch.equal(a, b),
                f"max diff {float((a - b).abs().max()):.3g}",
            )

    # -- DreamSim files present but damaged (no network: the strace/proxy sections judge) ------------------
    def dreamsim(self) -> None:
        node = "ShieldDreamSimLoader"
        folder = self.base / "models" / "dreamsim"
        folder.mkdir(parents=True, exist_ok=True)
        variants = self.info[node]["input"]["required"]["variant"][1]["options"]
        for variant in ("ensemble", "dino_vitb16", "dinov2_vitb14"):
            self.expect_refused(
                "dreamsim", node, "variant", variant, base_graph(node, self.info[node], variant=variant)
            )
        names = {
            "open_clip_vitb32": ["open_clip_vitb32_pretrain.pth.tar", "open_clip_vitb32_single_lora"],
            "clip_vitb32": ["clip_vitb32_pretrain.pth.tar", "clip_vitb32_single_lora"],
            "synclr_vitb16": ["synclr_vit_b_16.pth", "synclr_vitb16_single_lora"],
        }
        for variant in variants:
            self.expect_error(
                "dreamsim",
                node,
                "variant",
                f"{variant} missing",
                base_graph(node, self.info[node], variant=variant),
                r"missing|Nothing is downloaded",
            )
        corrupt_adapter = {"adapter_config.json": b"{not json", "adapter_model.safetensors": b"junk"}
        for variant, (weights, lora) in names.items():
            (folder / weights).write_bytes(b"corrupt weights")
            (folder / lora).mkdir(exist_ok=True)
            for name, data in corrupt_adapter.items():
                (folder / lora / name).write_bytes(data)
            graph = base_graph(node, self.info[node], variant=variant)
            self.expect_error("dreamsim", node, "variant", f"{variant} corrupt", graph, r"damaged|cannot read")
            # the weights as a pickle that is not weights-only: refused, never unpickled
            (folder / weights).write_bytes(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94.")
            self.expect_error("dreamsim", node, "variant", f"{variant} pickle", graph, r"damaged|cannot read")
            (folder / lora / "adapter_config.json").write_text(
                json.dumps({"r": 4, "lora_alpha": 8, "lora_dropout": 0, "bias": "none", "target_modules": ["qkv"]})
            )
            self.expect_error(
                "dreamsim", node, "variant", f"{variant} good config, bad weights", graph, r"damaged|cannot read"
            )
        written = sorted(p.name for p in folder.rglob("*") if "trusted_list" in p.name or p.suffix == ".py")
        self.record("dreamsim", node, "-", "files written by the loader", "none", not written, str(written))

    # -- everything -----------------------------------------------------------------------------------
    def run_all(self, outside: pathlib.Path, sections: Optional[list[str]] = None) -> None:
        plan = [
            ("base", self.base_graphs_run),
            ("widgets", self.widget_literals),
            ("widgets-mixed", self.one_bad_value_does_not_shield_another),
            ("linked", self.linked_hostile_values),
            ("extremes", self.extremes),
            ("relations", self.relations),
            ("shapes", self.shapes),
            ("names", self.file_names),
            ("clobber", self.no_clobber),
            ("prefixes", self.certificate_prefixes),
            ("symlinks", lambda: self.symlinks(outside)),
            ("damaged", self.damaged_sets),
            ("folders", lambda: self.image_folders(outside)),
            ("memory", self.memory),
            ("dreamsim", self.dreamsim),
            ("interrupts", self.interrupts),
        ]
        for name, section in plan:
            if sections and name not in sections:
                continue
            started = time.monotonic()
            try:
                section()
            except Exception as error:  # noqa: BLE001  a broken section is a result, not the end
                import traceback

                self.record(
                    name,
                    "-",
                    "-",
                    "-",
                    "section completes",
                    False,
                    f"{type(error).__name__}: {error}\n{traceback.format_exc()}",
                )
            self.log(f"section {name}: {time.monotonic() - started:.1f} s, {len(self.failures())} failures so far")
            if self.server.process.poll() is not None:
                self.record(name, "-", "-", "-", "server alive", False, self.server.log_tail())
                break


# -- strace: network and writes outside the base directory --------------------------------------------------
CONNECT = re.compile(
    r"connect\(\d+, \{sa_family=(AF_INET6?|AF_UNIX)[^}]*?(?:sin6?_port=htons\((\d+)\))?[^}]*?(?:inet_addr\(\"([^\"]+)\"\)|inet_pton\(AF_INET6, \"([^\"]+)\"|sun_path=\"([^\"]*)\")"
)

WRITE_CALL = re.compile(
    r"(openat|open|creat|rename|renameat2?|unlink|unlinkat|mkdir|mkdirat|link|linkat|symlink|symlinkat)\((.*)"
)
PACK_INIT = "comfyui_shield/__init__.py"


def strace_findings(trace_dir: pathlib.Path, base: pathlib.Path) -> tuple[list[str], list[str], int]:
    """(network connects to anything but loopback, paths written outside `base` once the pack loads, how many
    writes inside `base` were seen: proof that the trace was read) from `strace -ff -ttt` output. Writes
    before the pack's __init__ is opened are ComfyUI's own start-up (e.g. torch's inductor cache probe in
    /tmp) and are not the pack's doing."""
    lines = []
    for path in trace_dir.glob("trace*"):
        for line in path.read_text(errors="replace").splitlines():
            stamp, _, call = line.partition(" ")
            with contextlib.suppress(ValueError):
                lines.append((float(stamp), call))
    pack_loaded = min((t for t, call in lines if PACK_INIT in call), default=0.0)
    network, writes, inside = [], set(), 0
    allowed_prefixes = (str(base), "/dev/", "/proc/", "/sys/")
    for stamp, line in lines:
        if line.startswith("connect("):
            match = CONNECT.search(line)
            if match is None:
                network.append(line.strip())
            elif match.group(1) != "AF_UNIX" and (match.group(3) or match.group(4)) not in LOOPBACK:
                network.append(line.strip())
            continue
        match = WRITE_CALL.match(line)
        if not match or stamp < pack_loaded or "= -1" in line:
            continue
        call, arguments = match.groups()
        if call in ("openat", "open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", arguments):
            continue
        for quoted in re.findall(r"\"([^\"]*)\"", arguments):
            if quoted.startswith("/") and not quoted.startswith(allowed_prefixes):
                writes.add(f"{call} {quoted}")
            inside += quoted.startswith(str(base))
    return network, sorted(writes), inside if pack_loaded else 0


LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-strace", action="store_true", help="do not run the server under strace")
    parser.add_argument("--keep", action="store_true", help="keep the server's base directory")
    parser.add_argument("--sections", nargs="*", help="only these sections (names as printed)")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args(argv)

    from . import server as server_module
    from .outbound import OutboundRecorder

    work = pathlib.Path(tempfile.mkdtemp(prefix="shield-hostile-"))
    base, outside, traces = work / "base", work / "outside", work / "strace"
    for folder in (base, outside, traces):
        folder.mkdir()
    use_strace = not args.no_strace and shutil.which("strace") is not None
    real_popen = subprocess.Popen
    if use_strace:

        def traced_popen(command, *a, **k):
            wrapped = [
                "strace",
                "-f",
                "-ff",
                "-qq",
                "-ttt",
                "-e",
                "trace=connect,openat,creat,rename,renameat,renameat2,"
                "unlink,unlinkat,mkdir,mkdirat,link,linkat,symlink,symlinkat",
                "-o",
                str(traces / "trace"),
                *command,
            ]
            return real_popen(wrapped, *a, **k)

        server_module.subprocess.Popen = traced_popen
    recorder = OutboundRecorder()
    comfy = server_module.ComfyServer(base, extra_env=recorder.env())
    started = time.monotonic()
    try:
        comfy.start(timeout=300)
        server_module.subprocess.Popen = real_popen
        print(f"server up in {time.monotonic() - started:.0f} s at {comfy.url} (strace: {use_strace})", flush=True)
        battery = Battery(comfy, log=lambda text: print(text, flush=True))
        battery.setup()
        battery.run_all(outside, args.sections)
        proxy = [a[:120] for a in recorder.attempts]
        battery.record("network", "server", "-", "-", "no request through the proxy", not proxy, str(proxy))
    finally:
        server_module.subprocess.Popen = real_popen
        comfy.stop()
        recorder.close()
    if use_strace:
        network, writes, inside = strace_findings(traces, base)
        battery.record(
            "writes", "strace", "-", "-", "the trace was read", inside > 0, f"{inside} writes inside the base"
        )
        battery.record("network", "server", "connect()", "-", "loopback only", not network, "; ".join(network[:10]))
        harmless = [w for w in writes if "__pycache__" in w or w.endswith(".pyc")]
        writes = [w for w in writes if w not in harmless]
        battery.record(
            "writes", "server", "files", "-", "nothing outside the base directory", not writes, "; ".join(writes[:20])
        )
    print(battery.summary())
    for result in battery.failures():
        print(result.line())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in battery.results], indent=1))
    print(f"{time.monotonic() - started:.0f} s in all; work folder {work}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if battery.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
