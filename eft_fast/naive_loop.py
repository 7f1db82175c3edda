"""The straightforward multi-model decoding loops: the baselines of the engine.

Each model keeps its own Hugging Face KV cache (``DynamicCache``); a caller-supplied
``combine`` turns the models' next-token logits into tokens. ``naive_generate`` decodes one
sequence at a time; ``naive_batched_generate`` decodes a static batch with left padding, as
the batched peer implementations (proxy-tuning's DExperts loop, emulated-disalignment's
generation mixin) do. The engine tests compare against both with the fp64 reference op as
``combine``; the engine benchmark times them with the eager torch sampler.
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


@torch.inference_mode()
def naive_batched_generate(models: Sequence[torch.nn.Module], prompts: Sequence[list[int]],
                           combine: Callable[[list[torch.Tensor], int], torch.Tensor], max_tokens: Sequence[int],
                           pad_token_id: int = 0) -> list[list[int]]:
    """Generate one static batch, as batched EFT / proxy-tuning code does: the prompts left-padded
    into one [B, L] batch, each model with its own Hugging Face cache, every row stepping until
    the longest request is done (a finished row keeps computing; its extra tokens are dropped).

    Args:
        models: the distinct models, all reading the same ``prompts``.
        combine: (logits [B, V_m] per model at the last position, generation index) -> tokens [B].
        max_tokens: per request; EOS is not checked (the benchmark ignores it).
    Returns:
        the generated token ids per request (``max_tokens[b]`` of them).
    """
    from transformers import DynamicCache

    device = next(models[0].parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[b, width - len(prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache() for _ in models]
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(max(max_tokens)):
        logits = [model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                        use_cache=True).logits[:, -1] for model, cache in zip(models, caches)]
        tokens = combine(logits, step).tolist()
        for b, token in enumerate(tokens):
            if len(out[b]) < max_tokens[b]:
                out[b].append(int(token))
        ids = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        positions = positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
    return out
