"""An `eft-fast serve` subprocess on 127.0.0.1 for benchmarks and tests: started on a free port,
waited for until /health answers, and always stopped (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from ..child_env import child_python_env

START_TIMEOUT_S = 300
STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: ``url``, ``process``, and ``log()`` (its output so far)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"the server did not become healthy in {timeout_s} s:\n{self.log()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit status (None if it was killed)."""
        if not self.alive():
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT_S)
            return None


@contextmanager
def running_server(serve_args: list[str], log_dir: Path, *, threads: int | None = None):
    """``eft-fast serve <serve_args> --host 127.0.0.1 --port <free>``, healthy; stopped on exit."""
    port = free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    command = [sys.executable, "-m", "eft_fast.cli", "serve", *serve_args, "--host", "127.0.0.1",
               "--port", str(port)]
    env = child_python_env(TOKENIZERS_PARALLELISM="false")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
