"""POST /v1/chat/completions.

The conversation goes to the engine as it is, and each model renders it in its own prompt
format (the chat template for a tuned chat model, a plain transcript for a base model without
one; see ``PromptFormat``). A stream sends each choice's ``role`` first, then its content.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .errors import APIError
from .protocol import ChatCompletionRequest
from .responses import chat_logprobs, envelope, now, sse, usage
from .runs import Choice
from .state import (ServerState, check_choices, choice_failure, openai_finish_reason, request_id, run_to_end,
                    sse_events, start)

_FIELDS = set(ChatCompletionRequest.model_fields)


def _choices(state: ServerState, body: ChatCompletionRequest) -> list[Choice]:
    check_choices(body.n)
    if body.max_tokens is not None and body.max_completion_tokens is not None \
            and body.max_tokens != body.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; give one", param="max_completion_tokens")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = body.max_completion_tokens or body.max_tokens or state.max_model_len
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    conversation = body.conversation()
    choices = []
    for j in range(body.n):
        try:
            params = body.sampling_params(max_tokens=max_tokens, logprobs=logprobs, seed_offset=j)
        except (TypeError, ValueError) as exc:
            raise APIError.from_value_error(exc, _FIELDS) from None
        choices.append(Choice(j, conversation, params))
    return choices


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    choices = _choices(state, body)
    streams = await start(state, choices, _FIELDS, "messages")
    rid, created = request_id("chatcmpl"), now()
    if body.stream:
        return StreamingResponse(_stream(state, body, choices, streams, rid, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if not await run_to_end(request, streams, choices):
        return Response(status_code=499)       # the client left; nobody reads this
    out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(state.token_text, c.token_ids, c.logprobs, c.top_logprobs) if body.logprobs
            else None,
            "finish_reason": openai_finish_reason(c)} for c in choices]
    prompt_tokens = state.primary_prompt_tokens(streams[0].prompt_tokens)
    return JSONResponse(envelope("chat.completion", rid, state.model_name, created, out,
                                 usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices))))


async def _stream(state: ServerState, body: ChatCompletionRequest, choices: list[Choice], streams, rid: str,
                  created: int):
    """The SSE events of a streamed chat completion (errors as in the completions stream)."""
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats
    prompt_tokens = state.primary_prompt_tokens(streams[0].prompt_tokens)

    def chunk(choice: Choice, delta: dict, logprobs=None, finish_reason=None) -> str:
        extra = {}
        if continuous:
            extra["usage"] = usage(prompt_tokens, len(choice.token_ids))
        return sse(envelope("chat.completion.chunk", rid, state.model_name, created,
                            [{"index": choice.index, "delta": delta, "logprobs": logprobs,
                              "finish_reason": finish_reason}], **extra))

    def events(choice: Choice, delta) -> list[str]:
        start_token = len(choice.token_ids)
        choice.absorb(delta)
        failure = choice_failure(choice)
        if failure is not None:
            raise failure
        out = []
        if start_token == 0 and delta.token_ids:
            out.append(chunk(choice, {"role": "assistant", "content": ""}))
        logprobs = None
        if body.logprobs and len(choice.token_ids) > start_token:
            logprobs = chat_logprobs(state.token_text, choice.token_ids[start_token:], choice.logprobs[start_token:],
                                     choice.top_logprobs[start_token:])
        finish = openai_finish_reason(choice) if delta.finished else None
        if delta.text or logprobs is not None or finish is not None:
            out.append(chunk(choice, {"content": delta.text} if delta.text else {}, logprobs, finish))
        return out

    def usage_chunk() -> dict:
        return envelope("chat.completion.chunk", rid, state.model_name, created, [],
                        usage=usage(prompt_tokens, sum(len(c.token_ids) for c in choices)))

    async for event in sse_events(streams, choices, events, usage_chunk if include_usage else None):
        yield event
