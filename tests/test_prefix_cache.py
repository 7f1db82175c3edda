"""Automatic prefix caching: the block manager's cache (match, commit, LRU eviction) and the
engine with caching on vs off (token identity with speculation and preemption, prefill tokens
actually computed, metrics). The randomized add / step / abort / preemption sequences with the
cache on are tests/test_engine_stateful.py."""
from __future__ import annotations

import pytest
import torch

import eft_fast
from eft_fast.engine.block_manager import ROOT_HASH, BlockManager, BlockTable, chain_hash
from engine_helpers import VOCAB, tiny_engine


def hashes_of(tokens: list[int], block_size: int) -> list[bytes]:
    out = []
    for i in range(len(tokens) // block_size):
        out.append(chain_hash(out[-1] if out else ROOT_HASH, tokens[i * block_size:(i + 1) * block_size]))
    return out


# ---------------------------------------------------------------- the block manager


def test_chain_hash_depends_on_every_earlier_token():
    a, b = hashes_of([1, 2, 3, 4, 5, 6], 2), hashes_of([9, 2, 3, 4, 5, 6], 2)
    assert len(a) == 3 and all(x != y for x, y in zip(a, b))       # one changed token changes every later hash
    assert hashes_of([1, 2, 3, 4], 2) == a[:2]


def test_commit_match_and_lru_eviction():
    bm = BlockManager(6, 2, enable_caching=True)
    first = BlockTable()
    assert bm.ensure(first, 5)
    first.num_tokens = 5
    tokens = [1, 2, 3, 4, 5]
    bm.commit(first, tokens, 5)                     # blocks 0, 1 full; the third holds one token
    assert len(first.hashes) == 2 and bm.num_cached_blocks == 2
    second = BlockTable()
    assert bm.match(second, hashes_of([1, 2, 3, 4, 7, 7], 2)) == 2
    assert second.blocks == first.blocks[:2] and second.num_tokens == 4
    assert [bm.ref_count(b) for b in second.blocks] == [2, 2]
    bm.release(first)
    bm.release(second)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2    # freed, still cached
    # fresh allocations take never-cached blocks first, then the least recently freed cached one
    # (a table's tail is freed before its head, so the head is evicted last)
    taken = bm.allocate(4)
    assert not set(taken) & set(first.blocks[:2]) and bm.num_cached_blocks == 2
    bm.allocate(1)
    assert bm.num_cached_blocks == 1
    third = BlockTable()
    assert bm.match(third, hashes_of([1, 2, 3, 4], 2)) == 1          # the head survived


def test_a_duplicate_block_is_not_registered_twice():
    bm = BlockManager(4, 2, enable_caching=True)
    tables = [BlockTable(), BlockTable()]
    for t in tables:
        bm.ensure(t, 2)
        t.num_tokens = 2
        bm.commit(t, [5, 6], 2)
    assert bm.num_cached_blocks == 1
    for t in tables:
        bm.release(t)
    assert bm.num_free_blocks == 4


def test_caching_off_ignores_hashes():
    bm = BlockManager(4, 2)
    t = BlockTable()
    bm.ensure(t, 2)
    t.num_tokens = 2
    bm.commit(t, [5, 6], 2)
    assert bm.num_cached_blocks == 0 and bm.match(BlockTable(), hashes_of([5, 6], 2)) == 0


# ---------------------------------------------------------------- the engine


def _requests(rng, n: int, shared: int, max_tokens: int):
    prefix = torch.randint(0, VOCAB, (shared,), generator=rng).tolist()
    prompts = [prefix + torch.randint(0, VOCAB, (int(k),), generator=rng).tolist()
               for k in torch.randint(1, 7, (n,), generator=rng)]
    params = [eft_fast.SamplingParams(max_tokens=max_tokens, seed=100 + i, ignore_eos=True,
                                      temperature=[0.0, 1.0, 0.7][i % 3]) for i in range(n)]
    return prompts, params


@pytest.mark.parametrize("speculative_k,accept,num_blocks", [(0, "exact", None), (3, "exact", None),
                                                             (3, "rejection", None), (0, "exact", 16),
                                                             (2, "exact", 16)])
def test_tokens_are_the_same_with_caching_on_and_off(family, rng, speculative_k, accept, num_blocks):
    prompts, params = _requests(rng, 8, shared=13, max_tokens=9)
    kw = dict(speculative_k=speculative_k, accept=accept, num_blocks=num_blocks, max_num_seqs=4)
    off = tiny_engine(family, enable_prefix_caching=False, **kw)
    on = tiny_engine(family, **kw)
    want = off.generate(prompts, params)
    # twice through the cached engine: the second pass reuses the first pass's blocks
    for _ in range(2):
        got = on.generate(prompts, params)
        assert [o.token_ids for o in got] == [w.token_ids for w in want]
    stats = on.stats()
    assert all(rate > 0 for rate in stats["prefix_cache_hit_rate"].values())
    if num_blocks is not None:
        assert stats["num_preemptions"] > 0 or off.stats()["num_preemptions"] > 0
    assert not any(stats["kv_blocks_used"].values())              # every block free (and evictable)


def _count_prefill_tokens(engine) -> list[int]:
    """Record the new tokens each prefill forward of the tuned model computes."""
    runner = engine.runners[engine.roles.tuned[0]]
    counts: list[int] = []
    forward = runner.forward

    def counting(steps, all_logits=False):
        counts.extend(len(s.token_ids) for s in steps)
        return forward(steps, all_logits=all_logits)

    runner.forward = counting
    return counts


def test_a_repeated_prompt_computes_only_its_last_block(family, rng):
    engine = tiny_engine(family)                                   # 4-token blocks
    prompt = torch.randint(0, VOCAB, (37,), generator=rng).tolist()
    params = eft_fast.SamplingParams(max_tokens=2, seed=1, ignore_eos=True)
    counts = _count_prefill_tokens(engine)
    first, = engine.generate([prompt], params)
    assert counts[0] == 37
    counts.clear()
    second, = engine.generate([prompt], params)
    assert counts[0] == 1                                          # 36 of 37 prompt tokens were cached
    assert second.token_ids == first.token_ids
    assert first.metrics.num_cached_tokens["tuned"] == 0 and second.metrics.num_cached_tokens["tuned"] == 36
    # a multi-turn follow-up: the first turn's prompt and output are cached too
    counts.clear()
    follow, = engine.generate([prompt + first.token_ids + [5, 6, 7]], params)
    assert follow.metrics.num_cached_tokens["tuned"] == 36 and counts[0] == 42 - 36


def test_prompt_logprobs_skip_the_cache(family, rng):
    engine = tiny_engine(family)
    prompt = torch.randint(0, VOCAB, (21,), generator=rng).tolist()
    plain, = engine.generate([prompt], eft_fast.SamplingParams(max_tokens=1, seed=2))
    scored, = engine.generate([prompt], eft_fast.SamplingParams(max_tokens=1, seed=2, prompt_logprobs=1))
    assert scored.metrics.num_cached_tokens["tuned"] == 0 and len(scored.prompt_logprobs) == 21
    assert scored.token_ids == plain.token_ids


def test_requests_sharing_a_prefix_in_one_batch_compute_it_once(family, rng):
    prefix = torch.randint(0, VOCAB, (24,), generator=rng).tolist()
    prompts = [prefix + [i + 1, i + 2] for i in range(6)]          # 26 tokens: 6 full blocks shared
    params = eft_fast.SamplingParams(max_tokens=3, seed=4, ignore_eos=True)
    on, off = tiny_engine(family), tiny_engine(family, enable_prefix_caching=False)
    got, want = on.generate(prompts, params), off.generate(prompts, params)
    assert [o.token_ids for o in got] == [w.token_ids for w in want]
    computed_on, computed_off = on.stats()["prefill_tokens_computed"], off.stats()["prefill_tokens_computed"]
    assert computed_off["knowledge"] == 6 * 26
    assert computed_on["knowledge"] == 26 + 5 * 2                  # the first computes the prefix, once
    assert [o.metrics.num_cached_tokens["knowledge"] for o in got] == [0] + [24] * 5
