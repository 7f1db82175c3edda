"""The naive batched baseline (eft_fast.naive_loop.naive_batched_generate): left padding, HF
caches, static batches. With the fp64 reference op as its sampler it must give the engine's
tokens and the one-at-a-time loop's, for prompts of different lengths and different
max_tokens in one batch (the padding is invisible to every row)."""
from __future__ import annotations

import torch

import eft_fast
from eft_fast.naive_loop import naive_batched_generate
from engine_helpers import VOCAB, reference_generate, tiny_engine


def _reference_combine(prompts, params):
    """Per-row seeds and positions (len(prompt) + step), as the engine's noise is keyed."""
    seeds = torch.tensor([p.seed for p in params])

    def combine(logits, step):
        knowledge, tuned, reference = logits
        positions = torch.tensor([len(p) + step for p in prompts])
        tokens, _ = eft_fast.eft_sample(knowledge, tuned[None], reference[None], seeds, positions,
                                        temperature=params[0].temperature, weight_top_p=params[0].weight_top_p,
                                        vocab_size=VOCAB, backend="torch")
        return tokens

    return combine


def test_batched_loop_matches_the_engine_and_the_one_at_a_time_loop(family, rng):
    knowledge, (tuned,), reference = family
    lengths = [3, 11, 1, 7, 5]
    prompts = [torch.randint(0, VOCAB, (n,), generator=rng).tolist() for n in lengths]
    max_tokens = [6, 2, 9, 1, 4]
    params = [eft_fast.SamplingParams(max_tokens=m, temperature=1.0, weight_top_p=0.9, seed=100 + i,
                                      ignore_eos=True) for i, m in enumerate(max_tokens)]
    got = naive_batched_generate([knowledge, tuned, reference], prompts, _reference_combine(prompts, params),
                                 max_tokens, pad_token_id=VOCAB - 1)
    assert [len(g) for g in got] == max_tokens
    engine = tiny_engine(family)
    want = [list(o.token_ids) for o in engine.generate(prompts, params)]
    assert got == want
    assert got[0] == reference_generate(knowledge, [tuned], reference, prompts[0], params[0])


def test_batched_loop_of_one_row_is_the_one_at_a_time_loop(family, rng):
    knowledge, (tuned,), reference = family
    prompt = torch.randint(0, VOCAB, (9,), generator=rng).tolist()
    params = [eft_fast.SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, seed=3)]
    got = naive_batched_generate([knowledge, tuned, reference], [prompt], _reference_combine([prompt], params), [7])
    assert got[0] == reference_generate(knowledge, [tuned], reference, prompt, params[0])
