"""Philox4x32-10 and the Gumbel noise of docs/DESIGN.md section 3.

- eft_fast.philox.philox4x32_10 is bit-equal to Triton's tl.philox (run in the interpreter)
  and to the Random123 known-answer vectors;
- exponential_from_word / gumbel_noise are accurate and bounded at the extreme words;
- the compiled torch.ops.eft_fast.gumbel_noise equals the fp64 Python spec.
"""
import os

# TRITON_INTERPRET is set by tests/conftest.py when there is no GPU.

import math

import mpmath
import pytest
import torch

import eft_fast.philox as philox
from eft_fast import _extension
from eft_fast.philox import exponential_from_word, gumbel_noise, philox4x32_10

MASK32 = 0xFFFFFFFF


def as_int64(u64: int) -> int:
    """The uint64 bit pattern u64 as a signed int64 value."""
    return u64 - (1 << 64) if u64 >= (1 << 63) else u64


def seed_from_key(k0: int, k1: int) -> int:
    return as_int64(k0 | (k1 << 32))


# ---------------------------------------------------------------------------------------------
# Known-answer vectors (Random123 kat_vectors, philox4x32_10)
# ---------------------------------------------------------------------------------------------

KAT = [
    # counter (c0, c1, c2, c3), key (k0, k1), expected words
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32, MASK32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT, ids=["zeros", "ones", "pi"])
def test_known_answer_vectors(counter, key, expected):
    seed = torch.tensor([seed_from_key(*key)], dtype=torch.int64)
    words = philox4x32_10(seed, *(torch.tensor([c], dtype=torch.int64) for c in counter))
    got = tuple(int(w.item()) for w in words)
    assert got == expected, f"got {[hex(w) for w in got]}, expected {[hex(w) for w in expected]}"
    for w in words:
        assert w.dtype == torch.int64


def test_known_answer_vectors_broadcast():
    """The three KAT cases in one batched call (broadcasting, no cross-talk between elements)."""
    seeds = torch.tensor([seed_from_key(*k) for _, k, _ in KAT], dtype=torch.int64)
    counters = [torch.tensor([c[i] for c, _, _ in KAT], dtype=torch.int64) for i in range(4)]
    words = torch.stack(philox4x32_10(seeds, *counters), dim=1)
    expected = torch.tensor([e for _, _, e in KAT], dtype=torch.int64)
    assert torch.equal(words, expected)


def test_words_are_uint32_range(rng):
    seeds = torch.randint(-2**63, 2**63 - 1, (64, 1), generator=rng, dtype=torch.int64)
    j = torch.arange(257, dtype=torch.int64)[None, :]
    pos = torch.randint(0, 2**32, (64, 1), generator=rng, dtype=torch.int64)
    for w in philox4x32_10(seeds, j, pos, torch.zeros_like(j), torch.zeros_like(j)):
        assert int(w.min()) >= 0 and int(w.max()) <= MASK32
    # Not constant: a broken round function that collapses to a few values would fail this.
    w0 = philox4x32_10(seeds, j, pos, torch.zeros_like(j), torch.zeros_like(j))[0]
    assert w0.unique().numel() > 0.99 * w0.numel()


# ---------------------------------------------------------------------------------------------
# Bit-equality with Triton's tl.philox (interpreter)
# ---------------------------------------------------------------------------------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton checks are skipped; everything else still runs
    triton = None

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")


if triton is not None:

    @triton.jit
    def _philox_words_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        seed = tl.load(seed_ptr + row)  # int64
        pos = tl.load(pos_ptr + row).to(tl.uint32)
        for start in range(0, V, BLOCK):
            j = start + tl.arange(0, BLOCK)
            mask = j < V
            c0 = j.to(tl.uint32)
            zero = tl.zeros_like(c0)
            w0, w1, w2, w3 = tl.philox(seed, c0, pos + zero, zero, zero)
            base = out_ptr + row * 4 * V
            tl.store(base + j, w0.to(tl.int64), mask=mask)
            tl.store(base + V + j, w1.to(tl.int64), mask=mask)
            tl.store(base + 2 * V + j, w2.to(tl.int64), mask=mask)
            tl.store(base + 3 * V + j, w3.to(tl.int64), mask=mask)



def triton_words(seeds: torch.Tensor, positions: torch.Tensor, V: int) -> torch.Tensor:
    # On a GPU the kernel runs there; without one, in the interpreter on CPU tensors.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((seeds.numel(), 4, V), -1, dtype=torch.int64, device=device)
    _philox_words_kernel[(seeds.numel(),)](seeds.to(device).contiguous(), positions.to(device).contiguous(),
                                           out, V, BLOCK=32)
    return out.cpu()


def torch_words(seeds: torch.Tensor, positions: torch.Tensor, V: int) -> torch.Tensor:
    j = torch.arange(V, dtype=torch.int64)[None, :]
    zero = torch.zeros_like(j)
    return torch.stack(philox4x32_10(seeds[:, None], j, positions[:, None], zero, zero), dim=1)


SPECIAL_SEEDS = [0, 1, 2, 2**32 - 1, 2**32, 2**40 + 7, -1, -2, -(2**40) - 3, -(2**63), 2**63 - 1]
SPECIAL_POSITIONS = [0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]


@needs_triton
@pytest.mark.parametrize("V", [1, 37, 70])
def test_matches_triton_philox_special(V):
    seeds = torch.tensor([s for s in SPECIAL_SEEDS for _ in SPECIAL_POSITIONS], dtype=torch.int64)
    positions = torch.tensor([p for _ in SPECIAL_SEEDS for p in SPECIAL_POSITIONS], dtype=torch.int64)
    got = torch_words(seeds, positions, V)
    want = triton_words(seeds, positions, V)
    mismatch = (got != want).any(-1).any(-1)
    assert not mismatch.any(), (
        f"rows (seed, position) {[(int(seeds[i]), int(positions[i])) for i in mismatch.nonzero().flatten()]} "
        "differ from tl.philox")


@needs_triton
def test_matches_triton_philox_random(rng):
    n = 24
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=rng, dtype=torch.int64)
    positions = torch.randint(0, 2**32, (n,), generator=rng, dtype=torch.int64)
    V = int(torch.randint(2, 100, (1,), generator=rng))
    got = torch_words(seeds, positions, V)
    want = triton_words(seeds, positions, V)
    assert torch.equal(got, want), f"V={V}: {(got != want).sum()} words differ from tl.philox"


# ---------------------------------------------------------------------------------------------
# Exponential and Gumbel noise from a word
# ---------------------------------------------------------------------------------------------

mpmath.mp.prec = 200


def exact_exponential(w0: int) -> float:
    """-log(u), u = (w0 + 0.5) 2^-32, to 200 bits, written as -log1p(-(1 - u)) near u = 1."""
    one_minus_u = mpmath.mpf(2**32 - w0) - mpmath.mpf("0.5")
    one_minus_u = one_minus_u * mpmath.mpf(2) ** -32
    return float(-mpmath.log1p(-one_minus_u))


EXTREME_WORDS = ([0, 1, 2, 3, 1000, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1]
                 + [2**32 - 1 - i for i in range(0, 64)] + [2**32 - 1000, 2**32 - 12345, 2**32 - 2**20])


def test_exponential_from_word_no_cancellation():
    words = torch.tensor(EXTREME_WORDS, dtype=torch.int64)
    got = exponential_from_word(words)
    assert got.dtype == torch.float64
    for w, e in zip(EXTREME_WORDS, got.tolist()):
        want = exact_exponential(w)
        assert math.isfinite(e) and e > 0
        assert abs(e - want) <= 1e-12 * want, f"w0={w:#x}: got {e!r}, want {want!r}"


def test_exponential_from_word_python_math(rng):
    """Same check against python's math.log1p / math.log on random words over the whole range."""
    words = torch.randint(0, 2**32, (2000,), generator=rng, dtype=torch.int64)
    words = torch.cat([words, torch.randint(2**32 - 2**16, 2**32, (500,), generator=rng, dtype=torch.int64)])
    got = exponential_from_word(words).tolist()
    for w, e in zip(words.tolist(), got):
        if w >= 2**31:
            want = -math.log1p(-(2**32 - w - 0.5) * 2.0**-32)
        else:
            want = -math.log((w + 0.5) * 2.0**-32)
        assert abs(e - want) <= 1e-12 * want, f"w0={w:#x}: got {e!r}, want {want!r}"


def test_exponential_is_monotone_decreasing_in_word():
    words = torch.tensor(sorted(set(EXTREME_WORDS)), dtype=torch.int64)
    e = exponential_from_word(words)
    assert bool((e[1:] < e[:-1]).all())


def test_gumbel_noise_extreme_words(monkeypatch):
    """gumbel_noise on words forced to the extremes (Philox replaced by a table) is finite and bounded."""
    table = torch.tensor(EXTREME_WORDS, dtype=torch.int64)
    V = table.numel()

    def fake_philox(seed, c0, c1, c2, c3):
        w = table[c0].expand(torch.broadcast_shapes(seed.shape, c0.shape))
        return w, w, w, w

    monkeypatch.setattr(philox, "philox4x32_10", fake_philox)
    g = philox.gumbel_noise(torch.tensor([5, -7]), torch.tensor([0, 3]), V)
    assert g.shape == (2, V) and g.dtype == torch.float64
    assert bool(torch.isfinite(g).all())
    assert float(g.min()) >= -3.2 and float(g.max()) <= 23.0
    # The extremes are actually reached: w0 = 0 -> about -3.13, w0 = 2^32 - 1 -> about 22.87.
    expected_min = -math.log(-math.log(0.5 * 2.0**-32))
    expected_max = -math.log(exact_exponential(2**32 - 1))
    assert math.isclose(float(g[0, 0]), expected_min, rel_tol=1e-12)
    assert math.isclose(float(g[0, EXTREME_WORDS.index(2**32 - 1)]), expected_max, rel_tol=1e-12)


def test_gumbel_noise_shape_and_distribution(rng):
    B, V = 64, 500
    seeds = torch.randint(-2**63, 2**63 - 1, (B,), generator=rng, dtype=torch.int64)
    positions = torch.randint(0, 2**32, (B,), generator=rng, dtype=torch.int64)
    g = gumbel_noise(seeds, positions, V)
    assert g.shape == (B, V) and g.dtype == torch.float64
    assert bool(torch.isfinite(g).all())
    assert float(g.min()) >= -3.2 and float(g.max()) <= 23.0
    # Standard Gumbel: mean = Euler-Mascheroni 0.5772, var = pi^2 / 6 (n = 32000, loose bounds).
    assert abs(float(g.mean()) - 0.5772156649) < 0.05
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.1


def test_gumbel_noise_is_pure_function_of_seed_position_token(rng):
    V = 50
    seeds = torch.randint(-2**63, 2**63 - 1, (6,), generator=rng, dtype=torch.int64)
    positions = torch.randint(0, 2**32, (6,), generator=rng, dtype=torch.int64)
    g = gumbel_noise(seeds, positions, V)
    perm = torch.randperm(6, generator=rng)
    assert torch.equal(gumbel_noise(seeds[perm], positions[perm], V), g[perm])
    # A prefix of the vocabulary gives a prefix of the noise.
    assert torch.equal(gumbel_noise(seeds, positions, 17), g[:, :17])
    # A different position gives different noise.
    other = gumbel_noise(seeds, (positions + 1) % 2**32, V)
    assert not torch.equal(other, g)
    # The noise of token j is -log(E(w0)) with w0 = Philox word 0 at counter (j, position, 0, 0).
    j = torch.arange(V)[None, :]
    w0 = philox4x32_10(seeds[:, None], j, positions[:, None], torch.zeros_like(j), torch.zeros_like(j))[0]
    assert torch.equal(g, -torch.log(exponential_from_word(w0)))


# ---------------------------------------------------------------------------------------------
# The compiled C++ twin
# ---------------------------------------------------------------------------------------------

def _native_ops():
    if not _extension.available():
        pytest.skip("eft_fast native extension not built")
    ops = _extension.ops()
    if not hasattr(ops, "gumbel_noise"):
        pytest.skip("torch.ops.eft_fast.gumbel_noise not registered")
    return ops


def test_native_gumbel_noise_matches_python(rng):
    ops = _native_ops()
    B, V = 32, 1000
    seeds = torch.randint(-2**63, 2**63 - 1, (B,), generator=rng, dtype=torch.int64)
    seeds[:4] = torch.tensor([0, -1, 2**63 - 1, -(2**63)])
    positions = torch.randint(0, 2**32, (B,), generator=rng, dtype=torch.int64)
    positions[:3] = torch.tensor([0, 2**32 - 1, 2**31])
    got = ops.gumbel_noise(seeds, positions, V)
    want = gumbel_noise(seeds, positions, V)
    assert got.shape == (B, V)
    assert got.is_floating_point()
    torch.testing.assert_close(got.to(torch.float64), want, rtol=1e-5, atol=1e-5)
