"""Shared pieces of the engine tests: a tiny fp64 EFT family and the naive reference loop."""
from __future__ import annotations

import torch

import eft_fast
from eft_fast.naive_loop import naive_generate
from tiny_models import tiny_model

VOCAB = 97


def tiny_family(dtype=torch.float64, num_tuned: int = 1, vocab: int = VOCAB):
    """knowledge (3 layers, wider), tuned model(s) and one reference, all random-init."""
    knowledge = tiny_model("llama", vocab, dtype, seed=11, num_hidden_layers=3, hidden_size=96, intermediate_size=128)
    tuned = [tiny_model("llama", vocab, dtype, seed=20 + i) for i in range(num_tuned)]
    reference = tiny_model("llama", vocab, dtype, seed=30)
    return knowledge, tuned, reference


def reference_generate(knowledge, tuned: list, reference, prompt: list[int], params: eft_fast.SamplingParams,
                       vocab_size: int = VOCAB) -> list[int]:
    """The naive loop (HF caches, one sequence) combined with the fp64 reference op."""
    models = ([knowledge] if knowledge is not None else []) + list(tuned) + ([reference] if reference is not None else [])
    k = 1 if knowledge is not None else 0
    weights = None if params.reward_weights is None else torch.tensor([list(params.reward_weights)], dtype=torch.float64)

    def combine(logits, step):
        tuned_logits = torch.stack([x[None] for x in logits[k:k + len(tuned)]])
        tokens, _ = eft_fast.eft_sample(
            logits[0][None] if knowledge is not None else None, tuned_logits,
            logits[-1][None] if reference is not None else None,
            torch.tensor([params.seed]), torch.tensor([len(prompt) + step]), reward_weights=weights,
            temperature=params.temperature, weight_top_p=params.weight_top_p, top_k=params.top_k, top_p=params.top_p,
            vocab_size=vocab_size, backend="torch")
        return int(tokens[0])

    return naive_generate(models, [prompt] * len(models), combine, params.max_tokens)
