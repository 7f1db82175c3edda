"""The cpu backend (C++ kernel) against the fp64 reference, on fresh random inputs."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from eft_fast import _extension, eft_sample
from eft_fast._validation import normalize_inputs
from eft_fast.ops import run_backend
from eft_fast.reference import eft_sample_reference

from backend_compare import assert_backend_matches
from random_inputs import random_inputs, wide_gap_inputs

pytestmark = pytest.mark.skipif(not _extension.has_backend("cpu"), reason="native extension not built")

VOCABS = [(1, None), (7, None), (1000, None), (32000, None), (50257, (50304, 50257, 50280))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("vocab,widths", VOCABS, ids=[str(v) for v, _ in VOCABS])
@pytest.mark.parametrize("batch", [1, 3, 64])
def test_grid_matches_reference(rng, batch, vocab, widths, dtype):
    # Every setting is per row, so one batch mixes temperatures, weight_top_p, top_k and top_p.
    repeats = 4 if batch < 64 else 1
    ties = 0
    for i in range(repeats):
        inputs = random_inputs(rng, batch=batch, vocab=vocab, dtype=dtype, widths=widths,
                               num_tuned=1 + i % 2, per_model_reference=i % 4 == 3)
        ties += assert_backend_matches(inputs, run_backend(inputs, "cpu", True), check_rows=True)
    # bf16/fp16 logits sit on a coarse lattice, so thresholds land next to other values more often.
    budget = batch * repeats // (10 if dtype == torch.float32 else 4) + 2
    assert ties <= budget, f"{ties} near-tie rows: the tie detector is too loose"


@pytest.mark.parametrize("draft_reference", [True, False])
@pytest.mark.parametrize("vocab", [7, 1000, 32000])
def test_draft_mode_matches_reference(rng, vocab, draft_reference):
    inputs = random_inputs(rng, batch=16, vocab=vocab, draft=True, draft_reference=draft_reference)
    assert_backend_matches(inputs, run_backend(inputs, "cpu", True), check_rows=True)


@pytest.mark.parametrize("num_tuned,per_model", [(2, False), (2, True), (3, True)])
def test_reward_interpolation_matches_reference(rng, num_tuned, per_model):
    inputs = random_inputs(rng, batch=32, vocab=5000, num_tuned=num_tuned, per_model_reference=per_model)
    assert_backend_matches(inputs, run_backend(inputs, "cpu", True), check_rows=True)


def _split_and_serial(inputs):
    """The cpu backend's outputs on two threads (one row: its vocabulary is split across them)
    and on one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        split = run_backend(inputs, "cpu", True)
        torch.set_num_threads(1)
        serial = run_backend(inputs, "cpu", True)
    finally:
        torch.set_num_threads(threads)
    return split, serial


def test_vocab_split_path_matches_row_path(rng):
    # Fewer rows than threads splits each row's vocabulary across threads; the chunked merge
    # must give the same tokens and (bit-identical) log-probs as one row at a time.
    split, serial = _split_and_serial(random_inputs(rng, batch=1, vocab=70001, filters=True))
    for a, b in zip(split, serial):
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))


def _fixed_inputs(rng, logits, *, weight_top_p, temperature=1.0):
    """Canonical inputs from [3, B, V] logits (knowledge, tuned, reference), one setting for all rows."""
    batch = logits.shape[1]
    return normalize_inputs(
        logits[0], logits[1], logits[2],
        torch.randint(-(2**62), 2**62, (batch,), generator=rng), torch.randint(0, 2**32, (batch,), generator=rng),
        temperature=temperature, weight_top_p=weight_top_p)


TRUNCATION_CASES = {
    # Integer logits: many tokens share the threshold value (ties are all in S or all out).
    "ties": lambda rng, b, v: torch.randint(-4, 5, (3, b, v), generator=rng).float(),
    # Every token equal: S is the whole row.
    "flat": lambda rng, b, v: torch.zeros(3, b, v),
    # Real-LM-like spread: most tokens far below the max, few candidates.
    "peaked": lambda rng, b, v: torch.randn(3, b, v, generator=rng) * 12,
    # Wide enough that a large share of the row is within the candidate floor.
    "wide": lambda rng, b, v: torch.randn(3, b, v, generator=rng) * 4,
    # Half the row masked.
    "masked": lambda rng, b, v: torch.where(torch.rand(3, b, v, generator=rng) < 0.5, float("-inf"),
                                            torch.randn(3, b, v, generator=rng) * 3),
    # Every knowledge logit -inf in half the rows: S has no mass, only the tokens outside it
    # can be sampled.
    "knowledge masked": lambda rng, b, v: _mask_knowledge_rows(torch.randn(3, b, v, generator=rng) * 3),
}


def _mask_knowledge_rows(logits):
    logits[0, ::2] = float("-inf")
    return logits


@pytest.mark.parametrize("weight_top_p", [0.5, 0.9, 0.999, 0.9999, float(torch.tensor(1 - 2**-24))])
@pytest.mark.parametrize("case", list(TRUNCATION_CASES))
def test_weight_truncation_cases_match_reference(rng, case, weight_top_p):
    # The truncation set comes from a candidate selection: ties, whole-row sets, few or many
    # candidates, masked tokens, and weight_top_p next to 1 (where rounding can leave the
    # candidates' mass short of the target, and S becomes every token).
    inputs = _fixed_inputs(rng, TRUNCATION_CASES[case](rng, 8, 20011), weight_top_p=weight_top_p)
    assert_backend_matches(inputs, run_backend(inputs, "cpu", True), check_rows=True)


@pytest.mark.parametrize("weight_top_p", [1.0, 0.9])
def test_vocab_split_truncation_is_bit_identical(rng, weight_top_p):
    # With truncation the split of the tokens into candidates happens inside pass 1 on one
    # thread and after it when the vocabulary is split: the bits must not change.
    inputs = _fixed_inputs(rng, torch.randn(3, 1, 70001, generator=rng) * 4, weight_top_p=weight_top_p)
    split, serial = _split_and_serial(inputs)
    for a, b in zip(split, serial):
        assert torch.equal(a, b)


def _one_row(*values):
    return [torch.tensor([v], dtype=torch.float32) for v in values]


@pytest.mark.parametrize("return_logprobs", [False, True])
def test_truncation_with_the_rest_far_below_the_top(return_logprobs):
    # S is token 1 alone and every other token is about 200 nats below it. The knowledge
    # model leaves S almost no mass of z (1000 nats below) or none (-inf), so z's mass is
    # the mass outside S, which a sum relative to the top of c loses to underflow.
    knowledge, tuned, reference = _one_row([0, -1000, 0, 0], [0, 200, 1, 2], [0] * 4)
    got = eft_sample(knowledge, tuned, reference, 0, 0, weight_top_p=0.5, return_logprobs=return_logprobs,
                     backend="cpu")
    want = eft_sample(knowledge, tuned, reference, 0, 0, weight_top_p=0.5, return_logprobs=return_logprobs,
                      backend="torch")
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)
    assert float(want[1]) == pytest.approx(-0.4076, abs=1e-3)
    if return_logprobs:
        torch.testing.assert_close(got[2], want[2], atol=1e-4, rtol=0)

    knowledge, tuned, reference = _one_row([0, float("-inf"), 0], [0, 200, 0], [0] * 3)
    got = eft_sample(knowledge, tuned, reference, 0, 0, weight_top_p=0.5, return_logprobs=return_logprobs,
                     backend="cpu")
    want = eft_sample(knowledge, tuned, reference, 0, 0, weight_top_p=0.5, return_logprobs=return_logprobs,
                      backend="torch")
    assert int(got[0]) == int(want[0]) == 0
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("knowledge_at_top", [-1000.0, float("-inf")])
@pytest.mark.parametrize("weight_top_p", [0.5, 0.9])
def test_vocab_split_truncation_with_the_rest_far_below_the_top(rng, weight_top_p, knowledge_at_top):
    # The same gaps over three chunks, with the vocabulary split across threads (one row)
    # and not: the top token of c (S, its z pushed down or masked by the knowledge model) is
    # in the middle chunk, the rest of the row hundreds of nats below it.
    logits = torch.randn(3, 1, 20011, generator=rng) * 30
    logits[1, :, 10007] = 500.0
    logits[0, :, 10007] = knowledge_at_top
    inputs = _fixed_inputs(rng, logits, weight_top_p=weight_top_p)
    split, serial = _split_and_serial(inputs)
    for a, b in zip(split, serial):
        assert torch.equal(a, b)
    assert_backend_matches(inputs, serial, check_rows=True, logprob_atol=1e-3)


@pytest.mark.parametrize("num_tuned", [1, 2])
@pytest.mark.parametrize("vocab", [5, 37, 111, 1000])
@pytest.mark.parametrize("scale", [50, 300, 1000])
def test_wide_gaps_match_reference(rng, scale, vocab, num_tuned):
    # Logits spanning hundreds or thousands of nats, some -inf, rows of every (weight_top_p,
    # temperature) pair: no gap may break a sum of exponentials. Both sampling paths (the
    # set list, and z in memory for the full row). fp32 rounds z (up to ~8 * scale) by
    # ~5e-7 * scale per operation, hence the log-prob tolerance.
    inputs = wide_gap_inputs(rng, vocab=vocab, scale=scale, num_tuned=num_tuned)
    atol = max(1e-4, 5e-6 * scale)
    assert_backend_matches(inputs, run_backend(inputs, "cpu", False), logprob_atol=atol)
    assert_backend_matches(inputs, run_backend(inputs, "cpu", True), logprob_atol=atol, check_rows=True)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("mode", ["weight_top_p=1", "weight_top_p=0.9", "draft"])
def test_sampling_paths_agree_with_the_full_row_path(rng, mode, temperature):
    # Without the full row of log-probs (and without top-k / top-p) the kernel samples each
    # chunk as soon as pass 1 has it (no truncation), or samples the truncation set from its
    # list and reads only c for the other tokens. Asking for the row takes the path that
    # forms z for every token. With the knowledge model both compute the same numbers, so
    # they agree bit for bit; in draft mode the single pass samples c / T (z / T shifted by a
    # constant), so a token may differ only at a near tie, which the reference check allows.
    draft = mode == "draft"
    inputs = random_inputs(rng, batch=6, vocab=30011, draft=draft, filters=False)
    wtp = 0.9 if mode == "weight_top_p=0.9" else 1.0
    inputs = dataclasses.replace(inputs, temperature=torch.full_like(inputs.temperature, temperature),
                                 weight_top_p=torch.full_like(inputs.weight_top_p, wtp))
    fast = run_backend(inputs, "cpu", False)
    full = run_backend(inputs, "cpu", True)
    assert fast[2].numel() == 0
    if not draft:
        for a, b in zip((fast[0], fast[1], fast[3]), (full[0], full[1], full[3])):
            assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()))
        return
    assert_backend_matches(inputs, fast)
    same = fast[0] == full[0]
    assert torch.equal(fast[1][same], full[1][same])


def test_batch_invariance(rng):
    inputs = random_inputs(rng, batch=8, vocab=3000)
    base = run_backend(inputs, "cpu", False)
    other = random_inputs(rng, batch=8, vocab=3000)
    for t_new, t_old in ((other.tuned, inputs.tuned), (other.knowledge, inputs.knowledge),
                         (other.reference, inputs.reference)):
        t_new[..., 0, :] = t_old[..., 0, :]  # row 0 identical, other rows different
    for name in ("seeds", "positions", "temperature", "weight_top_p", "top_k", "top_p", "reward_weights"):
        getattr(other, name)[0] = getattr(inputs, name)[0]
    mixed = run_backend(other, "cpu", False)
    assert int(mixed[0][0]) == int(base[0][0])
    assert float(mixed[1][0]) == float(base[1][0])


def test_row_errors_do_not_disturb_other_rows(rng):
    inputs = random_inputs(rng, batch=5, vocab=500, neg_inf_fraction=0.0)
    inputs.tuned[0, 1, 17] = float("nan")
    inputs.knowledge[3, 2] = float("inf")
    inputs.tuned[0, 4, :] = float("-inf")
    out = run_backend(inputs, "cpu", False)
    assert out[3].tolist() == [0, 1, 0, 1, 2]
    assert_backend_matches(inputs, run_backend(inputs, "cpu", True))


def test_chi_square_sampling_follows_pi():
    # Tokens over many seeds follow the filtered, tempered EFT distribution.
    vocab, draws = 12, 40000
    gen = torch.Generator().manual_seed(torch.seed() % 2**62)
    logits = [torch.randn(1, vocab, generator=gen).expand(draws, vocab) for _ in range(3)]
    seeds = torch.randint(0, 2**62, (draws,), generator=gen)
    positions = torch.full((draws,), 7)
    for top_k, top_p in ((0, 1.0), (6, 0.9)):
        tokens, _ = eft_sample(*logits, seeds, positions, temperature=0.8, weight_top_p=0.9, top_k=top_k,
                               top_p=top_p, backend="cpu")
        inputs = normalize_inputs(*[x[:1] for x in logits], seeds[:1], positions[:1], temperature=0.8,
                                  weight_top_p=0.9, top_k=top_k, top_p=top_p)
        ref = eft_sample_reference(*inputs.as_args())
        allowed = ref.allowed[0]
        probs = torch.softmax(torch.where(allowed, ref.scores[0] / 0.8, torch.tensor(float("-inf"),
                              dtype=torch.float64)), -1)
        counts = torch.bincount(tokens, minlength=vocab).double()
        assert counts[~allowed].sum() == 0, "a filtered-out token was sampled"
        keep = allowed & (probs * draws > 5)
        if int(keep.sum()) < 2:  # the filters left one token: it must be every sample
            assert counts[keep].sum() == draws
            continue
        observed = counts[keep]
        expected = probs[keep] * observed.sum() / probs[keep].sum()
        assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-4


def test_seed_reproduces_and_positions_change_samples(rng):
    inputs = random_inputs(rng, batch=64, vocab=2000, filters=False)
    inputs.temperature.fill_(1.0)
    a = run_backend(inputs, "cpu", False)[0]
    b = run_backend(inputs, "cpu", False)[0]
    assert torch.equal(a, b)
    inputs.positions += 1
    c = run_backend(inputs, "cpu", False)[0]
    assert not torch.equal(a, c)


def test_opcheck(rng):
    inputs = random_inputs(rng, batch=3, vocab=769, num_tuned=2, per_model_reference=True)
    for return_logprobs in (False, True):
        torch.library.opcheck(torch.ops.eft_fast.eft_sample.default, (*inputs.as_args(), return_logprobs))
    draft = random_inputs(rng, batch=5, vocab=5125, draft=True, draft_reference=False)
    torch.library.opcheck(torch.ops.eft_fast.eft_sample.default, (*draft.as_args(), False))
    torch.library.opcheck(torch.ops.eft_fast.gumbel_noise.default, (inputs.seeds, inputs.positions, 769))


def test_torch_compile_fullgraph(rng):
    inputs = random_inputs(rng, batch=4, vocab=1000)
    compiled = torch.compile(lambda *args: torch.ops.eft_fast.eft_sample(*args), fullgraph=True)
    got = compiled(*inputs.as_args(), False)
    want = run_backend(inputs, "cpu", False)
    assert torch.equal(got[0], want[0])


def test_op_rejects_bad_direct_calls(rng):
    inputs = random_inputs(rng, batch=3, vocab=100)
    args = list(inputs.as_args())
    bad_top_k = list(args)
    bad_top_k[8] = inputs.top_k.to(torch.int32)
    with pytest.raises(ValueError, match="top_k"):
        torch.ops.eft_fast.eft_sample(*bad_top_k, False)
    narrow = list(args)
    narrow[10] = 101
    with pytest.raises(ValueError, match="vocab_size"):
        torch.ops.eft_fast.eft_sample(*narrow, False)


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 6), vocab=st.integers(1, 300), scale=st.floats(0.0, 60.0),
       inf_frac=st.floats(0.0, 1.0), num_tuned=st.integers(1, 3), draft=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**62))
def test_fuzz_no_crash_no_nan(batch, vocab, scale, inf_frac, num_tuned, draft, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    inputs = random_inputs(gen, batch=batch, vocab=vocab, dtype=dtype, num_tuned=num_tuned, draft=draft,
                           per_model_reference=num_tuned > 1, neg_inf_fraction=inf_frac, scale=scale)
    tokens, logprob, rows, status = run_backend(inputs, "cpu", True)
    ok = status == 0
    assert bool(((tokens >= 0) & (tokens < vocab))[ok].all())
    assert not bool(torch.isnan(logprob[ok]).any())
    assert not bool(torch.isnan(rows[ok]).any())
    assert bool((status[~ok] == 2).all())  # no NaN inputs here: failures are "no allowed token"
    ref = eft_sample_reference(*inputs.as_args())
    assert torch.equal(status, ref.status)


def test_overflowing_combination_is_a_row_error_not_a_crash():
    # c = x_R0 + beta (x_T - x_R) overflows fp32: the row is reported, the others still sample.
    zeros = torch.zeros(2, 3)
    tuned = torch.tensor([[4.0, 0.0, 1.0], [3e38, 0.0, 1.0]])
    reference = torch.tensor([[0.0, 0.0, 0.0], [-3e38, 0.0, 0.0]])
    inputs = normalize_inputs(zeros, tuned, reference, torch.arange(2), torch.zeros(2, dtype=torch.int64),
                              reward_weights=torch.tensor([[1e38], [1.0]]))
    tokens, _, _, status = run_backend(inputs, "cpu", False)
    assert status.tolist() == [1, 1]
    ok = normalize_inputs(zeros[:1], tuned[:1], reference[:1], 0, 0)
    assert int(run_backend(ok, "cpu", False)[3][0]) == 0
