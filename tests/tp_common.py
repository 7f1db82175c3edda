"""Models and requests shared by the tensor-parallel tests and the program torchrun launches."""
from __future__ import annotations

import torch

from eft_fast import SamplingParams
from tiny_hf import byte_level_bpe
from tiny_models import tiny_model


def tokenizer():
    return byte_level_bpe()


def small_models(tok):
    """Two tuned models and a reference (they stay on rank 0)."""
    v = len(tok)
    return [tiny_model("llama", v, torch.float32, seed=20 + i) for i in range(2)], \
        tiny_model("llama", v, torch.float32, seed=30)


def save_knowledge(path, tok) -> str:
    tiny_model("llama", len(tok), torch.float32, seed=11, num_hidden_layers=3, hidden_size=96,
               intermediate_size=128).save_pretrained(path)
    return str(path)


def requests(vocab: int, n: int = 4, max_tokens: int = 6, seed: int = 0, weights: bool = False):
    """n random prompts with seeded temperature-1 sampling at weight_top_p 0.9."""
    rng = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(m),), generator=rng).tolist() for m in torch.randint(1, 9, (n,), generator=rng)]
    params = []
    for i in range(n):
        w = None
        if weights:
            a = float(torch.rand((), generator=rng))
            w = (a, 1.0 - a)
        params.append(SamplingParams(max_tokens=max_tokens, seed=1000 + i, ignore_eos=True, temperature=1.0,
                                     weight_top_p=0.9, reward_weights=w))
    return prompts, params


def fail_knowledge_forward(fail_at: int, once_marker: str | None = None) -> None:
    """Make this process's ``fail_at``-th knowledge forward (ModelRunner.run_model) raise
    RuntimeError("injected worker failure"); with ``once_marker`` (a file path) only if the
    file does not exist yet, which the failure creates (so a restarted worker does not fail)."""
    from pathlib import Path

    from eft_fast.engine.model_runner import ModelRunner

    run_model, calls = ModelRunner.run_model, []

    def failing_run_model(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at and (once_marker is None or not Path(once_marker).exists()):
            if once_marker is not None:
                Path(once_marker).touch()
            raise RuntimeError("injected worker failure")
        return run_model(self, *args, **kwargs)

    ModelRunner.run_model = failing_run_model


def failing_spawned_worker(rank, world_size, port, spec, errors=None):
    """A self-spawned worker whose third knowledge forward raises: once per marker file if
    EFT_TEST_TP_FAIL_MARKER names one, else in every worker (the restart tests' entry)."""
    import os

    from eft_fast.engine.parallel.worker import run_worker

    fail_knowledge_forward(3, os.environ.get("EFT_TEST_TP_FAIL_MARKER"))
    run_worker(rank, world_size, port, spec, errors)
