"""The straightforward multi-model decoding loop: the baseline of the engine.

Each model keeps its own Hugging Face KV cache (``DynamicCache``) and decodes one sequence
at a time; a caller-supplied ``combine`` turns the models' next-token logits into a token.
This is how existing EFT / proxy-tuning code decodes. The engine tests compare against it
with the fp64 reference op as ``combine``; the engine benchmark times it with the eager
torch sampler.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


@torch.inference_mode()
def naive_generate(models: Sequence[torch.nn.Module], prompt_ids: Sequence[list[int]],
                   combine: Callable[[list[torch.Tensor], int], int], max_tokens: int,
                   eos_token_ids: Sequence[int] = ()) -> list[int]:
    """Generate one sequence.

    Args:
        models: the distinct models; each reads its own prompt ``prompt_ids[m]``.
        combine: (logits [V_m] per model at the last position, generation index) -> token id.
        max_tokens: tokens to generate at most; stops after a token in ``eos_token_ids``.
    Returns:
        the generated token ids.
    """
    from transformers import DynamicCache

    caches = [DynamicCache() for _ in models]
    device = next(models[0].parameters()).device
    pending = [list(p) for p in prompt_ids]
    seen = [0] * len(models)
    out: list[int] = []
    for step in range(max_tokens):
        logits = []
        for m, model in enumerate(models):
            ids = torch.tensor([pending[m]], device=device)
            positions = torch.arange(seen[m], seen[m] + len(pending[m]), device=device)[None]
            result = model(input_ids=ids, position_ids=positions, past_key_values=caches[m], use_cache=True)
            seen[m] += len(pending[m])
            logits.append(result.logits[0, -1])
        token = int(combine(logits, step))
        out.append(token)
        if token in eos_token_ids:
            break
        pending = [[token] for _ in models]
    return out
