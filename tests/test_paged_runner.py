"""The paged model runner against HF's own dense forward (docs/DESIGN.md section 5)."""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from eft_fast.engine.block_manager import BlockManager, BlockTable
from eft_fast.engine.model_runner import ModelRunner, SequenceStep
from eft_fast.engine.static_step import StaticStep, batch_buckets
from tiny_models import dense_logits, tiny_model, twin

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
VOCAB = 97


def _random_tokens(rng, n):
    return torch.randint(0, VOCAB, (n,), generator=rng).tolist()


def _make_runner(arch, dtype, block_size=4, num_blocks=96):
    model = tiny_model(arch, VOCAB, dtype)
    return ModelRunner(twin(model, "sdpa"), block_size=block_size, num_blocks=num_blocks), model


def _check(logits, ref, seqs, news, tol):
    off = 0
    for seq, new in zip(seqs, news):
        want = dense_logits(ref, seq)[-len(new):]
        got = logits[off:off + len(new)]
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
        off += len(new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_prefill_decode_verify_match_dense_forward(arch, dtype, rng):
    runner, ref = _make_runner(arch, dtype)
    prompts = [_random_tokens(rng, n) for n in (5, 1, 9, 3, 12)]
    tables = [BlockTable() for _ in prompts]
    for t, p in zip(tables, prompts):
        assert runner.blocks.ensure(t, len(p) + 24)
    seqs = [list(p) for p in prompts]
    # packed ragged prefill: logits at each prompt's last token
    logits = runner.forward([SequenceStep(t, p) for t, p in zip(tables, prompts)])
    _check(logits, ref, seqs, [[p[-1]] for p in prompts], TOL[dtype])
    for step in range(20):
        # one verify step of k+1 = 4 tokens for two sequences, mixed with 1-token decodes
        news = [_random_tokens(rng, 4 if step == 7 and i in (1, 3) else 1) for i in range(len(seqs))]
        logits = runner.forward([SequenceStep(t, n) for t, n in zip(tables, news)], all_logits=True)
        for s, n in zip(seqs, news):
            s.extend(n)
        _check(logits, ref, seqs, news, TOL[dtype])
    assert [t.num_tokens for t in tables] == [len(s) for s in seqs]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rollback_then_new_tokens_equals_never_written(arch, rng):
    runner, ref = _make_runner(arch, torch.float64, block_size=4)
    prompt, drafted, replacement = _random_tokens(rng, 7), _random_tokens(rng, 5), _random_tokens(rng, 3)
    table = BlockTable()
    assert runner.blocks.ensure(table, 7 + 5 + 1)
    runner.forward([SequenceStep(table, prompt)])
    runner.forward([SequenceStep(table, drafted)], all_logits=True)   # positions 7..11 written
    table.rollback(7 + 2)                                             # keep 2 drafted tokens
    logits = runner.forward([SequenceStep(table, replacement)], all_logits=True)
    _check(logits, ref, [prompt + drafted[:2] + replacement], [replacement], TOL[torch.float64])
    with pytest.raises(ValueError, match="rollback"):
        table.rollback(table.num_tokens + 1)


@pytest.mark.parametrize("query_len", [1, 3])
def test_static_buffer_step_equals_unpadded_step(query_len, rng):
    model = tiny_model("llama", VOCAB, torch.float64)
    dynamic = ModelRunner(twin(model, "sdpa"), block_size=4, num_blocks=64)
    static_runner = ModelRunner(twin(model, "sdpa"), block_size=4, num_blocks=64)
    static = StaticStep(static_runner, query_len, max_batch=6, pad_to_bucket=True)   # as a graph replay runs
    assert static.buckets == [1, 2, 4, 6] and not static.graphs
    prompts = [_random_tokens(rng, n) for n in (3, 8, 5)]
    tables = {r: [BlockTable() for _ in prompts] for r in ("d", "s")}
    for key, runner in (("d", dynamic), ("s", static_runner)):
        for t, p in zip(tables[key], prompts):
            assert runner.blocks.ensure(t, len(p) + 4 * query_len)
        runner.forward([SequenceStep(t, p) for t, p in zip(tables[key], prompts)])
    for n_seqs in (3, 1, 2):                    # buckets 4 (1 padding row), 1, 2
        news = [_random_tokens(rng, query_len) for _ in range(n_seqs)]
        want = dynamic.forward([SequenceStep(t, n) for t, n in zip(tables["d"][:n_seqs], news)], all_logits=True)
        got = static.forward([SequenceStep(t, n) for t, n in zip(tables["s"][:n_seqs], news)])
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # padding rows wrote only the dummy block: the real blocks are identical
    real = slice(0, dynamic.kv_cache.num_blocks)
    torch.testing.assert_close(static_runner.kv_cache.key[:, real], dynamic.kv_cache.key[:, real], atol=1e-12, rtol=0)
    assert [t.num_tokens for t in tables["s"]] == [t.num_tokens for t in tables["d"]]
    with pytest.raises(ValueError, match="exactly"):
        static.forward([SequenceStep(tables["s"][0], _random_tokens(rng, query_len + 1))])
    with pytest.raises(ValueError, match="at most 6"):
        static.bucket_for(7)


def test_batch_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]


def test_block_manager_invariants():
    bm = BlockManager(num_blocks=5, block_size=4)
    a, b = BlockTable(), BlockTable()
    assert bm.ensure(a, 9) and len(a.blocks) == 3          # 9 tokens -> 3 blocks
    assert bm.ensure(a, 12) and len(a.blocks) == 3         # fits already
    assert not bm.ensure(b, 12)                            # 3 more blocks, only 2 free
    assert b.blocks == [] and bm.num_free_blocks == 2      # nothing taken on failure
    assert not bm.can_hold(b, 12) and bm.can_hold(b, 8)
    assert bm.ensure(b, 8)
    assert len(set(a.blocks) | set(b.blocks)) == 5         # no block handed out twice
    shared = a.blocks[0]
    bm.share(shared)
    bm.release(a)
    assert bm.ref_count(shared) == 1 and bm.num_free_blocks == 2
    bm.free_block(shared)
    with pytest.raises(ValueError, match="double free"):
        bm.free_block(shared)
    bm.release(b)
    assert bm.num_free_blocks == 5                         # no leak
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 4)


def test_runner_errors(rng):
    runner, _ = _make_runner("llama", torch.float32, block_size=4, num_blocks=8)
    table = BlockTable()
    with pytest.raises(ValueError, match="needs 2 KV blocks"):
        runner.forward([SequenceStep(table, _random_tokens(rng, 5))])
    with pytest.raises(ValueError, match="no new tokens"):
        runner.forward([SequenceStep(table, [])])
    long = ModelRunner(tiny_model("llama", VOCAB), block_size=4, num_blocks=8, max_model_len=6)
    t = BlockTable()
    assert long.blocks.ensure(t, 8)
    with pytest.raises(ValueError, match="max_model_len=6"):
        long.forward([SequenceStep(t, _random_tokens(rng, 7))])


def test_unsupported_attention_is_rejected():
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    with pytest.raises(ValueError, match="tuned: .*softcapping"):
        ModelRunner(Gemma2ForCausalLM(config), role="tuned")
    sliding = tiny_model("qwen2", VOCAB, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding_attention"):
        ModelRunner(sliding)


def test_pool_sized_from_memory_budget():
    model = tiny_model("llama", VOCAB)
    per_block = 2 * 2 * 16 * 2 * 16 * 4        # K+V, layers, block, kv heads, head_dim, fp32
    runner = ModelRunner(model, block_size=16, kv_cache_bytes=10 * per_block)
    assert runner.blocks.num_blocks == 10
    with pytest.raises(ValueError, match="holds no"):
        ModelRunner(tiny_model("llama", VOCAB), kv_cache_bytes=100)


@pytest.mark.parametrize("dtype", [torch.float32])
def test_triton_attention_path_matches_dense_forward(dtype, rng):
    """The model runner through the Triton paged kernel (the GPU path; here in the interpreter)."""
    model = tiny_model("qwen2", VOCAB, dtype, hidden_size=32, intermediate_size=48, num_hidden_layers=1)
    runner = ModelRunner(twin(model, "sdpa"), block_size=4, num_blocks=32, attention_backend="triton")
    prompts = [_random_tokens(rng, n) for n in (5, 2, 7)]
    tables = [BlockTable() for _ in prompts]
    for t, p in zip(tables, prompts):
        assert runner.blocks.ensure(t, len(p) + 8)
    logits = runner.forward([SequenceStep(t, p) for t, p in zip(tables, prompts)])
    seqs = [list(p) for p in prompts]
    _check(logits, model, seqs, [[p[-1]] for p in prompts], TOL[dtype])
    static = StaticStep(runner, 3, max_batch=4, use_cuda_graph=False)
    for query_len, step in ((1, None), (3, static)):
        news = [_random_tokens(rng, query_len) for _ in seqs]
        steps = [SequenceStep(t, n) for t, n in zip(tables, news)]
        logits = runner.forward(steps, all_logits=True) if step is None else step.forward(steps)
        for s, n in zip(seqs, news):
            s.extend(n)
        _check(logits, model, seqs, news, TOL[dtype])
    with pytest.raises(ValueError, match="attention_backend"):
        ModelRunner(model, attention_backend="flash")


def test_paged_attention_refuses_softcap_and_narrow_sliding_windows():
    from eft_fast.engine.attention import PagedAttentionMetadata, paged_attention_forward

    meta = PagedAttentionMetadata(None, None, None, None, None, 1, max_context=16)
    q = torch.zeros(1, 2, 1, 4)
    for kwargs in ({"softcap": 30.0}, {"sliding_window": 8}):
        with pytest.raises(ValueError, match="soft-capping nor a sliding window"):
            paged_attention_forward(torch.nn.Module(), q, q, q, None, eft_metadata=meta, **kwargs)
    # a window as wide as the context is causal attention: it gets past the check (and fails later on
    # this empty metadata, not on the window)
    with pytest.raises(AttributeError):
        paged_attention_forward(torch.nn.Module(), q, q, q, None, eft_metadata=meta, sliding_window=16)


def test_decode_step_indices_equal_the_general_ones(rng):
    """The torch path's decode fast path (one token per sequence) builds the same gather
    indices and mask as the general path."""
    from eft_fast.engine import attention

    num_seqs, block_size, max_blocks, dummy = 7, 4, 6, 999
    block_tables = torch.randint(0, 50, (num_seqs, max_blocks), generator=rng, dtype=torch.int32)
    seq_lens = torch.randint(1, max_blocks * block_size + 1, (num_seqs,), generator=rng, dtype=torch.int32)
    starts = torch.arange(num_seqs, dtype=torch.int64)
    max_kv = int(seq_lens.max())
    fast = attention._decode_indices(block_tables, seq_lens, starts, max_kv, block_size, dummy)
    general = attention._group_indices(block_tables, seq_lens, starts, torch.ones(num_seqs, dtype=torch.int64), 1,
                                       max_kv, block_size, dummy, None, num_seqs)
    for name in ("query_index", "key_slots", "mask", "token_seq", "token_col"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    query_start_loc = torch.arange(num_seqs + 1, dtype=torch.int32)
    built = attention.build_torch_path_indices(block_tables, seq_lens, query_start_loc, num_seqs, 1, max_kv,
                                               block_size, dummy)
    assert len(built) == 1 and torch.equal(built[0].mask, general.mask)
