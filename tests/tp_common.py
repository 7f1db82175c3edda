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
