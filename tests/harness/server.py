"""The real ComfyUI server, started on a free loopback port with the pack loaded.

Everything the server writes (models, input, output, temp, user, its database) lives under one base
directory, so a test run touches nothing of the host's. The server runs in its own process group
and `stop()` ends that group by pid, whatever the test did.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

from .host import comfyui_dir, link_pack


def stop_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL or a timeout (its
    own session keeps it out of the test's process group, so nothing else would stop it; orphaned
    servers were found holding ports and CPU after killed runs)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


IMPORT_FAILURE = re.compile(r"Cannot import (.+?) module for custom nodes")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerError(RuntimeError):
    pass


class ComfyServer:
    def __init__(self, base_dir: pathlib.Path, extra_args: tuple[str, ...] = (), extra_env: dict | None = None):
        self.base_dir = base_dir
        self.extra_env = dict(extra_env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base_dir / "server.log"
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        link_pack(custom_nodes)
        command = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base_dir),
            "--disable-auto-launch",
            "--use-pytorch-cross-attention",
            "--database-url",
            f"sqlite:///{self.base_dir / 'comfyui.db'}",
            *self.extra_args,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **self.extra_env)
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            command,
            cwd=comfyui_dir(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=stop_with_parent,
        )
        log.close()
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.3)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def kill(self) -> None:
        """SIGKILL, as a crash or an out-of-memory kill would end it: no cleanup runs."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def import_failures(self) -> list[str]:
        """Custom-node folders ComfyUI failed to import (it logs the error and carries on).

        Core modules that need packages this host leaves out (torchaudio for the audio nodes) fail
        the same way; only folders in this server's custom_nodes count.
        """
        custom_nodes = str(self.base_dir / "custom_nodes")
        return [path for path in IMPORT_FAILURE.findall(self.log()) if path.startswith(custom_nodes)]

    # -- HTTP ------------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body else None

    def post(self, path: str, payload: dict, timeout: float = 30):
        request = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            raise ServerError(f"POST {path} -> {error.code}: {error.read().decode(errors='replace')}") from error
        return json.loads(body) if body else None

    def object_info(self) -> dict:
        return self.get("/object_info")

    # -- running graphs --------------------------------------------------------------------------
    def queue(self, graph: dict) -> str:
        return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The history entry of a finished prompt; raises with the server's messages on error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise ServerError(f"prompt {prompt_id} failed: {json.dumps(status.get('messages'))[:4000]}")
                return entry
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        """Queue a graph, wait for it, and return its outputs by node id."""
        return self.wait(self.queue(graph), timeout)["outputs"]

    def output_path(self, image_info: dict) -> pathlib.Path:
        folder = {"output": "output", "temp": "temp", "input": "input"}[image_info["type"]]
        return self.base_dir / folder / image_info.get("subfolder", "") / image_info["filename"]

    # -- latent files ----------------------------------------------------------------------------
    def write_input_latent(self, name: str, latents) -> str:
        """Write `latents` [N, C, H, W] as input/<name>.latent for LoadLatent (unscaled: format version 0)."""
        import safetensors.torch
        import torch

        path = self.base_dir / "input" / f"{name}.latent"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"latent_tensor": latents.detach().float().contiguous(), "latent_format_version_0": torch.tensor([])}
        safetensors.torch.save_file(tensors, str(path))
        return path.name

    def saved_latent(self, outputs: dict, node_id: str, index: int = 0):
        """The tensor a SaveLatent node `node_id` wrote in this run."""
        import safetensors.torch

        info = outputs[node_id]["latents"][index]
        return safetensors.torch.load_file(str(self.output_path(info)))["latent_tensor"]
