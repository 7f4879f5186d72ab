"""A recorder of network attempts: a loopback listener that a server process is told is its HTTP(S) proxy.

Every HTTP client the pack's dependencies use (urllib for torch.hub, requests/httpx for
huggingface_hub and peft) sends its request to the proxy named in the environment, so any attempt of
that process to reach the network lands here, is recorded, and is refused. Loopback addresses stay
direct (NO_PROXY), so the tests can still talk to the server.
"""

from __future__ import annotations

import socket
import threading

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class OutboundRecorder:
    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.5)
        self.port = self._listener.getsockname()[1]
        self.attempts: list[bytes] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="outbound-recorder", daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        proxy = f"http://127.0.0.1:{self.port}"
        return {
            **{name: proxy for name in PROXY_VARIABLES},
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self.attempts.append(connection.recv(512))  # e.g. b"CONNECT github.com:443 HTTP/1.1"
                except OSError:
                    self.attempts.append(b"")

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()
