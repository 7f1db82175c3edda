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


def tiny_engine(family, **kw) -> eft_fast.EFTEngine:
    """An engine over ``tiny_family()`` models: backend "torch" and 4-token blocks unless given."""
    knowledge, tuned, reference = family
    kw = {"block_size": 4, "backend": "torch", **kw}
    return eft_fast.EFTEngine(knowledge=knowledge, tuned=tuned[0] if len(tuned) == 1 else tuned,
                              reference=reference, **kw)


def random_requests(rng, n: int, max_tokens: int, settings=({"temperature": 0.0}, {"temperature": 1.0},
                                                             {"temperature": 0.7})):
    """n random token-id prompts (1-9 tokens) and SamplingParams cycling through ``settings``
    (random seeds, ignore_eos)."""
    lengths = torch.randint(1, 10, (n,), generator=rng).tolist()
    prompts = [torch.randint(0, VOCAB, (m,), generator=rng).tolist() for m in lengths]
    seeds = torch.randint(0, 2**62, (n,), generator=rng).tolist()
    params = [eft_fast.SamplingParams(max_tokens=max_tokens, seed=s, ignore_eos=True, **settings[i % len(settings)])
              for i, s in enumerate(seeds)]
    return prompts, params


class RaiseOnCall:
    """Wraps ``fn``; call number ``n`` (1-based; None = every call) raises ``exc`` instead."""

    def __init__(self, fn, n: int | None, exc: BaseException):
        self.fn, self.n, self.exc, self.calls = fn, n, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.n is None or self.calls == self.n:
            raise self.exc
        return self.fn(*args, **kwargs)


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
