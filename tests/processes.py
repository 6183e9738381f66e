"""Real processes for the deployment tests: a free port, the venv's console scripts, running a
command that must succeed, and stopping a process group politely, then firmly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """The venv's console script `name` (prefect, ft-pipeline), else whatever PATH finds."""
    path = BIN / name
    return str(path) if path.exists() else name


def stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def run_ok(args: list[str], env: dict[str, str], timeout: float = 120) -> str:
    """Run a command from the project root; its output, or an assertion showing its tail."""
    done = subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{out[-4000:]}"
    return out
