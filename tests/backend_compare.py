"""Comparing a backend of eft_sample with the fp64 reference, row by row.

A backend computes in fp32 and the reference in fp64, so a token may legitimately differ
where the fp64 computation is within float rounding of a decision: two perturbed scores
within MARGIN of each other, or a truncation / top-k / top-p boundary within MARGIN (values)
or MASS_MARGIN (cumulative mass). Those rows are "near ties" and are excluded from the token
and log-prob comparison; every other row must match exactly (tokens) and within a
tolerance (log-probs).
"""
from __future__ import annotations

import torch

from eft_fast._validation import EFTInputs
from eft_fast.philox import gumbel_noise
from eft_fast.reference import ROW_OK, ReferenceOutput, eft_sample_reference, masked_log_softmax

MARGIN = 1e-4  # the top two perturbed scores
VALUE_MARGIN = 1e-5  # a log-prob next to a threshold (fp32 rounding of s and z is ~1e-6)
MASS_MARGIN = 2e-6  # cumulative mass next to p (fp32 sums of <= 50k terms)


def _boundary_ambiguous(values: torch.Tensor, weights: torch.Tensor, target: float,
                        columns: torch.Tensor | None = None) -> bool:
    """True when the tie-inclusive top-mass set of `values` (weights normalised) at `target`
    could change under float rounding of the values or of the cumulative sums.

    columns [V, M]: each token's input logits. Tokens whose fp64 values tie exactly with the
    threshold's are exact ties only if their inputs are the same; different inputs that happen
    to give the same fp64 value (a sum of bf16 lattice values) can round apart in fp32."""
    finite = ~torch.isneginf(values)
    values, weights = values[finite], weights[finite]
    if columns is not None:
        columns = columns[finite]
    if values.numel() == 0 or target >= 1:
        return False
    order = torch.argsort(values, descending=True)
    values, weights = values[order], weights[order] / weights.sum()
    if columns is not None:
        columns = columns[order]
    cum = torch.cumsum(weights, 0)
    k = int((cum >= target).to(torch.int64).argmax()) if bool((cum >= target).any()) else len(cum) - 1
    if abs(float(cum[k]) - target) < MASS_MARGIN or (k > 0 and abs(float(cum[k - 1]) - target) < MASS_MARGIN):
        return True
    tau = values[k]
    # A distinct value just below or above tau could swap sides.
    close = (values - tau).abs() < VALUE_MARGIN
    if bool((close & (values != tau)).any()):
        return True
    if columns is not None:
        tied = (values == tau).nonzero().flatten()
        return bool((columns[tied] != columns[k]).any())
    return False


def near_tie_rows(inputs: EFTInputs, ref: ReferenceOutput) -> torch.Tensor:
    """[B] bool: rows whose fp64 outcome is within float rounding of another outcome."""
    batch = inputs.batch_size
    ties = torch.zeros(batch, dtype=torch.bool)
    noise = gumbel_noise(inputs.seeds, inputs.positions, inputs.vocab_size)
    V = inputs.vocab_size
    for b in range(batch):
        if int(ref.status[b]) != ROW_OK:
            continue
        # With reward weights other than one tuned model at weight 1, s = x_R0 + sum beta (x_T - x_R)
        # is rounded in fp32: equal fp64 values from different inputs can then round apart.
        weighted = inputs.tuned.shape[0] > 1 or bool((inputs.reward_weights[b] != 1).any())
        columns = None
        if weighted:
            small = [inputs.tuned[:, b, :V]] + ([inputs.reference[:, b, :V]] if inputs.reference is not None else [])
            columns = torch.cat(small).T.double()                                       # [V, M]
        z = ref.scores[b]
        temperature = float(inputs.temperature[b])
        if inputs.knowledge is not None and float(inputs.weight_top_p[b]) < 1:
            s = ref.small_policy[b]
            if _boundary_ambiguous(s, torch.exp(s), float(inputs.weight_top_p[b]), columns):
                ties[b] = True
                continue
        if temperature > 0:
            k = int(inputs.top_k[b])
            finite = z[~torch.isneginf(z)]
            if 0 < k < finite.numel():
                sorted_z = torch.sort(finite, descending=True).values
                if 0 < float(sorted_z[k - 1] - sorted_z[k]) < VALUE_MARGIN:  # exact ties are exact
                    ties[b] = True
                    continue
            if float(inputs.top_p[b]) < 1:
                kept = z
                if 0 < k < finite.numel():
                    kth = torch.sort(finite, descending=True).values[k - 1]
                    kept = torch.where(z >= kth, z, torch.full_like(z, float("-inf")))
                probs = torch.exp(masked_log_softmax(kept / temperature))
                if _boundary_ambiguous(kept, probs, float(inputs.top_p[b])):
                    ties[b] = True
                    continue
            scores = torch.where(ref.allowed[b], z / temperature + noise[b], torch.full_like(z, float("-inf")))
        else:
            scores = z
        top2 = torch.topk(scores, min(2, scores.numel())).values
        if top2.numel() == 2 and not torch.isneginf(top2[1]) and float(top2[0] - top2[1]) < MARGIN:
            ties[b] = True
    return ties


def assert_backend_matches(inputs: EFTInputs, out, *, logprob_atol: float = 1e-4,
                           check_rows: bool = False) -> int:
    """Assert a backend's (tokens, logprob, row_logprobs, status) match the reference.

    Returns the number of near-tie rows that were excluded (for the caller to bound).
    """
    tokens, logprob, row_logprobs, status = (t.cpu() for t in out)
    ref = eft_sample_reference(*inputs.as_args())
    ties = near_tie_rows(inputs, ref)
    # A status may differ only on a near-tie row: where the truncation set is decided below
    # float resolution (weight_top_p next to 1), it can hold every token that has a score.
    differs = status != ref.status
    assert not bool((differs & ~ties).any()), f"status {status.tolist()} != reference {ref.status.tolist()}"
    compare = (ref.status == ROW_OK) & ~ties
    mismatched = (tokens != ref.tokens) & compare
    assert not bool(mismatched.any()), (
        f"tokens differ on rows {mismatched.nonzero().flatten().tolist()}: "
        f"got {tokens[mismatched].tolist()}, reference {ref.tokens[mismatched].tolist()}")
    torch.testing.assert_close(logprob[compare].double(), ref.logprob[compare], atol=logprob_atol, rtol=0)
    bad = status != ROW_OK
    assert bool((tokens[bad] == -1).all()) and bool(torch.isnan(logprob[bad]).all())
    if check_rows:
        rows_ok = compare.nonzero().flatten()
        expected = ref.row_logprobs[rows_ok]
        got = row_logprobs[rows_ok].double()
        finite = ~torch.isneginf(expected)
        assert torch.equal(torch.isneginf(got), ~finite), "row_logprobs -inf pattern differs"
        torch.testing.assert_close(got[finite], expected[finite], atol=logprob_atol, rtol=0)
    return int(ties.sum())
