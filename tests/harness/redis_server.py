"""A real redis-server (Debian's package) started by a test: loopback only, bounded memory, its data in the
test's folder, durable appends (`appendfsync always`), stopped by pid in `finally`."""

from __future__ import annotations

import os
import pathlib
import shutil
import signal
import subprocess
import time

from .server import free_port, stop_with_parent


class RedisServer:
    def __init__(self, folder: pathlib.Path, port: int | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 20.0) -> "RedisServer":
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            "redis-server",
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--protected-mode", "yes",
            "--dir", str(self.folder),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--maxmemory", "512mb",
            "--daemonize", "no",
            "--logfile", str(self.folder / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, start_new_session=True, stdout=subprocess.DEVNULL, preexec_fn=stop_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.client().ping()
                return self
            except Exception:  # noqa: BLE001 (not up yet: connection refused, loading the AOF)
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"redis-server did not answer within {timeout} s: {self.log_tail()}")

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_timeout=5)

    def kill(self) -> None:
        """SIGKILL: what a crash of the store looks like to its clients."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=grace)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self) -> str:
        log = self.folder / "redis.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-20:]) if log.exists() else ""
