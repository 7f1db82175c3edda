"""Turn the models' logits of a batch into tokens with one fused ``eft_sample`` call."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validation import normalize_inputs
from ..ops import resolve_backend, run_backend
from .request import Request


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


@dataclass
class SampleResult:
    """tokens [N] int64, logprobs [N] fp32, status [N] int32 (0 = ok), all on the CPU,
    and, if asked for, row_logprobs [N, V] fp32 (log softmax of the sampled-from scores)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    status: torch.Tensor
    row_logprobs: torch.Tensor | None = None

    def per_request(self) -> list[tuple[list[int], list[float], int]]:
        """One row per request: ([token], [logprob], status) each, as decode rounds return them."""
        return [([int(t)], [float(lp)], int(s)) for t, lp, s in zip(self.tokens, self.logprobs, self.status)]


def sample(roles: Roles, logits: dict[int, torch.Tensor], rows: list[Request], positions: list[int], *,
           vocab_size: int, backend: str, draft: bool = False, need_reference: bool = True,
           return_row_logprobs: bool = False) -> SampleResult:
    """One fused ``eft_sample`` call over N rows.

    Args:
        logits: model index -> [N, V_m] logits, rows aligned with ``rows``.
        rows: the request of each row (its sampling params and seed).
        positions: the noise position of each row.
        draft: sample from the small-scale policy s (no knowledge model).
        need_reference: False only when s = l_T (R = 1, weight 1 on every row).
    """
    tuned = torch.stack([logits[m] for m in roles.tuned])                          # [R, N, V]
    reference = None
    if roles.reference and (need_reference or not draft):
        reference = torch.stack([logits[m] for m in dict.fromkeys(roles.reference)])
    knowledge = None if (draft or roles.single_model) else logits[roles.knowledge]
    num_tuned = len(roles.tuned)
    weights = None
    if any(r.params.reward_weights is not None for r in rows):
        weights = torch.tensor([list(r.params.reward_weights) if r.params.reward_weights is not None
                                else [1.0] * num_tuned for r in rows], dtype=torch.float32)
    p = [r.params for r in rows]
    device = tuned.device
    inputs = normalize_inputs(
        knowledge, tuned, reference,
        torch.tensor([r.seed for r in rows], dtype=torch.int64, device=device),
        torch.tensor(positions, dtype=torch.int64, device=device),
        reward_weights=None if weights is None else weights.to(device),
        temperature=torch.tensor([x.temperature for x in p], dtype=torch.float32, device=device),
        weight_top_p=torch.tensor([x.weight_top_p for x in p], dtype=torch.float32, device=device),
        top_k=torch.tensor([x.top_k for x in p], dtype=torch.int64, device=device),
        top_p=torch.tensor([x.top_p for x in p], dtype=torch.float32, device=device),
        vocab_size=vocab_size)
    tokens, logprob, row_logprobs, status = run_backend(inputs, resolve_backend(backend, device),
                                                        return_row_logprobs)
    return SampleResult(tokens.cpu(), logprob.float().cpu(), status.cpu(),
                        row_logprobs if return_row_logprobs else None)
