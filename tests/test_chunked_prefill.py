"""Chunked prefill: prompts longer than a step's token budget are prefilled over several steps
that also carry the running requests' decode tokens; tokens never change."""
from __future__ import annotations

import pytest
import torch

import eft_fast
from engine_helpers import VOCAB, random_requests, tiny_engine


@pytest.mark.parametrize("speculative_k,accept,budget,num_blocks", [
    (0, "exact", 5, None), (0, "exact", 1, None), (2, "exact", 7, None), (3, "rejection", 6, None),
    (0, "exact", 6, 24), (2, "exact", 6, 24)])
def test_tokens_are_the_same_chunked_or_whole(family, rng, speculative_k, accept, budget, num_blocks):
    prompts, params = random_requests(rng, 8, max_tokens=7)
    prompts = [p * 3 for p in prompts]                                 # 3 to 27 tokens
    kw = dict(speculative_k=speculative_k, accept=accept, max_num_seqs=4, num_blocks=num_blocks)
    whole = tiny_engine(family, enable_chunked_prefill=False, enable_prefix_caching=False, **kw)
    chunked = tiny_engine(family, max_num_batched_tokens=budget, **kw)
    want = whole.generate(prompts, params)
    got = chunked.generate(prompts, params)
    assert [o.token_ids for o in got] == [w.token_ids for w in want]
    assert [o.finish_reason for o in got] == [w.finish_reason for w in want]
    assert not any(chunked.stats()["kv_blocks_used"].values())


def test_a_long_prompt_does_not_stall_decoding(family, rng):
    engine = tiny_engine(family, max_num_batched_tokens=8)
    short = engine.add_request([1, 2, 3], eft_fast.SamplingParams(max_tokens=30, seed=1, ignore_eos=True))
    engine.step()
    long_prompt = torch.randint(0, VOCAB, (40,), generator=rng).tolist()
    long = engine.add_request(long_prompt, eft_fast.SamplingParams(max_tokens=2, seed=2, ignore_eos=True))
    counts = []
    while not engine._requests[long].output_ids:
        before = len(engine._requests[short].output_ids)
        engine.step()
        counts.append(len(engine._requests[short].output_ids) - before)
    assert len(counts) == 6 and counts == [1] * 6       # 40 prompt tokens at 7 per step (+1 decode token each)
    whole = tiny_engine(family, enable_chunked_prefill=False).generate(
        [long_prompt], eft_fast.SamplingParams(max_tokens=2, seed=2, ignore_eos=True))[0]
    while engine.has_unfinished():
        engine.step()
    assert engine.output(long).token_ids == whole.token_ids


def test_prompt_scoring_requests_are_not_split(family, rng):
    engine = tiny_engine(family, max_num_batched_tokens=4)
    prompt = torch.randint(0, VOCAB, (13,), generator=rng).tolist()
    params = eft_fast.SamplingParams(max_tokens=2, seed=3, prompt_logprobs=2)
    got, = engine.generate([prompt], params)
    want, = tiny_engine(family, enable_chunked_prefill=False).generate([prompt], params)
    assert got.prompt_logprobs == want.prompt_logprobs and got.token_ids == want.token_ids
