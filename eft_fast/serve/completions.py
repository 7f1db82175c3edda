"""POST /v1/completions.

A text prompt is given to every model as the raw text (the tokenizer's plain encoding, BOS
included where it adds one), never through a chat template: that is what the completions API
means, and it lets ``echo`` + ``logprobs`` score the prompt under the EFT distribution (every
model sees the same tokens). Choice ``p * n + j`` is choice j of prompt p.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError
from .protocol import CompletionRequest
from .responses import CompletionLogprobs, envelope, merge_completion_logprobs, now, sse, usage
from .runs import Choice
from .state import (ServerState, check_choices, choice_failure, openai_finish_reason, request_id, run_to_end,
                    sse_events, start)

_FIELDS = set(CompletionRequest.model_fields) | {"prompt_logprobs"}


def _prompts(state: ServerState, prompt) -> list[tuple[str, list[int]]]:
    """(text, token ids) of each prompt."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = list(state.tokenizer(p)["input_ids"])
            if not ids:
                raise APIError(400, "prompt: a prompt encodes to no tokens", param="prompt")
            out.append((p, ids))
        else:
            if not p:
                raise APIError(400, "prompt: a token-id prompt is empty", param="prompt")
            if min(p) < 0:
                raise APIError(400, f"prompt: token ids must be >= 0, got {min(p)}", param="prompt")
            try:
                text = state.tokenizer.decode(p)
            except (OverflowError, IndexError, TypeError, ValueError) as exc:
                raise APIError(400, f"prompt: the tokenizer cannot decode these token ids ({exc})",
                               param="prompt") from None
            out.append((text, list(p)))
    return out


def _choices(state: ServerState, body: CompletionRequest) -> tuple[list[Choice], list[str]]:
    """The engine request of every choice, and each prompt's text (for echo)."""
    if body.max_tokens == 0 and not body.echo:
        raise APIError(400, "max_tokens must be >= 1 (0 is allowed only with echo, to score the prompt)",
                       param="max_tokens")
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = _prompts(state, body.prompt)
    check_choices(len(prompts) * body.n)
    score_prompt = body.echo and body.logprobs is not None
    choices = []
    for p, (_, ids) in enumerate(prompts):
        for j in range(body.n):
            try:
                params = body.sampling_params(max_tokens=max(1, body.max_tokens if body.max_tokens is not None else 16),
                                              logprobs=body.logprobs,
                                              prompt_logprobs=body.logprobs if score_prompt else None, seed_offset=j)
            except (TypeError, ValueError) as exc:
                raise APIError.from_value_error(exc, _FIELDS) from None
            choices.append(Choice(p * body.n + j, ids, params, prompt_ids=ids))
    return choices, [text for text, _ in prompts]


class _Shaper:
    """Turns one choice's progress into the completions API's text and logprobs."""

    def __init__(self, state: ServerState, body: CompletionRequest, prompt_texts: list[str]):
        self.state, self.body, self.prompt_texts = state, body, prompt_texts
        self.scoring_only = body.max_tokens == 0     # echo the prompt, generate nothing

    def prompt_text(self, choice: Choice) -> str:
        return self.prompt_texts[choice.index // self.body.n]

    def echo(self, choice: Choice, logprobs: CompletionLogprobs) -> tuple[str, dict | None]:
        piece = None
        if self.body.logprobs is not None:
            piece = logprobs.prompt_piece(choice.prompt_ids, choice.prompt_logprobs or [None] * len(choice.prompt_ids))
        return self.prompt_text(choice), piece

    def generated(self, choice: Choice, start: int, text: str, logprobs: CompletionLogprobs
                  ) -> tuple[str, dict | None]:
        if self.scoring_only:
            return "", (logprobs.piece([], [], []) if self.body.logprobs is not None else None)
        piece = None
        if self.body.logprobs is not None:
            piece = logprobs.piece(choice.token_ids[start:], choice.logprobs[start:], choice.top_logprobs[start:])
        return text, piece

    def completion_tokens(self, choice: Choice) -> int:
        return 0 if self.scoring_only else len(choice.token_ids)

    def finish_reason(self, choice: Choice) -> str:
        return "length" if self.scoring_only else openai_finish_reason(choice)


async def create_completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    choices, prompt_texts = _choices(state, body)
    shaper = _Shaper(state, body, prompt_texts)
    streams = await start(state, choices, _FIELDS, "prompt")
    rid, created = request_id("cmpl"), now()
    if body.stream:
        return StreamingResponse(_stream(state, body, shaper, choices, streams, rid, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if not await run_to_end(request, streams, choices):
        return Response(status_code=499)       # the client left; nobody reads this
    out = []
    for choice in choices:
        logprobs = CompletionLogprobs(state.token_text)
        text, pieces = "", []
        if body.echo:
            echoed, piece = shaper.echo(choice, logprobs)
            text, pieces = echoed, [piece]
        generated, piece = shaper.generated(choice, 0, choice.text, logprobs)
        text += generated
        pieces.append(piece)
        merged = merge_completion_logprobs([p for p in pieces if p is not None]) if body.logprobs is not None else None
        out.append({"index": choice.index, "text": text, "logprobs": merged,
                    "finish_reason": shaper.finish_reason(choice)})
    prompt_tokens = sum(len(c.prompt_ids) for c in choices[::body.n])
    completion_tokens = sum(shaper.completion_tokens(c) for c in choices)
    return JSONResponse(envelope("text_completion", rid, state.model_name, created, out,
                                 usage=usage(prompt_tokens, completion_tokens)))


async def _stream(state: ServerState, body: CompletionRequest, shaper: _Shaper, choices: list[Choice], streams,
                  rid: str, created: int):
    """The SSE events of a streamed completion. An error (a failed choice, a stopped engine)
    is one ``data: {"error": ...}`` event; ``data: [DONE]`` always ends the stream."""
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats
    logprobs = {c.index: CompletionLogprobs(state.token_text) for c in choices}
    echoed: set[int] = set()   # a prompt split over chunked-prefill steps gives several empty deltas

    def chunk(choice: Choice, text: str, piece, finish_reason=None) -> str:
        extra = {"usage": usage(len(choice.prompt_ids), shaper.completion_tokens(choice))} if continuous else {}
        return sse(envelope("text_completion", rid, state.model_name, created,
                            [{"index": choice.index, "text": text, "logprobs": piece, "finish_reason": finish_reason}],
                            **extra))

    def events(choice: Choice, delta) -> list[str]:
        start_token = len(choice.token_ids)
        choice.absorb(delta)
        failure = choice_failure(choice)
        if failure is not None:
            raise failure
        out = []
        if body.echo and choice.index not in echoed:
            echoed.add(choice.index)
            out.append(chunk(choice, *shaper.echo(choice, logprobs[choice.index])))
        text, piece = shaper.generated(choice, start_token, delta.text, logprobs[choice.index])
        finish = shaper.finish_reason(choice) if delta.finished else None
        if text or finish is not None or (piece is not None and piece["tokens"]):
            out.append(chunk(choice, text, piece, finish))
        return out

    def usage_chunk() -> dict:
        prompt_tokens = sum(len(c.prompt_ids) for c in choices[::body.n])
        return envelope("text_completion", rid, state.model_name, created, [],
                        usage=usage(prompt_tokens, sum(shaper.completion_tokens(c) for c in choices)))

    async for event in sse_events(streams, choices, events, usage_chunk if include_usage else None):
        yield event
