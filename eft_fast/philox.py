"""Philox4x32-10 and the Gumbel noise of docs/DESIGN.md section 3, in plain torch.

Every random number eft_fast uses is a pure function of (seed, position, token):

    w0, w1, w2, w3 = philox4x32_10(key=(seed & 0xffffffff, seed >> 32), counter=(j, position, 0, 0))
    u_j = (w0 + 0.5) * 2^-32,  E_j = -log(u_j),  g_j = -log(E_j)

This module is the executable spec; csrc/eft_math.h is its C++/CUDA twin and Triton's
``tl.philox`` computes the same words. uint32 arithmetic is emulated in int64 tensors.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_TWO_POW_MINUS_32 = 2.0**-32


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for a uint32 constant a and int64 tensor b < 2^32."""
    # Split b in 16-bit halves so no partial product overflows int64 (each is < 2^48).
    low_product = a * (b & 0xFFFF)
    high_product = a * (b >> 16)
    t = high_product + (low_product >> 16)
    hi = t >> 16
    lo = ((t & 0xFFFF) << 16) | (low_product & 0xFFFF)
    return hi & _MASK32, lo & _MASK32


def philox4x32_10(
    seed: torch.Tensor, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox 4x32 with 10 rounds, as Triton's ``tl.philox(seed, c0, c1, c2, c3)``.

    Args:
        seed: int64 tensor, read as the uint64 bit pattern; key = (low 32 bits, high 32 bits).
        c0..c3: int64 tensors of counter words in [0, 2^32), broadcastable with ``seed``.
    Returns:
        Four int64 tensors holding the uint32 output words.
    """
    seed = seed.to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32  # arithmetic shift, masked: the uint64 high word
    c0, c1, c2, c3 = (c.to(torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        hi_b, lo_b = _mulhilo32(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def exponential_from_word(w0: torch.Tensor) -> torch.Tensor:
    """E = -log(u) with u = (w0 + 0.5) * 2^-32, in fp64 and without cancellation near u = 1."""
    w = w0.to(torch.float64)
    u = (w + 0.5) * _TWO_POW_MINUS_32
    complement = ((_MASK32 - w0).to(torch.float64) + 0.5) * _TWO_POW_MINUS_32  # 1 - u, exact
    return torch.where(w0 < 0x80000000, -torch.log(u), -torch.log1p(-complement))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int, stream: int = 0) -> torch.Tensor:
    """Gumbel noise g[b, j] of token j for row b (fp64 reference).

    Args:
        seeds: [B] int64, per-request seeds (any int64; read as uint64 bits).
        positions: [B] int64, absolute position of the token being sampled.
        vocab_size: V.
        stream: the third counter word. 0 is the sampling noise of docs/DESIGN.md section 3;
            other streams are independent draws for the same (seed, position), used by
            rejection-sampling speculative decoding.
    Returns:
        [B, V] float64.
    """
    tokens = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)[None, :]
    w0, _, _, _ = philox4x32_10(seeds[:, None], tokens, positions[:, None], torch.full_like(tokens, stream),
                                torch.zeros_like(tokens))
    return -torch.log(exponential_from_word(w0))


def uniform(seeds: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """One uniform u in (0, 1) per row: (w0 + 0.5) 2^-32 of counter (0, position, stream, 0). [B] fp64."""
    zero = torch.zeros_like(positions)
    w0, _, _, _ = philox4x32_10(seeds, zero, positions, torch.full_like(positions, stream), zero)
    return (w0.to(torch.float64) + 0.5) * _TWO_POW_MINUS_32
