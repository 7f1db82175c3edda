"""Triton backend of the fused EFT sampling op (docs/DESIGN.md sections 2-3).

One program per row; every pass streams the row in BLOCK-sized chunks:

1. online max / sum-exp of x_K, x_R0 and the unnormalised small policy c (stored to a
   [B, V] fp32 work row); NaN / +inf inputs are flagged and read as 0, as in the reference;
2. (knowledge present, weight_top_p < 1) the threshold key of the weight truncation set S;
3. z = s + [j in S] (l_K - l_R0) written over c, with the online lse and max of z;
4. (temperature > 0) the top-k and top-p threshold keys on z;
5. Gumbel-max sample over the allowed tokens, writing log softmax(z) when asked.

Thresholds are found without a sort: the largest uint32 order key k whose set {key >= k}
holds enough count or mass, chosen 4 bits at a time (8 passes of 16 candidate thresholds).
The math per element is the twin of csrc/eft_math.h.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .._validation import GREEDY_TEMPERATURE

_TWO_POW_MINUS_32 = tl.constexpr(2.3283064365386963e-10)
_MAX_BLOCK = 1024
_GREEDY_T = tl.constexpr(GREEDY_TEMPERATURE)


@triton.jit
def _order_key(v):
    """Order-preserving float32 -> uint32 map, held in int64 (larger float, larger key)."""
    bits = v.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | -2147483648  # all ones for negative floats, else the sign bit
    return (bits ^ flip).to(tl.uint32, bitcast=True).to(tl.int64)


@triton.jit
def _lse_update(m, total, x):
    """Fold a chunk x into the online log-sum-exp state (max m, sum of exp(x - m)).
    -inf entries add nothing; an all -inf state stays (-inf, 0) without NaN."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    return m_new, total


@triton.jit
def _lse_value(m, total):
    return tl.where(m == float("-inf"), float("-inf"), m + tl.log(tl.where(total > 0.0, total, 1.0)))


@triton.jit
def _load_logits(ptr, offs, V):
    """Load a chunk as fp32 (-inf past V). Returns (x with NaN / +inf read as 0, bad flags)."""
    x = tl.load(ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    bad = (x != x) | (x == float("inf"))
    return tl.where(bad, 0.0, x), bad


@triton.jit
def _unmask(x):
    """-inf -> 0, so that arithmetic on masked lanes (later discarded) never makes NaN."""
    return tl.where(x == float("-inf"), 0.0, x)


@triton.jit
def _small_policy(c, lse_c):
    """s = c - lse(c), -inf where c is -inf (and everywhere in an all-masked row)."""
    lse_safe = tl.where(lse_c == float("-inf"), 0.0, lse_c)
    return tl.where(c == float("-inf"), float("-inf"), c - lse_safe)


@triton.jit
def _eft_score(s, in_set, x_k, lse_k, x_r0, lse_r0):
    """z = s + [j in S] ((x_K - lse_K) - (x_R0 - lse_R0)); -inf - -inf is masked, never NaN."""
    masked_weight = (x_k == float("-inf")) | (x_r0 == float("-inf"))
    x_k = tl.where(masked_weight, 0.0, x_k)
    x_r0 = tl.where(masked_weight, 0.0, x_r0)
    lse_k = tl.where(lse_k == float("-inf"), 0.0, lse_k)
    lse_r0 = tl.where(lse_r0 == float("-inf"), 0.0, lse_r0)
    up_weight = (x_k - lse_k) - (x_r0 - lse_r0)
    z = tl.where(in_set, s + up_weight, s)
    z = tl.where(in_set & masked_weight, float("-inf"), z)
    return tl.where(s == float("-inf"), float("-inf"), z)


@triton.jit
def _gumbel_noise(seed, offs, position, USE_LIBDEVICE: tl.constexpr):
    """g = -log(E), E = -log(u), u = (w0 + 0.5) 2^-32, w0 = philox(seed, (j, position, 0, 0))[0]."""
    token = offs.to(tl.uint32)
    zero = token * 0
    w0, _, _, _ = tl.philox(seed, token, zero + position.to(tl.uint32), zero, zero)
    low_half = (w0 >> 31) == 0
    u = (w0.to(tl.float32) + 0.5) * _TWO_POW_MINUS_32
    # For u > 1/2, 1 - u = (~w0 + 0.5) 2^-32 is exact; log1p(-(1 - u)) avoids cancellation.
    not_w0 = (~w0.to(tl.int32, bitcast=True)).to(tl.uint32, bitcast=True)
    complement = tl.where(low_half, 0.25, (not_w0.to(tl.float32) + 0.5) * _TWO_POW_MINUS_32)
    if USE_LIBDEVICE:
        e = tl.where(low_half, -libdevice.log(u), -libdevice.log1p(-complement))
        return -libdevice.log(e)
    else:
        # The interpreter has no libdevice: log1p(x) by Kahan's trick, exact to a few ulp.
        x = -complement
        one_plus = 1.0 + x
        log1p = tl.where(one_plus == 1.0, x, tl.log(one_plus) * (x / (one_plus - 1.0)))
        e = tl.where(low_half, -tl.log(u), -log1p)
        return -tl.log(e)


@triton.jit
def _threshold_key(work_row, V, target, frac, lse_or_max, temperature, floor_key,
                   MODE: tl.constexpr, BLOCK: tl.constexpr):
    """Largest key k with weight{key_j >= k} >= target + frac * weight{all}, searched 4 bits
    per pass. 0 (every token) when even the whole row falls short.

    MODE 0: key of s = c - lse_c (lse_or_max = lse_c), weight exp(s).
    MODE 1: key of z, weight 1 (a count).
    MODE 2: key of z, weight exp((z - zmax) / T) (lse_or_max = zmax) for key >= floor_key.
    """
    digits = tl.arange(0, 16).to(tl.int64)
    prefix = tl.full((), 0, tl.int64)
    for i in tl.static_range(8):
        candidates = prefix + (digits << (28 - 4 * i))  # [16]
        mass = tl.zeros([16], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            in_row = offs < V
            v = tl.load(work_row + offs, mask=in_row, other=float("-inf"))
            if MODE == 0:
                v = _small_policy(v, lse_or_max)
            keys = _order_key(v)
            if MODE == 0:
                weight = tl.exp(v)
            elif MODE == 1:
                weight = tl.where(in_row, 1.0, 0.0)
            else:
                shifted = tl.where(v == float("-inf"), float("-inf"), tl.math.div_rn(v - lse_or_max, temperature))
                weight = tl.where(keys >= floor_key, tl.exp(shifted), 0.0)
            hit = keys[:, None] >= candidates[None, :]  # [BLOCK, 16]
            mass += tl.sum(tl.where(hit, weight[:, None], 0.0), axis=0)
        if i == 0:
            # Candidate 0 of the first pass is key >= 0: the whole row.
            total = tl.sum(tl.where(digits == 0, mass, 0.0), axis=0)
            target = target + frac * total
        chosen = tl.max(tl.where(mass >= target, digits, 0), axis=0)
        prefix = prefix + (chosen << (28 - 4 * i))
    return prefix


@triton.jit
def _eft_sample_kernel(
    knowledge_ptr, stride_kb,
    tuned_ptr, stride_tr, stride_tb,
    reference_ptr, stride_rr, stride_rb,
    seeds_ptr, positions_ptr, weights_ptr, stride_wb,
    temperature_ptr, weight_top_p_ptr, top_k_ptr, top_p_ptr,
    work_ptr, tokens_ptr, logprob_ptr, status_ptr,
    R, V,
    HAS_KNOWLEDGE: tl.constexpr, HAS_REFERENCE: tl.constexpr, WRITE_LOGPROBS: tl.constexpr,
    USE_LIBDEVICE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    k_row = knowledge_ptr + row * stride_kb
    t_row = tuned_ptr + row * stride_tb
    r_row = reference_ptr + row * stride_rb
    work_row = work_ptr + row * V
    NEG_INF: tl.constexpr = float("-inf")

    # Pass 1: c (to the work row), online lse of x_K, x_R0 and c, NaN / +inf detection.
    m_k = tl.full((), NEG_INF, tl.float32)
    sum_k = tl.full((), 0.0, tl.float32)
    m_r0 = tl.full((), NEG_INF, tl.float32)
    sum_r0 = tl.full((), 0.0, tl.float32)
    m_c = tl.full((), NEG_INF, tl.float32)
    sum_c = tl.full((), 0.0, tl.float32)
    bad_row = tl.full((), 0, tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        if HAS_REFERENCE:
            x_r0, bad = _load_logits(r_row, offs, V)
            masked = x_r0 == NEG_INF
            c = x_r0
            for r in range(R):
                x_t, bad_t = _load_logits(t_row + r * stride_tr, offs, V)
                x_r, bad_r = _load_logits(r_row + r * stride_rr, offs, V)
                beta = tl.load(weights_ptr + row * stride_wb + r)
                pair_masked = (x_t == NEG_INF) | (x_r == NEG_INF)
                masked = masked | pair_masked
                c += tl.where(pair_masked, 0.0, beta * (_unmask(x_t) - _unmask(x_r)))
                bad = bad | bad_t | bad_r
            c = tl.where(masked, NEG_INF, c)
            bad = bad | (c != c) | (c == float("inf"))  # the weighted sum overflowed fp32
            m_r0, sum_r0 = _lse_update(m_r0, sum_r0, x_r0)
        else:
            c, bad = _load_logits(t_row, offs, V)
        if HAS_KNOWLEDGE:
            x_k, bad_k = _load_logits(k_row, offs, V)
            bad = bad | bad_k
            m_k, sum_k = _lse_update(m_k, sum_k, x_k)
        m_c, sum_c = _lse_update(m_c, sum_c, c)
        bad_row = bad_row | tl.max(bad.to(tl.int32), axis=0)
        tl.store(work_row + offs, c, mask=offs < V)
    lse_k = _lse_value(m_k, sum_k)
    lse_r0 = _lse_value(m_r0, sum_r0)
    lse_c = _lse_value(m_c, sum_c)
    tl.debug_barrier()  # the work row is re-read by other threads of the program

    temperature = tl.load(temperature_ptr + row)
    weight_top_p = tl.load(weight_top_p_ptr + row)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)

    # Pass 2: S = {j : key(s_j) >= weight_key}; key 0 takes every token.
    weight_key = tl.full((), 0, tl.int64)
    if HAS_KNOWLEDGE:
        if weight_top_p < 1.0:
            weight_key = _threshold_key(work_row, V, weight_top_p, 0.0, lse_c, 1.0, 0,
                                        MODE=0, BLOCK=BLOCK)

    # Pass 3: z over c in the work row; online lse and max of z.
    m_z = tl.full((), NEG_INF, tl.float32)
    sum_z = tl.full((), 0.0, tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < V
        s = _small_policy(tl.load(work_row + offs, mask=in_row, other=NEG_INF), lse_c)
        if HAS_KNOWLEDGE:
            x_k, _ = _load_logits(k_row, offs, V)
            x_r0, _ = _load_logits(r_row, offs, V)
            z = _eft_score(s, _order_key(s) >= weight_key, x_k, lse_k, x_r0, lse_r0)
        else:
            z = s  # draft mode samples from s
        tl.store(work_row + offs, z, mask=in_row)
        m_z, sum_z = _lse_update(m_z, sum_z, z)
    lse_z = _lse_value(m_z, sum_z)
    lse_z_safe = tl.where(lse_z == NEG_INF, 0.0, lse_z)
    tl.debug_barrier()

    # Pass 4: final filters on z (sampling rows only; greedy ignores them).
    greedy = temperature == 0.0
    safe_temperature = tl.where(greedy, 1.0, temperature)
    top_k_key = tl.full((), 0, tl.int64)
    top_p_key = tl.full((), 0, tl.int64)
    if temperature > 0.0:
        if top_k > 0:
            top_k_key = _threshold_key(work_row, V, top_k.to(tl.float32), 0.0, m_z, 1.0, 0,
                                       MODE=1, BLOCK=BLOCK)
        if top_p < 1.0:
            top_p_key = _threshold_key(work_row, V, 0.0, top_p, m_z, safe_temperature, top_k_key,
                                       MODE=2, BLOCK=BLOCK)
    floor_key = tl.maximum(top_k_key, top_p_key)

    # Pass 5: Gumbel-max over the allowed tokens; ties go to the lowest index.
    seed = tl.load(seeds_ptr + row)
    position = tl.load(positions_ptr + row)
    best = tl.full((), NEG_INF, tl.float32)
    best_z = tl.full((), NEG_INF, tl.float32)
    best_idx = tl.full((), -1, tl.int64)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < V
        z = tl.load(work_row + offs, mask=in_row, other=NEG_INF)
        allowed = (z != NEG_INF) & (_order_key(z) >= floor_key)
        noise = _gumbel_noise(seed, offs, position, USE_LIBDEVICE)
        score = tl.where(greedy, z, tl.math.div_rn(z, safe_temperature) + noise)
        score = tl.where(allowed, score, NEG_INF)
        chunk_best = tl.max(score, axis=0)
        chunk_idx = tl.argmax(score, axis=0, tie_break_left=True)
        take = chunk_best > best  # strict: earlier chunks hold lower indices
        chunk_z = tl.max(tl.where(tl.arange(0, BLOCK) == chunk_idx, z, NEG_INF), axis=0)
        best_idx = tl.where(take, start + chunk_idx.to(tl.int64), best_idx)
        best_z = tl.where(take, chunk_z, best_z)
        best = tl.where(take, chunk_best, best)
        if WRITE_LOGPROBS:
            row_logprob = tl.where(z == NEG_INF, NEG_INF, z - lse_z_safe)
            tl.store(work_row + offs, row_logprob, mask=in_row)

    # Status order as in the other backends: parameters, then NaN / +inf, then no token.
    params_ok = (((temperature == 0.0) | ((temperature >= _GREEDY_T) & (temperature <= 3.4028235e38)))
                 & (weight_top_p > 0.0) & (weight_top_p <= 1.0) & (top_k >= 0) & (top_p > 0.0) & (top_p <= 1.0))
    status = tl.where(params_ok, tl.where(bad_row != 0, 1, tl.where(best_idx < 0, 2, 0)), 3)
    ok = status == 0
    if WRITE_LOGPROBS:
        if status != 0:  # an error row's log-probs are -inf (csrc/eft_math.h, RowStatus)
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                tl.store(work_row + offs, tl.full([BLOCK], NEG_INF, tl.float32), mask=offs < V)
    tl.store(tokens_ptr + row, tl.where(ok, best_idx, -1))
    tl.store(logprob_ptr + row, tl.where(ok, best_z - lse_z_safe, float("nan")))
    tl.store(status_ptr + row, status.to(tl.int32))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def eft_sample_triton(knowledge, tuned, reference, seeds, positions, reward_weights, temperature,
                      weight_top_p, top_k, top_p, vocab_size: int, return_logprobs: bool, *,
                      block_size: int | None = None):
    """Fused EFT sampling in Triton, on canonical inputs (eft_fast._validation.EFTInputs).

    Args:
        knowledge: [B, Vk] fp32/bf16/fp16 logits, or None (draft mode: sample from s).
        tuned: [R, B, Vt] logits.
        reference: [Rr, B, Vr] logits with Rr in {1, R}, or None (draft mode, R = 1, weight 1).
            Every logit tensor needs last-dim stride 1; other strides are free, and widths
            may exceed vocab_size (the extra columns are ignored).
        seeds, positions: [B] int64 (section 3 noise; positions in [0, 2^32)).
        reward_weights: [B, R] float.
        temperature, weight_top_p, top_p: [B] float. top_k: [B] int64.
        vocab_size: V. return_logprobs: also return the rows of log softmax(z).
        block_size: chunk width (a power of 2 >= 16); default min(next_pow2(V), 1024).
            Tests set it small to cover rows that span several chunks.
    Returns:
        tokens [B] int64 (-1 on error rows), logprob [B] fp32 (NaN on error rows),
        row_logprobs [B, V] fp32 (an empty [0, V] tensor unless return_logprobs),
        status [B] int32 (0 ok, 1 NaN / +inf input logit or fp32 overflow, 2 no allowed token,
            3 a sampling parameter out of range); an error row has token -1, log-prob NaN and
            -inf log-probs.
    No host synchronisation: safe to capture in a CUDA graph.
    """
    num_tuned, batch, _ = tuned.shape
    V = int(vocab_size)
    device = tuned.device
    if knowledge is not None and reference is None:
        raise ValueError("reference is required when knowledge is given (only draft mode may omit it)")
    if reference is not None and reference.shape[0] not in (1, num_tuned):
        raise ValueError(f"reference must have Rr in {{1, {num_tuned}}} models, got shape {tuple(reference.shape)}")
    for name, t in (("knowledge", knowledge), ("tuned", tuned), ("reference", reference)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must have last-dim stride 1, got strides {tuple(t.stride())}")

    work = torch.empty((batch, V), dtype=torch.float32, device=device)
    tokens = torch.empty(batch, dtype=torch.int64, device=device)
    logprob = torch.empty(batch, dtype=torch.float32, device=device)
    status = torch.empty(batch, dtype=torch.int32, device=device)
    weights = reward_weights.to(torch.float32).contiguous()
    per_row = lambda t, dtype: t.to(dtype).contiguous()  # noqa: E731

    has_knowledge = knowledge is not None
    has_reference = reference is not None
    knowledge_arg = knowledge if has_knowledge else tuned
    reference_arg = reference if has_reference else tuned
    stride_rr = reference.stride(0) if has_reference and reference.shape[0] > 1 else 0
    block = block_size or max(16, min(triton.next_power_of_2(V), _MAX_BLOCK))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block_size must be a power of 2 >= 16, got {block}")
    interpreting = _interpreting()

    def launch():
        _eft_sample_kernel[(batch,)](
            knowledge_arg, knowledge.stride(0) if has_knowledge else 0,
            tuned, tuned.stride(0), tuned.stride(1),
            reference_arg, stride_rr, reference.stride(1) if has_reference else 0,
            per_row(seeds, torch.int64), per_row(positions, torch.int64), weights, weights.stride(0),
            per_row(temperature, torch.float32), per_row(weight_top_p, torch.float32),
            per_row(top_k, torch.int64), per_row(top_p, torch.float32),
            work, tokens, logprob, status,
            num_tuned, V,
            HAS_KNOWLEDGE=has_knowledge, HAS_REFERENCE=has_reference, WRITE_LOGPROBS=return_logprobs,
            USE_LIBDEVICE=not interpreting, BLOCK=block,
            num_warps=4 if block <= 512 else 8,
        )

    if device.type == "cuda":
        with torch.cuda.device(device):
            launch()
    else:
        launch()
    row_logprobs = work if return_logprobs else work.new_empty(0, V)
    return tokens, logprob, row_logprobs, status
