"""The test servers stop when the test process that started them dies, even by SIGKILL (a killed or
timed-out run must not leave ComfyUI servers holding ports and CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_server_started_by_a_killed_test_process_stops():
    parent = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(
            """
            import subprocess, sys, time
            from harness.server import stop_with_parent
            child = subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(120)"],
                start_new_session=True, preexec_fn=stop_with_parent,
            )
            print(child.pid, flush=True)
            time.sleep(120)
            """
        )],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    child_pid = int(parent.stdout.readline())
    assert alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child_pid)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an orphan is reaped by init)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
