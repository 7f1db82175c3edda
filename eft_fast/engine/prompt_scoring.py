"""Prefill, and the prompt's log-probabilities under the EFT distribution (``echo`` with
``logprobs`` in the OpenAI API: how evaluation harnesses score multiple-choice answers).

A request that asks for ``SamplingParams.prompt_logprobs`` has every model return logits at
every prompt position in its prefill, not just the last. Row i of those logits predicts prompt
token i + 1; the fused op combines the models' rows as it does for sampling, and its row
log-probabilities (log softmax of the untempered EFT scores, the same distribution generated
tokens' log-probabilities come from) give each prompt token's score and top alternatives.
"""
from __future__ import annotations

import torch

from .model_runner import ModelRunner, SequenceStep
from .outputs import PromptLogprob
from .request import Request
from .sampler import Roles, sample, top_logprobs


def prefill_logits(runners: list[ModelRunner], requests: list[Request], chunks: list[list[int]] | None = None
                   ) -> tuple[dict[int, torch.Tensor], dict[int, dict[int, torch.Tensor]], list[int]]:
    """Every model reads each request's chunk of uncached tokens (``chunks[i][m]`` tokens;
    default: all it has pending; a model with a chunk of 0 skips the request).

    Returns (model -> [C, V_m] logits at the last token of each request whose chunk ends its
    pending tokens in every model, request index -> model -> [L - 1, V_m] logits at its prompt
    positions but the last, for the requests that score their prompt, the indices of those C
    complete requests). A request scores its prompt only when one chunk holds all of it.
    """
    pending = [[len(r.pending_tokens(m)) for m in range(len(runners))] for r in requests]
    chunks = pending if chunks is None else chunks
    complete = [i for i in range(len(requests)) if chunks[i] == pending[i]]
    scoring = [i for i in complete
               if requests[i].wants_prompt_logprobs and all(t.num_tokens == 0 for t in requests[i].tables)]
    last: dict[int, torch.Tensor] = {}
    prompt_rows: dict[int, dict[int, torch.Tensor]] = {i: {} for i in scoring}
    for m, runner in enumerate(runners):
        fed = [i for i in range(len(requests)) if chunks[i][m] > 0]
        if not fed:                  # this model has nothing to read in this step (nor any complete request)
            continue
        steps = [SequenceStep(requests[i].tables[m], requests[i].pending_tokens(m)[:chunks[i][m]]) for i in fed]
        lengths = [len(s.token_ids) for s in steps]
        every = runner.forward(steps, all_logits=bool(scoring))        # [S or sum(lengths), V_m]
        if scoring:
            ends = torch.tensor(lengths, device=every.device).cumsum(0)
            starts = ends - torch.tensor(lengths, device=every.device)
            row = {i: j for j, i in enumerate(fed)}
            last[m] = every[ends[[row[i] for i in complete]] - 1]
            for i in scoring:
                start = int(starts[row[i]])
                prompt_rows[i][m] = every[start:start + len(requests[i].prompt_ids[m]) - 1]
        else:
            row = {i: j for j, i in enumerate(fed)}
            last[m] = every[[row[i] for i in complete]] if len(complete) < len(fed) else every
    return last, prompt_rows, complete


def score_prompt(roles: Roles, logits: dict[int, torch.Tensor], request: Request, *, vocab_size: int,
                 backend: str) -> list[PromptLogprob | None]:
    """The EFT log-probability of each prompt token given those before it, with the top
    ``request.params.prompt_logprobs`` alternatives; None for the first token.

    Args:
        logits: model -> [L - 1, V_m] logits at prompt positions 0 .. L - 2 (rows of :func:`prefill_logits`).
        request: its prompt ids are the same for every model (checked when it was added).

    Raises ValueError if the op cannot score a position (NaN logits, say).
    """
    prompt = request.prompt_ids[roles.tuned[0]]
    n = len(prompt) - 1
    scores: list[PromptLogprob | None] = [None]
    if n == 0:
        return scores
    result = sample(roles, logits, [request] * n, list(range(n)), vocab_size=vocab_size, backend=backend,
                    return_row_logprobs=True, with_top=False)
    failed = next((i for i in range(n) if result.error(i) is not None), None)
    if failed is not None:
        raise ValueError(f"scoring prompt token {failed + 1}: {result.error(failed)}")
    rows = result.row_logprobs
    targets = torch.tensor(prompt[1:], device=rows.device)
    token_logprobs = rows.gather(1, targets[:, None])[:, 0].float().cpu().tolist()
    tops = top_logprobs(rows, [request.params.prompt_logprobs] * n)
    scores.extend(zip(token_logprobs, tops))
    return scores
