"""The fp64 reference of EFT sampling: docs/DESIGN.md section 2 written as plain torch.

Every backend of :func:`eft_fast.eft_sample` is tested against :func:`eft_sample_reference`.
It favours clarity over speed: full sorts, one step per line of the spec.

Inputs are in the canonical form produced by ``eft_fast._validation.normalize_inputs``:

    knowledge       [B, Vk] or None (draft mode: sample from the small-scale policy s)
    tuned           [R, B, Vt]
    reference       [Rr, B, Vr] (Rr in {1, R}) or None (draft mode, R = 1, weight 1: s = l_T)
    seeds           [B] int64
    positions       [B] int64
    reward_weights  [B, R] float
    temperature     [B] float, >= 0 (0 = greedy)
    weight_top_p    [B] float in (0, 1] (1 = off)
    top_k           [B] int64, >= 0 (0 = off)
    top_p           [B] float in (0, 1] (1 = off)

Columns at or beyond ``vocab_size`` are ignored.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import GREEDY_TEMPERATURE
from .philox import gumbel_noise

# Row status codes of every backend (csrc/eft_math.h, RowStatus). An error row has token -1,
# log-prob NaN and -inf log-probs.
ROW_OK = 0
ROW_NAN = 1  # a NaN (or +inf) input logit
ROW_NO_TOKEN = 2  # every token masked or filtered out
ROW_BAD_PARAM = 3  # a sampling parameter out of range (see row_params_ok)

NEG_INF = float("-inf")


@dataclass
class ReferenceOutput:
    """tokens [B] int64 (-1 on error rows), logprob [B] fp64, row_logprobs [B, V] fp64,
    status [B] int32, and the intermediate s, z and allowed mask for tests."""

    tokens: torch.Tensor
    logprob: torch.Tensor
    row_logprobs: torch.Tensor
    status: torch.Tensor
    small_policy: torch.Tensor
    scores: torch.Tensor
    allowed: torch.Tensor


def masked_log_softmax(x: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim that keeps -inf columns -inf and an all -inf row -inf."""
    finite_max = torch.where(torch.isneginf(x), torch.full_like(x, NEG_INF), x).amax(-1, keepdim=True)
    shift = torch.where(torch.isneginf(finite_max), torch.zeros_like(finite_max), finite_max)
    lse = torch.log(torch.exp(x - shift).sum(-1, keepdim=True)) + shift
    return torch.where(torch.isneginf(x), torch.full_like(x, NEG_INF), x - lse)


def top_p_threshold_mask(log_probs: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Tie-inclusive top-p set of exp(log_probs) per row.

    The set is {j : v_j >= tau} where tau is the largest value whose set holds mass >= p;
    it always holds the argmax. If rounding keeps the total mass below p, every finite
    token is in the set.

    Args:
        log_probs: [B, V] normalised log-probabilities (fp64).
        p: [B] in (0, 1].
    Returns:
        [B, V] bool.
    """
    keep_all = (p >= 1)[:, None]  # p = 1: every finite token, whatever the rounding of the sums
    sorted_lp, _ = torch.sort(log_probs, dim=-1, descending=True)
    cum = torch.cumsum(torch.exp(sorted_lp), dim=-1)
    reached = cum >= p[:, None]
    # Index of the first position where the cumulative mass reaches p (or the last finite one).
    first = torch.where(reached.any(-1), reached.to(torch.int64).argmax(-1),
                        (~torch.isneginf(sorted_lp)).sum(-1).clamp(min=1) - 1)
    tau = sorted_lp.gather(-1, first[:, None])
    return ((log_probs >= tau) | keep_all) & ~torch.isneginf(log_probs)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Tie-inclusive top-k of scores per row; k = 0 keeps everything. [B, V] bool."""
    vocab = scores.shape[-1]
    sorted_scores, _ = torch.sort(scores, dim=-1, descending=True)
    kth = sorted_scores.gather(-1, (k.clamp(min=1, max=vocab) - 1)[:, None])
    return torch.where((k > 0)[:, None], scores >= kth, torch.ones_like(scores, dtype=torch.bool))


def small_policy(tuned: torch.Tensor, reference: torch.Tensor | None, reward_weights: torch.Tensor
                 ) -> torch.Tensor:
    """s = log_softmax(l_R[0] + sum_r beta_r (l_T[r] - l_R[r])), masked. [B, V] fp64."""
    l_tuned = masked_log_softmax(tuned)  # [R, B, V]
    if reference is None:
        # Draft mode with R = 1 and weight 1: s = l_T.
        return l_tuned[0]
    l_ref = masked_log_softmax(reference)  # [Rr, B, V]
    l_ref_per_model = l_ref.expand_as(l_tuned)
    masked = torch.isneginf(l_ref[0]) | torch.isneginf(l_tuned).any(0) | torch.isneginf(l_ref).any(0)
    beta = reward_weights.T[:, :, None]  # [R, B, 1]
    safe = lambda t: torch.where(torch.isneginf(t), torch.zeros_like(t), t)  # noqa: E731
    reward = (beta * (safe(l_tuned) - safe(l_ref_per_model))).sum(0)
    combined = torch.where(masked, torch.full_like(reward, NEG_INF), safe(l_ref[0]) + reward)
    return masked_log_softmax(combined)


def eft_scores(knowledge: torch.Tensor | None, tuned: torch.Tensor, reference: torch.Tensor | None,
               reward_weights: torch.Tensor, weight_top_p: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, z): the small-scale policy and the EFT scores, both [B, V] fp64.

    z_j = s_j + [j in S] (l_K_j - l_R[0]_j), S the top-p set of exp(s) at weight_top_p.
    In draft mode (knowledge None), z = s.
    """
    s = small_policy(tuned, reference, reward_weights)
    if knowledge is None:
        return s, s
    l_knowledge = masked_log_softmax(knowledge)
    l_ref0 = masked_log_softmax(reference[0])
    in_set = top_p_threshold_mask(s, weight_top_p)
    weight_masked = torch.isneginf(l_knowledge) | torch.isneginf(l_ref0)
    up_weight = torch.where(weight_masked, torch.zeros_like(s), l_knowledge - l_ref0)
    z = torch.where(in_set, s + up_weight, s)
    z = torch.where(in_set & weight_masked, torch.full_like(z, NEG_INF), z)
    z = torch.where(torch.isneginf(s), torch.full_like(z, NEG_INF), z)
    return s, z


def tempered_and_allowed(z: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(z / T, allowed): the tempered scores [B, V] and the tokens the filters keep [B, V] bool.

    top_k acts on z; top_p on pi = softmax(z / T) restricted to the top-k set and renormalised
    (as in HF and vLLM). Greedy rows (T = 0) keep every finite token: they take the argmax of z.
    """
    temperature = temperature.to(z.dtype)
    greedy = temperature == 0
    safe_t = torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    tempered = z / safe_t
    allowed = ~torch.isneginf(z)
    if bool((top_k > 0).any()):        # both filters sort every row: skip them when no row uses them
        allowed &= top_k_mask(z, top_k)
    if bool((top_p < 1).any()):
        restricted = torch.where(allowed, tempered, torch.full_like(tempered, NEG_INF))
        allowed &= top_p_threshold_mask(masked_log_softmax(restricted), top_p.to(z.dtype))
    allowed = torch.where(greedy[:, None], ~torch.isneginf(z), allowed)
    return tempered, allowed


def sampling_log_probs(z: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                       ) -> torch.Tensor:
    """log pi: the distribution a row is sampled from, [B, V] (after temperature and filters).

    Greedy rows are a point mass on the argmax of z (lowest index on ties).
    """
    tempered, allowed = tempered_and_allowed(z, temperature, top_k, top_p)
    log_pi = masked_log_softmax(torch.where(allowed, tempered, torch.full_like(tempered, NEG_INF)))
    greedy = (temperature == 0)[:, None]
    point = torch.full_like(z, NEG_INF).scatter(-1, z.argmax(-1, keepdim=True), 0.0)
    return torch.where(greedy, point, log_pi)


def row_params_ok(temperature: torch.Tensor, weight_top_p: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """[B] bool: the rows whose parameters the kernels handle (csrc/eft_math.h, row_params_ok):
    temperature 0 or in [GREEDY_TEMPERATURE, float32 max], weight_top_p and top_p in (0, 1],
    top_k >= 0. NaN fails every test."""
    t = temperature.to(torch.float32)
    t_ok = (t == 0) | ((t >= GREEDY_TEMPERATURE) & (t <= torch.finfo(torch.float32).max))
    return t_ok & (weight_top_p > 0) & (weight_top_p <= 1) & (top_k >= 0) & (top_p > 0) & (top_p <= 1)


def eft_sample_reference(
    knowledge: torch.Tensor | None,
    tuned: torch.Tensor,
    reference: torch.Tensor | None,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    reward_weights: torch.Tensor,
    temperature: torch.Tensor,
    weight_top_p: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    vocab_size: int,
) -> ReferenceOutput:
    """Sample one token per row from the EFT distribution, in fp64 (docs/DESIGN.md sections 2-3)."""
    V = vocab_size
    f64 = lambda t: None if t is None else t[..., :V].to(torch.float64)  # noqa: E731
    knowledge, tuned, reference = f64(knowledge), f64(tuned), f64(reference)
    inputs = [t for t in (knowledge, tuned, reference) if t is not None]
    batch = tuned.shape[1]
    bad_input = torch.zeros(batch, dtype=torch.bool, device=tuned.device)
    for t in inputs:
        bad = torch.isnan(t) | torch.isposinf(t)
        bad_input |= bad.reshape(-1, batch, V).any(0).any(-1) if t.dim() == 3 else bad.any(-1)
    clean = lambda t: None if t is None else torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=NEG_INF)  # noqa: E731
    knowledge, tuned, reference = clean(knowledge), clean(tuned), clean(reference)

    params_ok = row_params_ok(temperature, weight_top_p, top_k, top_p)
    # Rows with bad parameters are reported; harmless stand-ins keep the math below defined.
    temperature = torch.where(params_ok, temperature, torch.ones_like(temperature))
    weight_top_p = torch.where(params_ok, weight_top_p, torch.ones_like(weight_top_p))
    top_k = torch.where(params_ok, top_k, torch.zeros_like(top_k))
    top_p = torch.where(params_ok, top_p, torch.ones_like(top_p))

    s, z = eft_scores(knowledge, tuned, reference, reward_weights.to(torch.float64),
                      weight_top_p.to(torch.float64))
    row_logprobs = masked_log_softmax(z)

    temperature = temperature.to(torch.float64)
    greedy = temperature == 0
    tempered, allowed = tempered_and_allowed(z, temperature, top_k, top_p)

    noise = gumbel_noise(seeds, positions, V)
    perturbed = torch.where(greedy[:, None], z, tempered + noise)
    perturbed = torch.where(allowed, perturbed, torch.full_like(perturbed, NEG_INF))
    tokens = perturbed.argmax(-1)  # first maximum: ties go to the lowest index

    no_token = ~allowed.any(-1)
    status = torch.full((batch,), ROW_OK, dtype=torch.int32, device=tuned.device)
    status[no_token] = ROW_NO_TOKEN
    status[bad_input] = ROW_NAN
    status[~params_ok] = ROW_BAD_PARAM
    ok = status == ROW_OK
    tokens = torch.where(ok, tokens, torch.full_like(tokens, -1))
    logprob = row_logprobs.gather(-1, tokens.clamp(min=0)[:, None])[:, 0]
    logprob = torch.where(ok, logprob, torch.full_like(logprob, float("nan")))
    row_logprobs = torch.where(ok[:, None], row_logprobs, torch.full_like(row_logprobs, NEG_INF))
    return ReferenceOutput(tokens, logprob, row_logprobs, status, s, z, allowed)
