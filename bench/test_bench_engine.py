"""pytest-benchmark suite for the engine on the synthetic family (eft_fast.bench.synthetic):
one decode step (providers "naive": the naive loop's step, three HF forwards with their own
caches and the eager torch sampler per sequence; "eft_fast": one EFTEngine.step) and one
speculative round, on one intra-op thread.

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Not part of the default test run (pytest's testpaths is tests/).
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from eft_fast.baselines import eager_eft_sample
from eft_fast.bench.synthetic import FamilySpec, build_family
from eft_fast.engine.engine import EFTEngine
from eft_fast.engine.sampling_params import SamplingParams

PROMPT_LEN = 32
ROUNDS = 24
MAX_TOKENS = 400            # room for ROUNDS steps (or speculative rounds) after the warm-up ones


@pytest.fixture(scope="module")
def family():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_family(FamilySpec())
    torch.set_num_threads(threads)


def _prompts(vocab: int, batch: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (PROMPT_LEN,), generator=gen).tolist() for _ in range(batch)]


def _engine(family, batch: int, **config) -> EFTEngine:
    engine = EFTEngine(knowledge=family.knowledge, tuned=family.tuned, reference=family.reference,
                       max_num_seqs=16, max_model_len=PROMPT_LEN + MAX_TOKENS + 20, **config)
    for i, prompt in enumerate(_prompts(family.spec.vocab_size, batch)):
        engine.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS, weight_top_p=0.9, seed=i, ignore_eos=True))
    engine.step()                                   # the prefill
    return engine


class NaiveStep:
    """The naive loop's state for ``batch`` sequences: one DynamicCache per model and sequence."""

    def __init__(self, family, batch: int):
        self.models = [family.knowledge, family.tuned, family.reference]
        self.prompts = _prompts(family.spec.vocab_size, batch)
        self.caches = [[DynamicCache() for _ in self.models] for _ in self.prompts]
        self.gen = torch.Generator().manual_seed(0)
        self.last = [self._forward(b, p) for b, p in enumerate(self.prompts)]
        self.length = PROMPT_LEN

    @torch.inference_mode()
    def _forward(self, b: int, ids: list[int]) -> int:
        positions = torch.arange(self.caches[b][0].get_seq_length(), self.caches[b][0].get_seq_length() + len(ids))
        logits = [m(input_ids=torch.tensor([ids]), position_ids=positions[None], past_key_values=c,
                    use_cache=True).logits[:, -1] for m, c in zip(self.models, self.caches[b])]
        return int(eager_eft_sample(*logits, weight_top_p=0.9, generator=self.gen)[0])

    def step(self) -> None:
        self.last = [self._forward(b, [t]) for b, t in enumerate(self.last)]


@pytest.mark.parametrize("batch", [1, 16], ids=["B1", "B16"])
@pytest.mark.parametrize("provider", ["naive", "eft_fast"])
def test_decode_step(benchmark, family, provider, batch):
    benchmark.group = f"EFT decode step, B={batch}"
    step = NaiveStep(family, batch).step if provider == "naive" else _engine(family, batch).step
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_speculative_round(benchmark, family, k):
    """One draft-and-verify round (k drafts, exact acceptance) at batch 1."""
    benchmark.group = "speculative EFT round, B=1"
    engine = _engine(family, 1, speculative_k=k)
    benchmark.pedantic(engine.step, rounds=ROUNDS // 2, iterations=1, warmup_rounds=1)
    metrics = engine.output(0).metrics
    benchmark.extra_info["acceptance_rate"] = metrics.acceptance_rate
