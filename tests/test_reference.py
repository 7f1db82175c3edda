"""The fp64 reference (eft_fast.reference) against docs/DESIGN.md section 2.

The checks use hand-computed cases, the paper's closed forms, and an independent numpy
re-implementation of the spec (one row at a time, plain loops) written below.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from eft_fast._validation import normalize_inputs
from eft_fast.philox import gumbel_noise
from eft_fast.reference import (ROW_NAN, ROW_NO_TOKEN, ROW_OK, eft_sample_reference, top_k_mask,
                                top_p_threshold_mask)

NEG_INF = float("-inf")
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def ref(knowledge, tuned, reference, seeds=None, positions=None, **kw):
    """Validate + run the reference; seeds/positions default to 0 .. B-1."""
    batch = tuned.shape[-2]
    if seeds is None:
        seeds = torch.arange(batch, dtype=torch.int64)
    if positions is None:
        positions = torch.arange(batch, dtype=torch.int64)
    inputs = normalize_inputs(knowledge, tuned, reference, seeds, positions, **kw)
    return eft_sample_reference(*inputs.as_args())


def lsm(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x.to(F64), dim=-1)


def randn(rng, *shape, scale=1.0):
    return torch.randn(*shape, generator=rng, dtype=F64) * scale


def rand_seeds(rng, n):
    return torch.randint(-2**63, 2**63 - 1, (n,), generator=rng, dtype=torch.int64)


def rand_positions(rng, n):
    return torch.randint(0, 2**32, (n,), generator=rng, dtype=torch.int64)


def assert_no_nan(out):
    for name in ("small_policy", "scores", "row_logprobs"):
        t = getattr(out, name)
        assert not bool(torch.isnan(t).any()), f"{name} has NaN: {t}"


# --- independent numpy oracle of docs/DESIGN.md section 2 (one row) ------------------------------

def np_lsm(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = ~np.isneginf(x)
    out = np.full_like(x, -np.inf)
    if not finite.any():
        return out
    m = x[finite].max()
    lse = m + math.log(np.exp(x[finite] - m).sum())
    out[finite] = x[finite] - lse
    return out


def np_top_p_set(lp: np.ndarray, p: float) -> np.ndarray:
    """Tie-inclusive top-p set of exp(lp): {j : exp(lp_j) >= tau}; p >= 1 keeps every finite token."""
    finite = ~np.isneginf(lp)
    if p >= 1.0:
        return finite
    cum = 0.0
    tau = None
    for idx in sorted(np.flatnonzero(finite), key=lambda i: -lp[i]):
        cum += math.exp(lp[idx])
        if cum >= p:
            tau = lp[idx]
            break
    if tau is None:
        return finite
    return finite & (lp >= tau)


def oracle_row(xk, xts, xrs, beta, T, pw, k, p):
    """(s, z, allowed, probs) of one row; probs = the final filtered distribution (T > 0)."""
    lts = [np_lsm(x) for x in xts]
    if xrs is None:
        s = lts[0]
    else:
        lrs = [np_lsm(x) for x in xrs]
        if len(lrs) == 1:
            lrs = lrs * len(lts)
        masked = np.isneginf(lrs[0]).copy()
        for l in lts + lrs:
            masked |= np.isneginf(l)
        comb = np.zeros_like(lrs[0])
        for j in range(comb.shape[0]):
            if masked[j]:
                comb[j] = -np.inf
            else:
                comb[j] = lrs[0][j] + sum(b * (lt[j] - lr[j]) for b, lt, lr in zip(beta, lts, lrs))
        s = np_lsm(comb)
    z = s.copy()
    if xk is not None:
        lk, lr0 = np_lsm(xk), np_lsm(xrs[0])
        in_set = np_top_p_set(s, pw)
        for j in np.flatnonzero(in_set):
            if np.isneginf(lk[j]) or np.isneginf(lr0[j]):
                z[j] = -np.inf
            else:
                z[j] = s[j] + lk[j] - lr0[j]
    allowed = ~np.isneginf(z)
    if T == 0:
        return s, z, allowed, None
    if k > 0:
        kth = np.sort(z)[::-1][min(k, len(z)) - 1]
        allowed &= z >= kth
    tempered = np.where(allowed, z / T, -np.inf)
    allowed &= np_top_p_set(np_lsm(tempered), p)
    probs = np.exp(np_lsm(np.where(allowed, z / T, -np.inf)))
    return s, z, allowed, probs


def chisquare_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit; bins with expected count < 5 are pooled."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = list(counts[big])
    exp = list(expected[big])
    if (~big).any():
        obs.append(counts[~big].sum())
        exp.append(expected[~big].sum())
    obs, exp = np.array(obs, dtype=np.float64), np.array(exp, dtype=np.float64)
    exp *= obs.sum() / exp.sum()
    if len(obs) < 2:
        return 1.0
    return float(chisquare(obs, exp).pvalue)


# ---------------------------------------------------------------------------------------------
# hand-computed cases
# ---------------------------------------------------------------------------------------------

def test_hand_computed_upscaling():
    xk = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    xt = torch.tensor([[0.0, 1.0, 0.0]], dtype=F64)
    xr = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    out = ref(xk, xt, xr, temperature=0.0)
    # z = log_softmax(x_K + x_T - x_R) = log_softmax([1, 3, 2])
    lse = math.log(math.e + math.e**3 + math.e**2)
    expected_z = [1 - lse, 3 - lse, 2 - lse]
    assert out.row_logprobs[0].tolist() == pytest.approx(expected_z, abs=1e-12)
    # s = l_T = log_softmax([0, 1, 0])
    lse_t = math.log(2 + math.e)
    assert out.small_policy[0].tolist() == pytest.approx([-lse_t, 1 - lse_t, -lse_t], abs=1e-12)
    assert out.tokens.tolist() == [1]
    assert out.logprob.tolist() == pytest.approx([3 - lse], abs=1e-12)
    assert out.status.tolist() == [ROW_OK]


@pytest.mark.parametrize("pw,expected", [
    # small policy s = [.5, .3, .2]; p_K = [.1, .1, .8]; p_R = [1/3] * 3; weights p_K/p_R inside S
    (0.5, [0.5 * 0.1 * 3, 0.3, 0.2]),           # S = {0}
    (0.79, [0.5 * 0.1 * 3, 0.3 * 0.1 * 3, 0.2]),  # S = {0, 1}
    (0.81, [0.15, 0.09, 0.2 * 0.8 * 3]),        # S = everything
    (1.0, [0.15, 0.09, 0.48]),
])
def test_hand_computed_weight_top_p(pw, expected):
    xt = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=F64))
    xr = torch.zeros(1, 3, dtype=F64)
    xk = torch.log(torch.tensor([[0.1, 0.1, 0.8]], dtype=F64))
    out = ref(xk, xt, xr, weight_top_p=pw)
    want = np.log(np.array(expected) / sum(expected))
    assert out.row_logprobs[0].tolist() == pytest.approx(want.tolist(), abs=1e-12)
    assert out.small_policy[0].exp().tolist() == pytest.approx([0.5, 0.3, 0.2], abs=1e-12)


# ---------------------------------------------------------------------------------------------
# closed forms from the paper
# ---------------------------------------------------------------------------------------------

def test_equation_5_weight_top_p_one(rng):
    B, V = 16, 37
    xk, xt, xr = randn(rng, B, V, scale=3), randn(rng, B, V, scale=3), randn(rng, B, V, scale=3)
    out = ref(xk, xt, xr, weight_top_p=1.0)
    torch.testing.assert_close(out.row_logprobs, lsm(lsm(xk) + lsm(xt) - lsm(xr)), rtol=0, atol=1e-10)
    torch.testing.assert_close(out.row_logprobs, lsm(xk + xt - xr), rtol=0, atol=1e-10)
    # z itself is l_K + l_T - l_R up to a constant per row
    diff = out.scores - (lsm(xk) + lsm(xt) - lsm(xr))
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=0, atol=1e-10)


def test_weight_top_p_one_keeps_every_finite_token():
    """docs/DESIGN.md: with p_w = 1, S = every token with s_j > -inf, however small exp(s_j) is.

    Token 1 has tiny small-policy mass (exp(-40)) but the knowledge model's weight p_K / p_R on it
    is huge, so equation 5 puts almost all of the EFT mass on it. A truncation set computed from a
    rounded cumulative sum that reaches 1.0 early leaves token 1 out of S.
    """
    xk = torch.tensor([[0.0, 30.0, 0.0]], dtype=F64)
    xt = torch.tensor([[0.0, -40.0, -3.0]], dtype=F64)
    xr = torch.tensor([[0.0, -30.0, 0.0]], dtype=F64)
    out = ref(xk, xt, xr, weight_top_p=1.0, temperature=0.0)
    torch.testing.assert_close(out.row_logprobs, lsm(xk + xt - xr), rtol=0, atol=1e-10)
    assert out.tokens.tolist() == [1]


def test_weight_top_p_one_keeps_every_finite_token_random(rng):
    """Same property on random rows with a wide logit range (some tokens below 2^-53 of the mass)."""
    B, V = 32, 33
    xk, xt, xr = randn(rng, B, V, scale=4), randn(rng, B, V, scale=15), randn(rng, B, V, scale=4)
    out = ref(xk, xt, xr, weight_top_p=1.0)
    torch.testing.assert_close(out.row_logprobs, lsm(xk + xt - xr), rtol=0, atol=1e-9)


def test_r1_beta1_small_policy_is_tuned(rng):
    B, V = 8, 29
    xk, xt, xr = randn(rng, B, V, scale=2), randn(rng, B, V, scale=2), randn(rng, B, V, scale=2)
    out = ref(xk, xt, xr)
    torch.testing.assert_close(out.small_policy, lsm(xt), rtol=0, atol=1e-12)
    out3 = ref(xk, xt[None], xr[None], reward_weights=torch.ones(B, 1, dtype=F64))
    torch.testing.assert_close(out3.small_policy, lsm(xt), rtol=0, atol=1e-12)


def test_reward_interpolation_shared_reference(rng):
    B, V = 12, 31
    xk, xr = randn(rng, B, V, scale=2), randn(rng, B, V, scale=2)
    xt = randn(rng, 2, B, V, scale=2)
    a = torch.rand(B, generator=rng, dtype=F64)
    beta = torch.stack([a, 1 - a], dim=1)
    out = ref(xk, xt, xr, reward_weights=beta)
    l_r = lsm(xr)
    a_ = a[:, None]
    want_s = lsm(l_r + a_ * (lsm(xt[0]) - l_r) + (1 - a_) * (lsm(xt[1]) - l_r))
    torch.testing.assert_close(out.small_policy, want_s, rtol=0, atol=1e-6)  # beta is fp32
    torch.testing.assert_close(out.row_logprobs, lsm(want_s + lsm(xk) - l_r), rtol=0, atol=1e-6)
    # Rr = 1 given as [1, B, V] is the same
    out1 = ref(xk, xt, xr[None], reward_weights=beta)
    assert torch.equal(out1.scores, out.scores)


def test_reward_interpolation_per_model_references(rng):
    B, V = 12, 31
    xk = randn(rng, B, V, scale=2)
    xt, xr = randn(rng, 2, B, V, scale=2), randn(rng, 2, B, V, scale=2)
    a = torch.rand(B, generator=rng, dtype=torch.float32)
    beta = torch.stack([a, 1 - a], dim=1)
    out = ref(xk, xt, xr, reward_weights=beta)
    a_ = a.to(F64)[:, None]
    b_ = beta[:, 1].to(F64)[:, None]
    l_r0, l_r1 = lsm(xr[0]), lsm(xr[1])
    want_s = lsm(l_r0 + a_ * (lsm(xt[0]) - l_r0) + b_ * (lsm(xt[1]) - l_r1))
    torch.testing.assert_close(out.small_policy, want_s, rtol=0, atol=1e-10)
    torch.testing.assert_close(out.row_logprobs, lsm(want_s + lsm(xk) - l_r0), rtol=0, atol=1e-10)


def test_reward_weights_scale_the_reward(rng):
    """beta = (2,) doubles the implicit reward: s = log_softmax(l_R + 2 (l_T - l_R))."""
    B, V = 4, 17
    xt, xr = randn(rng, B, V), randn(rng, B, V)
    out = ref(None, xt, xr, reward_weights=torch.full((B, 1), 2.0))
    torch.testing.assert_close(out.small_policy, lsm(2 * lsm(xt) - lsm(xr)), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# truncation set and filters
# ---------------------------------------------------------------------------------------------

TIE_PROBS = [0.3, 0.3, 0.2, 0.2]


@pytest.mark.parametrize("p,expected", [
    (1e-9, [1, 1, 0, 0]), (0.3, [1, 1, 0, 0]), (0.5, [1, 1, 0, 0]), (0.6, [1, 1, 0, 0]),
    (0.61, [1, 1, 1, 1]), (0.9, [1, 1, 1, 1]), (1.0, [1, 1, 1, 1]),
])
def test_top_p_set_ties_direct(p, expected):
    lp = torch.log(torch.tensor([TIE_PROBS], dtype=F64))
    mask = top_p_threshold_mask(lp, torch.tensor([p], dtype=F64))
    assert mask.to(torch.int64)[0].tolist() == expected


# weight_top_p reaches the reference as fp32 (fp32(0.6) = 0.600000024 > 0.3 + 0.3), so the boundary
# case p = 0.6 exactly is checked on top_p_threshold_mask above and 0.5999999 is used here.
@pytest.mark.parametrize("p,expected", [(0.5, [1, 1, 0, 0]), (0.5999999, [1, 1, 0, 0]),
                                        (0.61, [1, 1, 1, 1]), (0.25, [1, 1, 0, 0])])
def test_truncation_set_ties_in_eft_scores(p, expected):
    """S seen through z: tokens in S get z - s = l_K - l_R0 (nonzero here), tokens outside get 0."""
    perm = [2, 0, 3, 1]  # tie tokens at shuffled positions
    probs = torch.tensor([TIE_PROBS], dtype=F64)[:, perm]
    exp_mask = torch.tensor(expected)[perm]
    xt = torch.log(probs)
    xr = torch.zeros(1, 4, dtype=F64)
    xk = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=F64)
    out = ref(xk, xt, xr, weight_top_p=p)
    up = lsm(xk) - lsm(xr)
    delta = out.scores - out.small_policy
    in_set = (delta - up).abs() < 1e-9
    out_set = delta.abs() < 1e-12
    assert bool((in_set ^ out_set).all())
    assert in_set[0].to(torch.int64).tolist() == exp_mask.tolist()


def test_truncation_set_contains_argmax_and_is_minimal(rng):
    B, V = 64, 23
    lp = lsm(randn(rng, B, V, scale=2))
    p = torch.rand(B, generator=rng, dtype=F64)
    p[:8] = torch.tensor([1e-12, 1e-6, 0.01, 0.5, 0.999, 0.999999, 1.0, 1.0 - 1e-12], dtype=F64)
    mask = top_p_threshold_mask(lp, p)
    assert bool(mask.gather(-1, lp.argmax(-1, keepdim=True)).all()), "S lost the argmax"
    probs = lp.exp()
    for b in range(B):
        m = mask[b]
        mass = float(probs[b][m].sum())
        assert mass >= float(p[b]) - 1e-12 or bool(m.all())
        # threshold set: everything at least as likely as the least likely member is in S
        tau = float(lp[b][m].min())
        assert bool((m == (lp[b] >= tau)).all())
        # minimal: dropping the least likely members leaves mass < p
        assert float(probs[b][lp[b] > tau].sum()) < float(p[b])


def test_truncation_set_matches_oracle(rng):
    B, V = 32, 19
    lp = lsm(randn(rng, B, V, scale=2))
    lp[:4, :3] = NEG_INF
    p = torch.rand(B, generator=rng, dtype=F64) * 0.999 + 0.001
    mask = top_p_threshold_mask(lp, p)
    for b in range(B):
        want = np_top_p_set(lp[b].numpy(), float(p[b]))
        assert mask[b].tolist() == want.tolist()


@pytest.mark.parametrize("k,expected", [
    (0, [1, 1, 1, 1, 1]), (1, [0, 1, 1, 0, 0]), (2, [0, 1, 1, 0, 0]), (3, [1, 1, 1, 0, 0]),
    (4, [1, 1, 1, 1, 0]), (5, [1, 1, 1, 1, 1]), (9, [1, 1, 1, 1, 1]),
])
def test_top_k_is_tie_inclusive(k, expected):
    xt = torch.tensor([[1.0, 2.0, 2.0, 0.0, -1.0]], dtype=F64)
    out = ref(None, xt, None, top_k=k)
    assert out.allowed.to(torch.int64)[0].tolist() == expected
    mask = top_k_mask(torch.tensor([[1.0, 2.0, 2.0, 0.0, -1.0]], dtype=F64), torch.tensor([k]))
    assert mask.to(torch.int64)[0].tolist() == expected


def test_top_k_ties_sampled(rng):
    """With k = 1 and a two-way tie at the top, both tied tokens are sampled, nothing else."""
    N = 2000
    xt = torch.tensor([[1.0, 2.0, 2.0, 0.0, -1.0]], dtype=F64).expand(N, 5)
    out = ref(None, xt, None, rand_seeds(rng, N), rand_positions(rng, N), top_k=1)
    counts = torch.bincount(out.tokens, minlength=5)
    assert counts[[0, 3, 4]].sum() == 0
    assert 800 < int(counts[1]) < 1200


# ---------------------------------------------------------------------------------------------
# temperature 0
# ---------------------------------------------------------------------------------------------

def test_greedy_ties_go_to_lowest_index(rng):
    N = 50
    seeds, positions = rand_seeds(rng, N), rand_positions(rng, N)
    xt = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0]], dtype=F64).expand(N, 5)
    out = ref(None, xt, None, seeds, positions, temperature=0.0)
    assert out.tokens.tolist() == [1] * N
    # EFT mode with knowledge == reference: the up-weights are exactly 0, z = s keeps the tie
    xr = randn(rng, 1, 5).expand(N, 5)
    out = ref(xr.clone(), xt, xr, seeds, positions, temperature=0.0, top_k=1, top_p=0.1)
    assert out.tokens.tolist() == [1] * N


def test_greedy_is_argmax_of_z(rng):
    B, V = 64, 41
    xk, xt, xr = randn(rng, B, V, scale=2), randn(rng, B, V, scale=2), randn(rng, B, V, scale=2)
    pw = torch.rand(B, generator=rng) * 0.9 + 0.1
    out = ref(xk, xt, xr, rand_seeds(rng, B), rand_positions(rng, B), temperature=0.0, weight_top_p=pw,
              top_k=3, top_p=0.5)
    assert torch.equal(out.tokens, out.scores.argmax(-1))
    out2 = ref(xk, xt, xr, rand_seeds(rng, B), rand_positions(rng, B), temperature=0.0, weight_top_p=pw)
    assert torch.equal(out2.tokens, out.tokens), "greedy tokens depend on the seed"
    torch.testing.assert_close(out.logprob, out.row_logprobs.gather(-1, out.tokens[:, None])[:, 0])


# ---------------------------------------------------------------------------------------------
# -inf masking
# ---------------------------------------------------------------------------------------------

def _sample_many(rng, xk, xt, xr, N=1000, **kw):
    """N rows of the same logits with random seeds/positions."""
    exp = lambda t: None if t is None else t.expand(*t.shape[:-2], N, t.shape[-1])  # noqa: E731
    return ref(exp(xk), exp(xt), exp(xr), rand_seeds(rng, N), rand_positions(rng, N), **kw)


@pytest.mark.parametrize("where", ["tuned", "reference", "knowledge", "all", "knowledge+reference"])
def test_neg_inf_column_masked(rng, where):
    V = 8
    xk, xt, xr = randn(rng, 1, V), randn(rng, 1, V), randn(rng, 1, V)
    col = 5
    # make col very attractive in the other models so that only the -inf can keep it out
    for t in (xk, xt, xr):
        t[0, col] = 6.0
    if where in ("tuned", "all"):
        xt[0, col] = NEG_INF
    if where in ("reference", "all", "knowledge+reference"):
        xr[0, col] = NEG_INF
        xr[0, 2] = 8.0 if where == "reference" else xr[0, 2]
    if where in ("knowledge", "all", "knowledge+reference"):
        xk[0, col] = NEG_INF
    out = _sample_many(rng, xk, xt, xr, weight_top_p=1.0)
    assert_no_nan(out)
    assert bool(torch.isneginf(out.scores[:, col]).all())
    assert bool(torch.isneginf(out.row_logprobs[:, col]).all())
    assert bool(torch.isfinite(out.row_logprobs[:, [j for j in range(V) if j != col]]).all())
    assert bool((out.status == ROW_OK).all())
    assert not bool((out.tokens == col).any())
    torch.testing.assert_close(out.row_logprobs.exp().sum(-1), torch.ones(out.tokens.shape[0], dtype=F64))


def test_neg_inf_in_one_of_two_references(rng):
    B, V = 300, 9
    xk = randn(rng, 1, V).expand(B, V)
    xt = randn(rng, 2, 1, V).expand(2, B, V)
    xr = randn(rng, 2, 1, V).clone()
    xr[1, 0, 4] = NEG_INF
    xr = xr.expand(2, B, V)
    out = ref(xk, xt, xr, rand_seeds(rng, B), rand_positions(rng, B),
              reward_weights=torch.tensor([0.5, 0.5]))
    assert_no_nan(out)
    assert bool(torch.isneginf(out.small_policy[:, 4]).all())
    assert not bool((out.tokens == 4).any())
    assert bool((out.status == ROW_OK).all())


def test_neg_inf_knowledge_inside_vs_outside_truncation_set(rng):
    """-inf knowledge logit: masked if the token is in S; outside S its score is just s_j."""
    V = 6
    # s = [.6, .2, .1, .05, .03, .02]; p_w = 0.5 -> S = {0}
    xt = torch.log(torch.tensor([[0.6, 0.2, 0.1, 0.05, 0.03, 0.02]], dtype=F64))
    xr = torch.zeros(1, V, dtype=F64)
    xk = torch.zeros(1, V, dtype=F64)
    xk[0, 0] = NEG_INF  # inside S
    xk[0, 3] = NEG_INF  # outside S
    out = _sample_many(rng, xk, xt, xr, N=2000, weight_top_p=0.5)
    assert_no_nan(out)
    assert bool(torch.isneginf(out.scores[:, 0]).all())
    torch.testing.assert_close(out.scores[:, 3], out.small_policy[:, 3])
    assert bool(torch.isfinite(out.scores[:, 1:]).all())
    assert not bool((out.tokens == 0).any())
    assert bool((out.tokens == 3).any()), "token 3 (outside S, finite score) is never sampled"
    # With p_w = 1 both are in S and both are masked.
    out1 = _sample_many(rng, xk, xt, xr, N=500, weight_top_p=1.0)
    assert_no_nan(out1)
    assert bool(torch.isneginf(out1.scores[:, [0, 3]]).all())
    assert not bool(((out1.tokens == 0) | (out1.tokens == 3)).any())


def test_neg_inf_random_columns_never_sampled(rng):
    B, V = 256, 21
    xk, xt, xr = randn(rng, B, V, scale=2), randn(rng, B, V, scale=2), randn(rng, B, V, scale=2)
    for t in (xk, xt, xr):
        t[torch.rand(B, V, generator=rng) < 0.1] = NEG_INF
    xt[:, 0] = 0.0  # every row keeps at least one token
    xr[:, 0] = 0.0
    xk[:, 0] = 0.0
    pw = torch.rand(B, generator=rng) * 0.99 + 0.01
    out = ref(xk, xt, xr, rand_seeds(rng, B), rand_positions(rng, B), weight_top_p=pw)
    assert_no_nan(out)
    assert bool((out.status == ROW_OK).all())
    chosen_t = xt.gather(-1, out.tokens[:, None])
    chosen_r = xr.gather(-1, out.tokens[:, None])
    assert bool(torch.isfinite(chosen_t).all()) and bool(torch.isfinite(chosen_r).all())
    assert bool(torch.isfinite(out.logprob).all())


# ---------------------------------------------------------------------------------------------
# vocab_size / padding
# ---------------------------------------------------------------------------------------------

def test_padding_columns_are_ignored(rng):
    B, V = 8, 13
    xk, xt, xr = randn(rng, B, V + 3), randn(rng, B, V + 5), randn(rng, B, V + 1)
    for t in (xk, xt, xr):
        t[:, V:] = 1e4  # huge logits in the padding
    xk[0, V] = float("nan")  # NaN padding is ignored too
    xt[1, V + 1] = float("inf")
    seeds, positions = rand_seeds(rng, B), rand_positions(rng, B)
    kw = dict(temperature=torch.rand(B, generator=rng) + 0.1, weight_top_p=0.9, top_k=5)
    out = ref(xk, xt, xr, seeds, positions, vocab_size=V, **kw)
    trimmed = ref(xk[:, :V], xt[:, :V], xr[:, :V], seeds, positions, **kw)
    assert out.row_logprobs.shape == (B, V)
    assert bool((out.status == ROW_OK).all())
    assert bool((out.tokens < V).all())
    assert torch.equal(out.tokens, trimmed.tokens)
    assert torch.equal(out.row_logprobs, trimmed.row_logprobs)
    assert torch.equal(out.logprob, trimmed.logprob)


def test_vocab_size_smaller_than_all_widths(rng):
    B, V = 4, 10
    x = randn(rng, B, V + 4)
    x[:, V:] = 1e4
    out = ref(x, x, x, vocab_size=V, temperature=0.0)
    assert bool((out.tokens < V).all())
    assert torch.equal(out.tokens, x[:, :V].argmax(-1))


# ---------------------------------------------------------------------------------------------
# draft mode
# ---------------------------------------------------------------------------------------------

def test_draft_mode_samples_from_s(rng):
    B, V = 64, 27
    xt, xr = randn(rng, B, V, scale=2), randn(rng, 2, B, V, scale=2)
    seeds, positions = rand_seeds(rng, B), rand_positions(rng, B)
    T = 0.8
    out = ref(None, xt, None, seeds, positions, temperature=T)
    assert torch.equal(out.scores, out.small_policy)
    torch.testing.assert_close(out.small_policy, lsm(xt), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.row_logprobs, lsm(xt), rtol=0, atol=1e-12)
    want = (lsm(xt) / T + gumbel_noise(seeds, positions, V)).argmax(-1)
    assert torch.equal(out.tokens, want)
    # Draft with references (R = 2): z = s = log_softmax(l_R0 + sum beta (l_T - l_R))
    xt2 = randn(rng, 2, B, V, scale=2)
    beta = torch.tensor([0.3, 0.7])
    out2 = ref(None, xt2, xr, seeds, positions, reward_weights=beta, temperature=T)
    want_s = lsm(lsm(xr[0]) + 0.3 * (lsm(xt2[0]) - lsm(xr[0])) + 0.7 * (lsm(xt2[1]) - lsm(xr[1])))
    torch.testing.assert_close(out2.scores, want_s, rtol=0, atol=1e-6)
    assert torch.equal(out2.scores, out2.small_policy)
    # the knowledge model would change the scores; draft mode must not depend on it
    with_k = ref(randn(rng, B, V, scale=2), xt2, xr, seeds, positions, reward_weights=beta, temperature=T)
    assert torch.equal(with_k.small_policy, out2.small_policy)
    assert not torch.allclose(with_k.scores, out2.scores)


# ---------------------------------------------------------------------------------------------
# against the independent oracle, random mixed settings
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R,Rr", [(1, 1), (2, 1), (2, 2)])
def test_matches_numpy_oracle(rng, R, Rr):
    B, V = 24, 15
    xk = randn(rng, B, V, scale=2)
    xt, xr = randn(rng, R, B, V, scale=2), randn(rng, Rr, B, V, scale=2)
    for t in (xk, xt, xr):
        t[torch.rand(t.shape, generator=rng) < 0.05] = NEG_INF
    xt[..., 0] = 0.0
    xr[..., 0] = 0.0
    beta = torch.rand(B, R, generator=rng) * 2 - 0.5
    T = torch.rand(B, generator=rng) * 1.5
    T[:3] = 0.0
    pw = torch.rand(B, generator=rng) * 0.99 + 0.01
    pw[3:6] = 1.0
    k = torch.randint(0, V + 2, (B,), generator=rng)
    p = torch.rand(B, generator=rng) * 0.99 + 0.01
    p[6:9] = 1.0
    seeds, positions = rand_seeds(rng, B), rand_positions(rng, B)
    out = ref(xk, xt, xr, seeds, positions, reward_weights=beta, temperature=T, weight_top_p=pw,
              top_k=k, top_p=p)
    g = gumbel_noise(seeds, positions, V).numpy()
    for b in range(B):
        # the reference casts per-row parameters to fp32 first: use the same values
        s, z, allowed, _ = oracle_row(xk[b].numpy(), [x[b].numpy() for x in xt], [x[b].numpy() for x in xr],
                                      beta[b].to(F64).tolist(), float(T[b]), float(pw[b]), int(k[b]),
                                      float(p[b]))
        np.testing.assert_allclose(out.small_policy[b].numpy(), s, atol=1e-10, rtol=0)
        np.testing.assert_allclose(out.scores[b].numpy(), z, atol=1e-10, rtol=0)
        assert out.allowed[b].tolist() == allowed.tolist(), f"row {b}"
        if T[b] == 0:
            want = int(np.argmax(z))
        else:
            pert = np.where(allowed, z / float(T[b]) + g[b], -np.inf)
            want = int(np.argmax(pert))
            top2 = np.sort(pert)[-2:]
            if top2[1] - top2[0] < 1e-9:
                continue  # near tie
        assert int(out.tokens[b]) == want, f"row {b}"


# ---------------------------------------------------------------------------------------------
# distribution (chi-square)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "top_k", "top_p", "combined", "draft"])
def test_samples_follow_filtered_softmax(rng, case):
    N, V, T = 20000, 10, 0.7
    xk, xt, xr = randn(rng, 1, V), randn(rng, 1, V), randn(rng, 1, V)
    kw = dict(temperature=T)
    pw, k, p = 1.0, 0, 1.0
    if case == "top_k":
        k = 4
    elif case == "top_p":
        p = 0.7
    elif case == "combined":
        pw, k, p = 0.6, 6, 0.8
    kw.update(weight_top_p=pw, top_k=k, top_p=p)
    if case == "draft":
        xk = None
    out = _sample_many(rng, xk, xt, xr, N=N, **kw)
    assert bool((out.status == ROW_OK).all())
    _, _, allowed, probs = oracle_row(None if xk is None else xk[0].numpy(), [xt[0].numpy()],
                                      [xr[0].numpy()], [1.0], T, pw, k, p)
    counts = torch.bincount(out.tokens, minlength=V).numpy()
    assert counts[~allowed].sum() == 0, f"filtered tokens sampled: counts {counts}, allowed {allowed}"
    if case == "top_k":
        assert allowed.sum() == 4
    pvalue = chisquare_pvalue(counts[allowed], probs[allowed])
    assert pvalue > 1e-3, f"counts {counts} vs expected {np.round(probs * N, 1)} (p = {pvalue:.2e})"


# ---------------------------------------------------------------------------------------------
# batch invariance and status codes
# ---------------------------------------------------------------------------------------------

def test_batch_invariance(rng):
    B, V = 8, 23
    xk, xt, xr = randn(rng, B, V, scale=2), randn(rng, 2, B, V, scale=2), randn(rng, B, V, scale=2)
    seeds, positions = rand_seeds(rng, B), rand_positions(rng, B)
    beta = torch.rand(B, 2, generator=rng)
    kw = dict(temperature=torch.rand(B, generator=rng) + 0.2, weight_top_p=torch.rand(B, generator=rng) * 0.99 + 0.01,
              top_k=torch.randint(0, 6, (B,), generator=rng), top_p=torch.rand(B, generator=rng) * 0.9 + 0.1)
    out = ref(xk, xt, xr, seeds, positions, reward_weights=beta, **kw)
    i = int(torch.randint(0, B, (1,), generator=rng))
    others = torch.arange(B) != i
    xk2, xt2, xr2 = xk.clone(), xt.clone(), xr.clone()
    xk2[others], xt2[:, others], xr2[others] = (randn(rng, B - 1, V, scale=2), randn(rng, 2, B - 1, V, scale=2),
                                                   randn(rng, B - 1, V, scale=2))
    seeds2 = rand_seeds(rng, B)
    seeds2[i] = seeds[i]
    out2 = ref(xk2, xt2, xr2, seeds2, positions, reward_weights=beta, **kw)
    assert int(out2.tokens[i]) == int(out.tokens[i])
    assert torch.equal(out2.row_logprobs[i], out.row_logprobs[i])
    assert torch.equal(out2.logprob[i], out.logprob[i])
    # alone in a batch of one
    sl = slice(i, i + 1)
    alone = ref(xk[sl], xt[:, sl], xr[sl], seeds[sl], positions[sl], reward_weights=beta[sl],
                **{n: v[sl] for n, v in kw.items()})
    assert int(alone.tokens[0]) == int(out.tokens[i])
    assert torch.equal(alone.row_logprobs[0], out.row_logprobs[i])


@pytest.mark.parametrize("model", ["knowledge", "tuned", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_row_status(rng, model, bad):
    B, V = 5, 12
    xk, xt, xr = randn(rng, B, V), randn(rng, B, V), randn(rng, B, V)
    seeds, positions = rand_seeds(rng, B), rand_positions(rng, B)
    clean = ref(xk, xt, xr, seeds, positions)
    row = 2
    {"knowledge": xk, "tuned": xt, "reference": xr}[model][row, 7] = bad
    out = ref(xk, xt, xr, seeds, positions)
    assert out.status.tolist() == [ROW_OK, ROW_OK, ROW_NAN, ROW_OK, ROW_OK]
    assert int(out.tokens[row]) == -1
    assert math.isnan(float(out.logprob[row]))
    keep = torch.arange(B) != row
    assert torch.equal(out.tokens[keep], clean.tokens[keep])
    assert torch.equal(out.logprob[keep], clean.logprob[keep])
    assert torch.equal(out.row_logprobs[keep], clean.row_logprobs[keep])


def test_nan_in_second_tuned_model_row_status(rng):
    B, V = 4, 9
    xt = randn(rng, 2, B, V)
    xt[1, 3, 0] = float("nan")
    out = ref(randn(rng, B, V), xt, randn(rng, B, V), reward_weights=torch.tensor([0.5, 0.5]))
    assert out.status.tolist() == [ROW_OK, ROW_OK, ROW_OK, ROW_NAN]
    assert out.tokens[3] == -1


def test_no_token_row_status(rng):
    B, V = 4, 9
    xk, xt, xr = randn(rng, B, V), randn(rng, B, V), randn(rng, B, V)
    xt[1] = NEG_INF  # all -inf
    xr[3, :4] = NEG_INF  # together every column is masked
    xt[3, 4:] = NEG_INF
    out = ref(xk, xt, xr)
    assert out.status.tolist() == [ROW_OK, ROW_NO_TOKEN, ROW_OK, ROW_NO_TOKEN]
    assert out.tokens[1] == -1 and out.tokens[3] == -1
    assert_no_nan(out)
    assert bool(torch.isneginf(out.row_logprobs[[1, 3]]).all())
    # knowledge all -inf with p_w = 1 masks every token too
    xk2 = xk.clone()
    xk2[0] = NEG_INF
    out2 = ref(xk2, randn(rng, B, V), randn(rng, B, V))
    assert out2.status.tolist() == [ROW_NO_TOKEN, ROW_OK, ROW_OK, ROW_OK]
