"""Triton paged attention for packed varlen prefill, decode and multi-token verify (docs/DESIGN.md section 5).

Every sequence s owns the query rows query_start_loc[s] : query_start_loc[s + 1] (q_len of them) and a
context of L = seq_lens[s] cache positions, the last q_len of which are this step's own tokens (their
K/V already written). Query row i sits at position L - q_len + i and attends to positions 0 .. that one.

Grid (cdiv(max_query_len, BLOCK_Q) * PARTS, Hkv, S), fixed by host ints only (CUDA-graph
capturable); the query tiles take axis 0 (up to 2^31 - 1 programs), so a long prompt never meets
the 65535 limit of the other axes. One program takes BLOCK_Q query tokens of one sequence together
with HEADS of the G = Hq / Hkv query heads that share kv head h: its BLOCK_M = BLOCK_Q * HEADS rows
(row m is token m // HEADS, head m % HEADS) read each K/V tile once, which is what makes GQA decode
(q_len = 1) fill a tensor-core tile. HEADS is the whole (padded) group unless the group is wider
than the tile (MQA, or fp32 with G > 16); the group is then split over PARTS programs. Every
layout reads the context's K/V T * G / BLOCK_M times for T query tokens. Programs past their
sequence's q_len return at once, so padding sequences (q_len = 0) cost one load each.

The key loop walks cache positions in BLOCK_N tiles; every position gathers its physical block from
the block table (position // block_size), so any power-of-two block_size works with any BLOCK_N. Tiles
wholly at or below the program's first query position need no causal mask; only the last few (the
diagonal) do. Online softmax in base 2, fp32 state, output cast to the query dtype.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_GRID_X = 2**31 - 1   # CUDA's launch limits per grid axis
_MAX_GRID_YZ = 65535
_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos,
    k_ptr, v_ptr, table_row, start, kv_end,
    stride_kb, stride_kt, stride_vb, stride_vt, offs_d, d_ok, qk_scale,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    """Fold the keys start .. start + BLOCK_N - 1 (those < kv_end) into the online softmax state.
    k_ptr / v_ptr already point at this program's kv head; acc: [BLOCK_M, D_PAD] fp32."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = offs_n < kv_end
    # Positions past kv_end never touch the table: its tail may hold -1.
    block_ids = tl.load(table_row + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    slots = (offs_n % PAGE).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + block_ids[:, None] * stride_kb + slots[:, None] * stride_kt + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [BLOCK_N, D_PAD]
    v = tl.load(v_ptr + block_ids[:, None] * stride_vb + slots[:, None] * stride_vt + offs_d[None, :],
                mask=kv_mask, other=0.0)

    if DOT_IN_FP32:
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if CAUSAL:
        s = tl.where((offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :], s, float("-inf"))
    # m_i starts finite (-1e30), so rows with every key masked so far keep alpha = 1, p = 0 (no NaN).
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)  # P @ V at the storage precision, as flash attention does
    if DOT_IN_FP32:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc=acc, input_precision=INPUT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, max_blocks_per_seq,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr, HEADS: tl.constexpr, PARTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):
    q_tile = tl.program_id(0) // PARTS
    part = tl.program_id(0) % PARTS
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)

    q_begin = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    if q_tile * BLOCK_Q >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + seq)

    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + offs_m // HEADS  # token within the sequence
    g = part * HEADS + offs_m % HEADS  # query head within the group
    head = kv_head * GROUP + g
    row_ok = (q_idx < q_len) & (g < GROUP)
    q_pos = ctx_len - q_len + q_idx  # absolute position of each row
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM

    q_rows = (q_begin + q_idx).to(tl.int64)
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)  # [BLOCK_M, D_PAD]
    if DOT_IN_FP32:
        q = q.to(tl.float32)

    # Keys this tile needs: up to the last real query row's position; never past the table row.
    last_q = tl.minimum(q_len, (q_tile + 1) * BLOCK_Q)
    kv_end = tl.minimum(ctx_len - q_len + last_q, max_blocks_per_seq * PAGE)
    # Keys below the tile's first query position are visible to every row: no causal mask there.
    first_pos = ctx_len - q_len + q_tile * BLOCK_Q
    full_end = tl.maximum(tl.minimum(first_pos + 1, kv_end), 0) // BLOCK_N * BLOCK_N

    table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_head, v_head, table_row, start, kv_end,
                                     stride_kb, stride_kt, stride_vb, stride_vt, offs_d, d_ok, qk_scale,
                                     PAGE=PAGE, BLOCK_N=BLOCK_N, CAUSAL=False,
                                     INPUT_PRECISION=INPUT_PRECISION, DOT_IN_FP32=DOT_IN_FP32)
    for start in range(full_end, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_head, v_head, table_row, start, kv_end,
                                     stride_kb, stride_kt, stride_vb, stride_vt, offs_d, d_ok, qk_scale,
                                     PAGE=PAGE, BLOCK_N=BLOCK_N, CAUSAL=True,
                                     INPUT_PRECISION=INPUT_PRECISION, DOT_IN_FP32=DOT_IN_FP32)

    # A row with no visible key (only possible on malformed seq_lens < q_len) writes zeros.
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=io_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_int32(name: str, t, shape: tuple) -> None:
    """shape: expected sizes, None for any."""
    _check_tensor(name, t, len(shape))
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if any(want is not None and want != got for want, got in zip(shape, t.shape)):
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


class LaunchPlan(NamedTuple):
    """Tile sizes and grid of one call (host ints only)."""

    heads: int       # query heads per program (a power of two)
    parts: int       # programs that share a group of G query heads
    block_q: int     # query tokens per program
    block_m: int     # block_q * heads rows per program
    block_n: int     # keys per tile
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


def _launch_config(group: int, max_query_len: int, head_dim_pad: int, dtype: torch.dtype):
    """(HEADS, BLOCK_M, BLOCK_N, num_warps, num_stages). tl.dot needs every dim >= 16.

    Sizes checked against ptxas for sm_90 (no register spills up to D = 256). fp32 inputs take
    the ieee (FMA) dot, whose operands live in registers: only 16 x 16 tiles stay unspilled;
    16-bit tiles stop at 64 rows. A group wider than the tile is split (HEADS < G).
    """
    group_pad = triton.next_power_of_2(group)
    if dtype == torch.float32:
        block_m, block_n, num_warps = 16, 16, 4
    else:
        rows_wanted = max_query_len * group_pad
        block_m = 16 if rows_wanted <= 16 else (32 if rows_wanted <= 32 else 64)
        block_n = 64 if head_dim_pad <= 128 else 32
        num_warps = 4 if head_dim_pad <= 128 else 8
    return min(group_pad, block_m), block_m, block_n, num_warps, 2


def launch_plan(num_seqs: int, num_kv_heads: int, group: int, max_query_len: int, head_dim_pad: int,
                dtype: torch.dtype) -> LaunchPlan:
    """The tiles and grid for S sequences, Hkv kv heads, G query heads per kv head and a host
    bound on q_len. Raises ValueError past the launch limits of the grid's axes."""
    heads, block_m, block_n, num_warps, num_stages = _launch_config(group, max_query_len, head_dim_pad, dtype)
    block_q = block_m // heads
    parts = triton.cdiv(group, heads)
    grid = (triton.cdiv(max_query_len, block_q) * parts, num_kv_heads, num_seqs)
    if grid[0] > _MAX_GRID_X:
        raise ValueError(f"max_query_len = {max_query_len} needs {grid[0]} programs on the grid's first axis "
                         f"(limit {_MAX_GRID_X}); split the prompt into chunks")
    if num_seqs > _MAX_GRID_YZ or num_kv_heads > _MAX_GRID_YZ:
        raise ValueError(f"block_tables has {num_seqs} sequences and key_cache {num_kv_heads} kv heads; "
                         f"each must be <= {_MAX_GRID_YZ} (the grid limit of a launch)")
    return LaunchPlan(heads, parts, block_q, block_m, block_n, num_warps, num_stages, grid)


def paged_attention_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over a paged KV cache (varlen prefill, decode, verify).

    Args:
        query: [T, Hq, D] fp32/bf16/fp16, the new tokens of all sequences back to back.
        key_cache, value_cache: [num_blocks, block_size, Hkv, D], query's dtype; block_size a power
            of two, Hq a multiple of Hkv (query head h reads kv head h // (Hq // Hkv)).
        block_tables: [S, max_blocks_per_seq] int32; cache position p of sequence s is at
            [block_tables[s, p // block_size], p % block_size]. Entries past the last block are not read.
        seq_lens: [S] int32, context length including this step's tokens (already in the cache).
        query_start_loc: [S + 1] int32, cumulative; sequence s owns query rows
            query_start_loc[s] : query_start_loc[s + 1]. q_len = 0 (padding) is allowed.
        max_query_len: host int >= every q_len; fixes the grid (no host sync, graph capturable).
        scale: softmax scale.
        out: optional [T, Hq, D] tensor of query's dtype, written in place.
    Returns:
        [T, Hq, D] in query's dtype (out when given). Rows outside query_start_loc[0] :
        query_start_loc[S] are not written (zeros when out is None).
    Every tensor needs last-dim stride 1; other strides are free. Only shapes, dtypes and devices are
    checked: values (q_len <= seq_lens <= max_blocks_per_seq * block_size, block ids) are trusted.
    """
    _check_tensor("query", query, 3)
    _check_tensor("key_cache", key_cache, 4)
    _check_tensor("value_cache", value_cache, 4)
    if query.dtype not in _DTYPES:
        raise TypeError(f"query must be float32, bfloat16 or float16, got {query.dtype}")
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype != query.dtype:
            raise TypeError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, kv_dim = key_cache.shape
    if tuple(value_cache.shape) != tuple(key_cache.shape):
        raise ValueError(f"value_cache must have key_cache's shape {tuple(key_cache.shape)}, "
                         f"got {tuple(value_cache.shape)}")
    if head_dim == 0 or num_heads == 0:
        raise ValueError(f"query must have Hq >= 1 and D >= 1, got shape {tuple(query.shape)}")
    if kv_dim != head_dim:
        raise ValueError(f"key_cache head dim must equal query's D = {head_dim}, got shape {tuple(key_cache.shape)}")
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"key_cache Hkv = {num_kv_heads} must divide query's Hq = {num_heads}")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"key_cache block_size must be a power of two, got {block_size}")

    _check_int32("block_tables", block_tables, (None, None))
    num_seqs = block_tables.shape[0]
    _check_int32("seq_lens", seq_lens, (num_seqs,))
    _check_int32("query_start_loc", query_start_loc, (num_seqs + 1,))
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, numbers.Integral):
        raise TypeError(f"max_query_len must be a host int, got {type(max_query_len).__name__}")
    max_query_len = int(max_query_len)
    if max_query_len < 0:
        raise ValueError(f"max_query_len must be >= 0, got {max_query_len}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a host float, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if out is None:
        out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    else:
        _check_tensor("out", out, 3)
        if out.dtype != query.dtype:
            raise TypeError(f"out must have query's dtype {query.dtype}, got {out.dtype}")
        if tuple(out.shape) != tuple(query.shape):
            raise ValueError(f"out must have query's shape {tuple(query.shape)}, got {tuple(out.shape)}")

    device = query.device
    for name, t in (("key_cache", key_cache), ("value_cache", value_cache), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc), ("out", out)):
        if t.device != device:
            raise ValueError(f"{name} must be on query's device {device}, got {t.device}")
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"query is on {device}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have last-dim stride 1, got strides {tuple(t.stride())}")
    if block_tables.stride(1) != 1 and block_tables.shape[1] > 1:
        raise ValueError(f"block_tables must have last-dim stride 1, got strides {tuple(block_tables.stride())}")
    seq_lens = seq_lens.contiguous()
    query_start_loc = query_start_loc.contiguous()

    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out

    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    plan = launch_plan(num_seqs, num_kv_heads, num_heads // num_kv_heads, max_query_len, head_dim_pad,
                       query.dtype)

    def launch():
        _paged_attention_kernel[plan.grid](
            query, key_cache, value_cache, out,
            block_tables, seq_lens, query_start_loc,
            float(scale) * _LOG2E, block_tables.shape[1],
            query.stride(0), query.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            out.stride(0), out.stride(1),
            block_tables.stride(0),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            GROUP=num_heads // num_kv_heads, HEADS=plan.heads, PARTS=plan.parts,
            BLOCK_Q=plan.block_q, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
            PAGE=block_size,
            # fp32 inputs keep full fp32 products (tf32 would cost ~1e-3 relative error).
            INPUT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
            # The interpreter's tl.dot multiplies the raw bits of bf16 operands: widen them first.
            DOT_IN_FP32=_interpreting() and query.dtype == torch.bfloat16,
            num_warps=plan.num_warps, num_stages=plan.num_stages,
        )

    if device.type == "cuda":
        with torch.cuda.device(device):
            launch()
    else:
        launch()
    return out
