"""Turn the models' logits of a batch into tokens with one fused ``eft_sample`` call."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .._validation import EFTInputs, normalize_inputs
from ..ops import resolve_backend, run_backend
from ..reference import ROW_BAD_PARAM, ROW_NAN, ROW_NO_TOKEN, ROW_OK
from .request import Request

# The op's parameter status; the engine also gives it to rows whose request the validating
# wrapper refused (its message in SampleResult.errors).
ROW_REJECTED = ROW_BAD_PARAM
_ROW_MESSAGES = {ROW_NAN: "sampling failed: NaN or infinite logits",
                 ROW_NO_TOKEN: "sampling failed: every token was masked or filtered",
                 ROW_BAD_PARAM: "sampling failed: a sampling parameter is out of range"}


@dataclass(frozen=True)
class Roles:
    """Which of the engine's models plays which EFT role (indices into its model list).

    knowledge: None in single-model mode.
    tuned: R >= 1 models.
    reference: () in single-model mode, else one shared model or one per tuned model.
    """

    knowledge: int | None
    tuned: tuple[int, ...]
    reference: tuple[int, ...]

    @property
    def single_model(self) -> bool:
        return self.knowledge is None

    def small_models(self, need_reference: bool) -> list[int]:
        """Models the small-scale policy s needs, in order, without repeats."""
        models = list(self.tuned) + (list(self.reference) if need_reference else [])
        return list(dict.fromkeys(models))

    def all_models(self) -> list[int]:
        models = ([] if self.knowledge is None else [self.knowledge]) + list(self.tuned) + list(self.reference)
        return list(dict.fromkeys(models))


def needs_reference(roles: Roles, requests: list[Request]) -> bool:
    """Whether s needs the reference logits (R > 1 or a reward weight other than 1)."""
    if not roles.reference:
        return False
    if len(roles.tuned) > 1:
        return True
    return any(r.params.reward_weights is not None and tuple(r.params.reward_weights) != (1.0,) for r in requests)


TopLogprobs = list[tuple[int, float]]   # (token id, log-probability), most likely first


class TokensOut(NamedTuple):
    """What a step gives one request: new tokens, their EFT log-probabilities, the top
    alternatives at each token's position (None where the request did not ask), and the
    error that ended the request (None if it did not fail)."""

    tokens: list[int]
    logprobs: list[float]
    error: str | None
    top: list[TopLogprobs | None]


def top_logprobs(row_logprobs: torch.Tensor, counts: list[int | None]) -> list[TopLogprobs | None]:
    """The ``counts[i]`` most likely tokens of each row of ``row_logprobs`` [N, V] (one top-k
    and one copy to the host for the whole batch); None for rows whose count is None."""
    k = max((c for c in counts if c is not None), default=0)
    if k == 0:
        return [None if c is None else [] for c in counts]
    values, ids = row_logprobs.topk(min(k, row_logprobs.shape[-1]), dim=-1)
    values, ids = values.float().cpu().tolist(), ids.cpu().tolist()
    return [None if c is None else list(zip(ids[i][:c], values[i][:c])) for i, c in enumerate(counts)]


@dataclass
class SampleResult:
    """tokens [N] int64, logprobs [N] fp32, status [N] int32 (0 = ok), all on the CPU,
    and, if asked for, row_logprobs [N, V] fp32 (log softmax of the untempered EFT scores).
    ``errors`` holds the op's message for rows with status ROW_REJECTED. ``top[i]``: the
    alternatives row i's request asked for with ``SamplingParams.logprobs`` (None if it did not).
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    status: torch.Tensor
    row_logprobs: torch.Tensor | None = None
    errors: dict[int, str] = field(default_factory=dict)
    top: list[TopLogprobs | None] | None = None

    def error(self, row: int) -> str | None:
        """Why row ``row`` failed, or None if it was sampled."""
        status = int(self.status[row])
        if status == ROW_OK:
            return None
        return self.errors.get(row) or _ROW_MESSAGES.get(status, f"sampling failed (status {status})")

    def top_at(self, row: int) -> TopLogprobs | None:
        return None if self.top is None else self.top[row]

    def per_request(self) -> list[TokensOut]:
        """One row per request, as decode rounds return them."""
        return [TokensOut([int(t)], [float(lp)], self.error(i), [self.top_at(i)])
                for i, (t, lp) in enumerate(zip(self.tokens, self.logprobs))]


def sample(roles: Roles, logits: dict[int, torch.Tensor], rows: list[Request], positions: list[int], *,
           vocab_size: int, backend: str, draft: bool = False, need_reference: bool = True,
           return_row_logprobs: bool = False, with_top: bool = True) -> SampleResult:
    """One fused ``eft_sample`` call over N rows.

    Args:
        logits: model index -> [N, V_m] logits, rows aligned with ``rows``.
        rows: the request of each row (its sampling params and seed).
        positions: the noise position of each row.
        draft: sample from the small-scale policy s (no knowledge model).
        need_reference: False only when s = l_T (R = 1, weight 1 on every row).

    SamplingParams are checked when a request is added, so the op accepts every row. Should
    it still reject one (a ValueError / TypeError from its argument checks), the rows are
    sampled again request by request, and only the rejected request's rows fail (status
    ROW_REJECTED, the op's message in ``errors``): one request never fails its batch mates.

    Outside draft mode (and unless ``with_top`` is False), rows whose request asks for
    ``SamplingParams.logprobs`` get their top alternatives in ``SampleResult.top`` (read from
    the row log-probabilities).
    """
    kw = dict(vocab_size=vocab_size, draft=draft, need_reference=need_reference)
    counts = [None if draft or not with_top else r.params.logprobs for r in rows]
    want_top = any(c is not None for c in counts)
    with_rows = return_row_logprobs or want_top
    try:
        inputs = _op_inputs(roles, logits, rows, positions, **kw)
    except _REJECTED:
        result = _sample_each_request(roles, logits, rows, positions, backend, with_rows, **kw)
    else:
        result = _run(inputs, backend, with_rows)
    if want_top:
        result.top = top_logprobs(result.row_logprobs, counts)
        if not return_row_logprobs:
            result.row_logprobs = None
    return result


_REJECTED = (ValueError, TypeError)   # what the op's argument checks (and _column) raise


def _sample_each_request(roles, logits, rows, positions, backend, return_row_logprobs, **kw) -> SampleResult:
    """:func:`sample` one request's rows at a time; a request the op rejects gets ROW_REJECTED rows."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(id(r), []).append(i)
    n = len(rows)
    out = SampleResult(torch.zeros(n, dtype=torch.int64), torch.zeros(n), torch.zeros(n, dtype=torch.int32))
    if return_row_logprobs:
        device = logits[roles.tuned[0]].device
        out.row_logprobs = torch.zeros(n, kw["vocab_size"], device=device)
    for idx in groups.values():
        at = torch.tensor(idx)
        try:
            inputs = _op_inputs(roles, {m: x[at.to(x.device)] for m, x in logits.items()}, [rows[i] for i in idx],
                                [positions[i] for i in idx], **kw)
        except _REJECTED as e:     # as the op's own error rows: token -1, log-prob NaN, -inf log-probs
            out.status[at], out.tokens[at], out.logprobs[at] = ROW_REJECTED, -1, float("nan")
            if return_row_logprobs:
                out.row_logprobs[at.to(out.row_logprobs.device)] = float("-inf")
            out.errors.update((i, f"sampling failed: {e}") for i in idx)
            continue
        part = _run(inputs, backend, return_row_logprobs)
        out.tokens[at], out.logprobs[at], out.status[at] = part.tokens, part.logprobs, part.status
        if return_row_logprobs:
            out.row_logprobs[at.to(out.row_logprobs.device)] = part.row_logprobs
    return out


def _op_inputs(roles: Roles, logits: dict[int, torch.Tensor], rows: list[Request], positions: list[int], *,
               vocab_size: int, draft: bool, need_reference: bool) -> EFTInputs:
    """The op's checked, canonical inputs for these rows."""
    tuned = _models_axis([logits[m] for m in roles.tuned])                         # [R, N, V]
    reference = None
    if roles.reference and (need_reference or not draft):
        reference = _models_axis([logits[m] for m in dict.fromkeys(roles.reference)])
    knowledge = None if (draft or roles.single_model) else logits[roles.knowledge]
    num_tuned = len(roles.tuned)
    p = [r.params for r in rows]
    device = tuned.device
    f32, i64 = torch.float32, torch.int64
    weights = None
    if any(x.reward_weights is not None for x in p):
        weights = _column("reward_weights", [list(x.reward_weights) if x.reward_weights is not None
                                             else [1.0] * num_tuned for x in p], f32, device)
    return normalize_inputs(
        knowledge, tuned, reference, _column("seed", [r.seed for r in rows], i64, device),
        _column("positions", positions, i64, device), reward_weights=weights,
        temperature=_column("temperature", [x.temperature for x in p], f32, device),
        weight_top_p=_column("weight_top_p", [x.weight_top_p for x in p], f32, device),
        top_k=_column("top_k", [x.top_k for x in p], i64, device),
        top_p=_column("top_p", [x.top_p for x in p], f32, device),
        vocab_size=vocab_size)


def _models_axis(per_model: list[torch.Tensor]) -> torch.Tensor:
    """[N, V] logits per model -> [R, N, V]; one model is a view (the op reads strided rows),
    so the common single tuned / single reference case copies nothing."""
    return per_model[0].unsqueeze(0) if len(per_model) == 1 else torch.stack(per_model)


def _column(name: str, values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One per-row parameter as a tensor; a value torch cannot convert is a ValueError naming it."""
    try:
        return torch.tensor(values, dtype=dtype, device=device)
    except (RuntimeError, OverflowError, TypeError, ValueError) as e:   # e.g. an int beyond int64
        raise ValueError(f"{name} cannot be converted to {dtype}: {e}") from None


def _run(inputs: EFTInputs, backend: str, return_row_logprobs: bool) -> SampleResult:
    tokens, logprob, row_logprobs, status = run_backend(inputs, resolve_backend(backend, inputs.device),
                                                        return_row_logprobs)
    return SampleResult(tokens.cpu(), logprob.float().cpu(), status.cpu(),
                        row_logprobs if return_row_logprobs else None)
