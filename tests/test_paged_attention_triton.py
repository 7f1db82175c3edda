"""The Triton paged-attention kernel (kernels/paged_attention.py) against an fp64 torch reference.

Without a GPU the kernel runs in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so shapes stay tiny. Inputs are fresh random per run (the ``rng`` fixture
prints its seed). Every batch is built from (q_len, context_len) pairs; the KV pool is filled with
random values everywhere, blocks are handed out in a shuffled order, so a read of a wrong slot or
block shows up as a mismatch.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU these tests need the Triton interpreter (TRITON_INTERPRET=1)",
                allow_module_level=True)
triton = pytest.importorskip("triton")

from eft_fast.kernels import paged_attention as pa  # noqa: E402
from eft_fast.kernels.paged_attention import paged_attention_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 1234.5

# The reference sees the same (rounded) inputs, so the error is the kernel's arithmetic alone.
# fp32: fp32 accumulation over <= 40 keys, far below 1e-5.
# fp16 / bf16: P is rounded to the storage dtype before P @ V and the output is rounded again, so
# |err| <~ u * (max|v| + |o|) <~ 4u for N(0, 1) values (|v| < ~4.5 here), with u the unit roundoff:
# fp16 2^-11 ~ 4.9e-4; bf16 2^-8 ~ 3.9e-3 (the interpreter truncates fp32 -> bf16, one full ulp).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def make_batch(rng, specs, num_heads, num_kv_heads, head_dim, block_size, dtype, *,
               extra_rows=0, table_fill=-1, spare_blocks=3, spare_columns=1, shuffle=True):
    """Build kernel arguments for sequences given as (q_len, context_len) pairs.

    extra_rows: query rows after the last sequence's (padding rows of a graph bucket).
    table_fill: value of the block-table entries past each sequence's last block.
    """
    num_seqs = len(specs)
    blocks_per_seq = [triton.cdiv(ctx, block_size) for _, ctx in specs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    order = torch.randperm(num_blocks, generator=rng) if shuffle else torch.arange(num_blocks)
    max_blocks = max(blocks_per_seq, default=0) + spare_columns
    block_tables = torch.full((num_seqs, max_blocks), table_fill, dtype=torch.int32)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = order[used:used + n].to(torch.int32)
        used += n
    q_lens = torch.tensor([q for q, _ in specs], dtype=torch.int64)
    query_start_loc = torch.zeros(num_seqs + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.cumsum(q_lens, 0).to(torch.int32)
    num_tokens = int(q_lens.sum()) + extra_rows
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return dict(
        query=torch.randn(num_tokens, num_heads, head_dim, generator=rng).to(dtype).to(DEVICE),
        key_cache=torch.randn(cache_shape, generator=rng).to(dtype).to(DEVICE),
        value_cache=torch.randn(cache_shape, generator=rng).to(dtype).to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor([ctx for _, ctx in specs], dtype=torch.int32, device=DEVICE),
        query_start_loc=query_start_loc.to(DEVICE),
        max_query_len=max((q for q, _ in specs), default=0),
        scale=head_dim ** -0.5,
    )


def paged_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                              max_query_len, scale):
    """fp64 attention from dense per-sequence K/V gathered through the block tables.
    Rows owned by no sequence come out NaN (the kernel must not write them)."""
    del max_query_len
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.full((num_tokens, num_heads, head_dim), float("nan"), dtype=torch.float64)
    starts = query_start_loc.cpu().tolist()
    for s, ctx in enumerate(seq_lens.cpu().tolist()):
        q_begin, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_begin
        if q_len == 0:
            continue
        pos = torch.arange(ctx)
        blocks = block_tables[s].cpu().long()[pos // block_size]
        k = key_cache.cpu()[blocks, pos % block_size].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = value_cache.cpu()[blocks, pos % block_size].double().repeat_interleave(group, dim=1)
        q = query[q_begin:q_end].cpu().double()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = ctx - q_len + torch.arange(q_len)
        scores = scores.masked_fill(pos[None, :] > q_pos[:, None], float("-inf"))
        out[q_begin:q_end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)
    return out


def check(args, out=None, **tolerance):
    expected = paged_attention_reference(**args)
    got = paged_attention_triton(**args, out=out)
    assert got.dtype == args["query"].dtype and got.shape == args["query"].shape
    owned = slice(0, int(args["query_start_loc"][-1]))
    tolerance = tolerance or TOLERANCES[args["query"].dtype]
    torch.testing.assert_close(got[owned].cpu().double(), expected[owned], **tolerance)
    return got


@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (48, 4)])
def test_packed_prefill(rng, head_dim, block_size):
    specs = [(1, 1), (7, 7), (13, 13), (20, 20)]  # q_len = L: whole prompts, ragged
    check(make_batch(rng, specs, 2, 2, head_dim, block_size, torch.float32))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_decode(rng, num_kv_heads):
    specs = [(1, 1), (1, 5), (1, 16), (1, 17), (1, 40)]
    check(make_batch(rng, specs, 4, num_kv_heads, 80, 16, torch.float32))


@pytest.mark.parametrize("head_dim", [64, 8])
def test_verify(rng, head_dim):
    specs = [(4, 4), (4, 9), (4, 33)]  # k = 3 draft tokens + the bonus row over an existing context
    check(make_batch(rng, specs, 4, 2, head_dim, 4, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_mixed_batch_with_padding(rng, dtype):
    # Prefill, decode and verify in one call, with q_len = 0 padding sequences (one of them with
    # an empty context and an all -1 table row), padding query rows at the end, and a bucket
    # max_query_len above the real one.
    specs = [(0, 0), (12, 12), (1, 30), (4, 21), (0, 17), (1, 1)]
    args = make_batch(rng, specs, 4, 2, 80, 4, dtype, extra_rows=3)
    args["max_query_len"] = 16
    out = torch.full_like(args["query"], SENTINEL)
    got = check(args, out=out)
    assert got is out
    assert torch.all(out[-3:] == SENTINEL), "rows owned by no sequence were written"


@pytest.mark.parametrize("block_size", [1, 64])
def test_block_size_extremes(rng, block_size):
    # One slot per block, and a block wider than the kernel's key tile.
    specs = [(1, 9), (3, 26), (5, 5)]
    check(make_batch(rng, specs, 2, 1, 48, block_size, torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_small_tiles(rng, monkeypatch, dtype):
    # Tiles of 16 keys and 8 query tokens x 2 heads: several key tiles per program (the unmasked
    # ones and the causal diagonal) and several query tiles per sequence, at the interpreter's sizes.
    # (4, 18): the first query row sits at position 14, so key 15 closes an unmasked-looking tile
    # that row must still not see.
    monkeypatch.setattr(pa, "_launch_config", lambda group, *_: (triton.next_power_of_2(group), 16, 16, 4, 2))
    specs = [(20, 20), (9, 38), (1, 40), (0, 3), (2, 17), (4, 18)]
    check(make_batch(rng, specs, 4, 2, 64, 4, dtype))


@pytest.mark.parametrize("num_heads,num_kv_heads,dtype", [
    (32, 1, torch.float16),    # MQA: 32 heads fill the 16-bit tile at decode, split over 2 programs at prefill
    (64, 1, torch.bfloat16),   # MQA wider than any tile: 64 heads in one 64-row tile or split
    (48, 2, torch.float32),    # fp32 groups of 24: padded to 32, split over 2 programs of 16 heads
    (12, 1, torch.float32),    # a group of 12 padded to 16 in one program
], ids=["mqa32-fp16", "mqa64-bf16", "g24-fp32", "g12-fp32"])
def test_groups_wider_than_the_tile(rng, num_heads, num_kv_heads, dtype):
    specs = [(9, 9), (1, 21), (4, 13), (0, 5)]  # prefill, decode, verify and padding in one call
    plan = pa.launch_plan(len(specs), num_kv_heads, num_heads // num_kv_heads, 9, 16, dtype)
    assert plan.block_m <= (16 if dtype == torch.float32 else 64) and plan.heads * plan.block_q == plan.block_m
    check(make_batch(rng, specs, num_heads, num_kv_heads, 16, 4, dtype))


def test_launch_plan_respects_the_grid_limits():
    # A 100k-token prompt of an MQA model: the query tiles go on the grid's first axis (2^31 - 1),
    # never on an axis limited to 65535 as when one program took a single token.
    for dtype in (torch.float32, torch.bfloat16):
        plan = pa.launch_plan(1, 1, 64, 100_000, 128, dtype)
        assert plan.grid[0] == triton.cdiv(100_000, plan.block_q) * plan.parts > 65535
        assert plan.grid[1:] == (1, 1)
    assert pa.launch_plan(3, 8, 4, 1, 128, torch.bfloat16).grid == (1, 8, 3)  # decode: one program per head group
    with pytest.raises(ValueError, match="65535"):
        pa.launch_plan(70_000, 8, 4, 1, 128, torch.bfloat16)


def test_layout_does_not_change_result(rng):
    # The same logical K/V in contiguous blocks and in shuffled blocks with 0-filled table tails
    # must give bit-identical output: the arithmetic does not depend on where the blocks are.
    specs = [(5, 5), (1, 23), (3, 14)]
    scattered = make_batch(rng, specs, 2, 2, 64, 4, torch.float32, table_fill=0, spare_blocks=5)
    contiguous = dict(scattered)
    num_blocks, block_size = scattered["key_cache"].shape[:2]
    contiguous["block_tables"] = torch.full_like(scattered["block_tables"], -1)
    for name in ("key_cache", "value_cache"):
        contiguous[name] = torch.full_like(scattered[name], float("nan"))
    used = 0
    for s, (_, ctx) in enumerate(specs):
        n = triton.cdiv(ctx, block_size)
        src = scattered["block_tables"][s, :n].long()
        contiguous["block_tables"][s, :n] = torch.arange(used, used + n, dtype=torch.int32)
        for name in ("key_cache", "value_cache"):
            contiguous[name][used:used + n] = scattered[name][src]
        used += n
    # Unused slots of the contiguous pool hold NaN: reading any of them would poison the output.
    for name in ("key_cache", "value_cache"):
        last = specs[-1][1]
        contiguous[name][used - 1, last % block_size or block_size:] = float("nan")
    a = check(scattered)
    b = paged_attention_triton(**contiguous)
    assert torch.equal(a, b)


def test_strided_query_and_out(rng):
    # query as a view into a fused QKV projection output, out as a view into a wider buffer.
    specs = [(3, 3), (1, 11), (2, 7)]
    args = make_batch(rng, specs, 4, 2, 48, 4, torch.float32, extra_rows=2)
    num_tokens = args["query"].shape[0]
    qkv = torch.randn(num_tokens, 4 + 2 * 2, 48, generator=rng).to(DEVICE)
    qkv[:, :4] = args["query"]
    args["query"] = qkv[:, :4]
    assert not args["query"].is_contiguous()
    buffer = torch.full((num_tokens, 6, 48), SENTINEL, device=DEVICE)
    out = buffer[:, 1:5]
    got = check(args, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.all(buffer[:, 0] == SENTINEL) and torch.all(buffer[:, 5] == SENTINEL)
    assert torch.all(buffer[-2:] == SENTINEL)
    fresh = paged_attention_triton(**args)
    assert torch.equal(fresh[:-2], got[:-2]) and torch.all(fresh[-2:] == 0)


@pytest.mark.parametrize("specs,extra_rows", [([(0, 0), (0, 0)], 4), ([(0, 7)], 0), ([], 2)])
def test_nothing_to_do(rng, specs, extra_rows):
    # Only padding sequences (or none): nothing is written, nothing faults.
    args = make_batch(rng, specs, 2, 1, 64, 16, torch.float32, extra_rows=extra_rows, spare_blocks=1)
    args["max_query_len"] = 4
    out = torch.full_like(args["query"], SENTINEL)
    assert paged_attention_triton(**args, out=out) is out
    assert torch.all(out == SENTINEL)


def _bad(name, value):
    return lambda args: args.__setitem__(name, value(args[name]))


def _bad_caches(value):
    def mutate(args):
        args["key_cache"] = value(args["key_cache"])
        args["value_cache"] = value(args["value_cache"])
    return mutate


BAD_INPUTS = [
    ("query-dtype", _bad("query", lambda t: t.double()), TypeError, "query"),
    ("query-int", _bad("query", lambda t: t.to(torch.int32)), TypeError, "query"),
    ("query-2d", _bad("query", lambda t: t[:, 0]), ValueError, "query"),
    ("query-not-tensor", _bad("query", lambda t: t.tolist()), TypeError, "query"),
    ("key-dtype", _bad("key_cache", lambda t: t.half()), TypeError, "key_cache"),
    ("value-dtype", _bad("value_cache", lambda t: t.half()), TypeError, "value_cache"),
    ("value-shape", _bad("value_cache", lambda t: t[:-1]), ValueError, "value_cache"),
    ("caches-head-dim", _bad_caches(lambda t: t[..., :-1]), ValueError, "key_cache head dim"),
    ("key-3d", _bad("key_cache", lambda t: t[0]), ValueError, "key_cache"),
    ("kv-heads-not-dividing", _bad_caches(lambda t: torch.cat([t, t[:, :, :1]], 2)), ValueError,
     "key_cache Hkv"),
    ("block-size-not-pow2", _bad_caches(lambda t: t[:, :3]), ValueError, "key_cache block_size"),
    ("block-tables-int64", _bad("block_tables", lambda t: t.long()), TypeError, "block_tables"),
    ("block-tables-1d", _bad("block_tables", lambda t: t[0]), ValueError, "block_tables"),
    ("seq-lens-int64", _bad("seq_lens", lambda t: t.long()), TypeError, "seq_lens"),
    ("seq-lens-shape", _bad("seq_lens", lambda t: t[:-1]), ValueError, "seq_lens"),
    ("query-start-loc-shape", _bad("query_start_loc", lambda t: t[:-1]), ValueError, "query_start_loc"),
    ("query-start-loc-float", _bad("query_start_loc", lambda t: t.float()), TypeError, "query_start_loc"),
    ("max-query-len-tensor", _bad("max_query_len", lambda v: torch.tensor(v)), TypeError, "max_query_len"),
    ("max-query-len-negative", _bad("max_query_len", lambda v: -1), ValueError, "max_query_len"),
    ("scale-nan", _bad("scale", lambda v: math.nan), ValueError, "scale"),
    ("scale-tensor", _bad("scale", lambda v: torch.tensor(v)), TypeError, "scale"),
    ("query-last-stride", _bad("query", lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)),
     ValueError, "query"),
    ("out-dtype", lambda args: args.__setitem__("out", args["query"].half()), TypeError, "out"),
    ("out-shape", lambda args: args.__setitem__("out", args["query"][:-1].clone()), ValueError, "out"),
]


@pytest.mark.parametrize("mutate,error,name", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_name_the_argument(rng, mutate, error, name):
    args = make_batch(rng, [(2, 5), (1, 3)], 4, 2, 16, 4, torch.float32)
    mutate(args)
    with pytest.raises(error, match=name):
        paged_attention_triton(**args)


def test_wrong_device_is_named(rng):
    args = make_batch(rng, [(2, 5)], 2, 2, 16, 4, torch.float32)
    args["seq_lens"] = args["seq_lens"].to("meta")
    with pytest.raises(ValueError, match="seq_lens"):
        paged_attention_triton(**args)
