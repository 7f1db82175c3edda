"""The eager torch EFT sampler a user writes today, as the baseline of the op benchmarks.

Three log_softmax calls, the arithmetic, Hugging Face's sort-based top-p (as in
transformers' TopPLogitsWarper) on the small-scale policy to truncate the up-scaling
weights, and Gumbel-max sampling with torch's own generator. It is the same distribution
as eft_sample's (up to ties), not the same samples.
"""
from __future__ import annotations

import torch


def hf_top_p_mask(log_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """[B, V] bool: True where HF's TopPLogitsWarper keeps the token (sort ascending, cumsum)."""
    sorted_lp, sorted_idx = torch.sort(log_probs, descending=False, dim=-1)
    cumulative = sorted_lp.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return ~remove


def eager_eft_sample(knowledge: torch.Tensor, tuned: torch.Tensor, reference: torch.Tensor, *,
                     temperature: float = 1.0, weight_top_p: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Up-scaled EFT sampling in eager torch. Logits [B, V] -> tokens [B] int64."""
    l_knowledge = torch.log_softmax(knowledge.float(), dim=-1)
    l_tuned = torch.log_softmax(tuned.float(), dim=-1)
    l_reference = torch.log_softmax(reference.float(), dim=-1)
    up_weight = l_knowledge - l_reference
    if weight_top_p < 1.0:
        up_weight = torch.where(hf_top_p_mask(l_tuned, weight_top_p), up_weight, torch.zeros_like(up_weight))
    scores = torch.log_softmax(l_tuned + up_weight, dim=-1)
    if temperature == 0:
        return scores.argmax(dim=-1)
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    return (scores / temperature + gumbel).argmax(dim=-1)
