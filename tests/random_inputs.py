"""Random eft_sample inputs with per-row settings drawn from the test grid."""
from __future__ import annotations

import dataclasses

import torch

from eft_fast._validation import EFTInputs, normalize_inputs

GRID_TEMPERATURE = (0.0, 0.7, 1.0)
GRID_WEIGHT_TOP_P = (1.0, 0.9, 0.5)
GRID_TOP_K = (0, 5)
GRID_TOP_P = (1.0, 0.8)
# Rows of wide_gap_inputs: every (weight_top_p, temperature) pair.
WIDE_GAP_SETTINGS = tuple((w, t) for w in (0.5, 0.9, 0.99, 1.0) for t in (0.0, 1.0))


def _pick(choices, batch, gen):
    idx = torch.randint(0, len(choices), (batch,), generator=gen)
    return torch.tensor(choices)[idx]


def random_inputs(gen: torch.Generator, *, batch: int, vocab: int, dtype=torch.float32, num_tuned: int = 1,
                  per_model_reference: bool = False, draft: bool = False, draft_reference: bool = True,
                  widths: tuple[int, int, int] | None = None, neg_inf_fraction: float = 0.02,
                  scale: float = 3.0, filters: bool = True) -> EFTInputs:
    """Canonical inputs with fresh logits (N(0, scale^2), some -inf) and per-row settings.

    widths = (knowledge, tuned, reference) widths >= vocab, for padded vocabularies; padding
    columns hold huge logits so that reading them would show.
    """
    wk, wt, wr = widths or (vocab, vocab, vocab)

    def logits(*shape_prefix, width):
        x = torch.randn(*shape_prefix, width, generator=gen) * scale
        x[..., vocab:] = 1e4
        masked = torch.rand(*shape_prefix, vocab, generator=gen) < neg_inf_fraction
        x[..., :vocab][masked] = float("-inf")
        return x.to(dtype)

    tuned = logits(num_tuned, batch, width=wt)
    knowledge = None if draft else logits(batch, width=wk)
    if draft and not draft_reference and num_tuned == 1:
        reference = None
    else:
        reference = logits(num_tuned if per_model_reference else 1, batch, width=wr)
    weights = None
    if num_tuned > 1:
        a = torch.rand(batch, 1, generator=gen)
        weights = torch.cat([a, 1 - a] + [torch.rand(batch, 1, generator=gen)] * (num_tuned - 2), dim=1)
    return normalize_inputs(
        knowledge, tuned, reference,
        torch.randint(-(2**62), 2**62, (batch,), generator=gen),
        torch.randint(0, 2**32, (batch,), generator=gen),
        reward_weights=weights,
        temperature=_pick(GRID_TEMPERATURE, batch, gen),
        weight_top_p=_pick(GRID_WEIGHT_TOP_P, batch, gen),
        top_k=_pick(GRID_TOP_K, batch, gen) if filters else 0,
        top_p=_pick(GRID_TOP_P, batch, gen) if filters else 1.0,
        vocab_size=vocab)


def wide_gap_inputs(gen: torch.Generator, *, vocab: int, scale: float, num_tuned: int = 1) -> EFTInputs:
    """Inputs whose logits span hundreds or thousands of nats (N(0, scale^2), about 5% -inf),
    one row per pair of WIDE_GAP_SETTINGS, no top-k / top-p.

    With such gaps the truncation set S is often the top token alone, and every other token
    lies far below it. Odd rows also mask the knowledge logit of tuned model 0's top token,
    so that S can hold no mass of z at all and only the tokens far below the top remain.
    """
    weight_top_p, temperature = (torch.tensor(v) for v in zip(*WIDE_GAP_SETTINGS))
    inputs = random_inputs(gen, batch=len(WIDE_GAP_SETTINGS), vocab=vocab, num_tuned=num_tuned,
                           per_model_reference=num_tuned > 1, neg_inf_fraction=0.05, scale=scale,
                           filters=False)
    top = inputs.tuned[0].argmax(-1, keepdim=True)
    inputs.knowledge[1::2].scatter_(-1, top[1::2], float("-inf"))
    return dataclasses.replace(inputs, weight_top_p=weight_top_p.to(inputs.weight_top_p),
                               temperature=temperature.to(inputs.temperature))
