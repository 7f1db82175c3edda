"""What every endpoint of one server shares, and the steps the two generation endpoints share:
queueing the choices (errors mapped to HTTP statuses), the non-streaming wait, and the end of a
choice (its finish reason or error)."""
from __future__ import annotations

import secrets
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request

from ..engine.async_engine import AsyncEFTEngine, EngineDeadError, EngineOverloadedError, RequestStream
from .errors import APIError
from .protocol import MAX_CHOICES
from .responses import FINISH_REASONS, TokenText, now, sse
from .runs import Choice, abort_on_disconnect, merged_deltas, start_choices


@dataclass
class ServerState:
    engine: AsyncEFTEngine
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=now)
    token_text: TokenText = None
    shutting_down: bool = False

    def __post_init__(self):
        if self.engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (pass tokenizer=...)")
        self.token_text = TokenText(self.engine.tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return min(r.max_model_len for r in self.engine.engine.runners)

    def primary_prompt_tokens(self, prompt: dict[str, int] | int) -> int:
        """A prompt's length (per role, as in RequestMetrics.prompt_tokens) as the tuned model,
        the one a chat template formats, saw it."""
        if not isinstance(prompt, dict):
            return prompt
        engine = self.engine.engine
        return prompt[engine.models.names[engine.roles.tuned[0]]]

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")


def request_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def check_choices(count: int) -> None:
    if count > MAX_CHOICES:
        raise APIError(400, f"n times the number of prompts is {count}; at most {MAX_CHOICES} completions per request",
                       param="n")


async def start(state: ServerState, choices: list[Choice], fields: set[str], prompt_field: str
                ) -> list[RequestStream]:
    """Queue every choice; a refused one is a 400 (bad input: the field its message names, else
    ``prompt_field``, since the parameters were checked before), or 503 (overloaded, shutting down)."""
    if state.shutting_down:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    try:
        return await start_choices(state.engine, choices)
    except (TypeError, ValueError) as exc:
        error = APIError.from_value_error(exc, fields)
        error.param = error.param or prompt_field
        raise error from None
    except EngineOverloadedError as exc:
        raise APIError(503, f"the server is overloaded: {exc}; retry later", code="overloaded",
                       headers={"Retry-After": "1"}) from None
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_stopped") from None


async def run_to_end(request: Request, streams: list[RequestStream], choices: list[Choice]) -> bool:
    """Feed every delta to its choice until all finished (a non-streamed response). False if
    the client left first; raises the first failed choice's APIError."""
    async def work():
        async for i, delta in merged_deltas(streams):
            choices[i].absorb(delta)
        return True

    try:
        if not await abort_on_disconnect(request, work()):
            return False
    except EngineDeadError as exc:
        raise APIError(503, str(exc), code="engine_stopped") from None
    failure = next((f for f in map(choice_failure, choices) if f is not None), None)
    if failure is not None:
        raise failure
    return True


def choice_failure(choice: Choice) -> APIError | None:
    """The error that ended a choice, or None if it finished normally. An abort that reaches a
    client still connected comes from a shutdown."""
    if choice.finish_reason == "error":
        return APIError(500, f"generation failed: {choice.error}", code="generation_error")
    if choice.finish_reason == "abort":
        return APIError(503, "the server is shutting down; the request was ended", code="shutting_down")
    return None


def openai_finish_reason(choice: Choice) -> str:
    return FINISH_REASONS.get(choice.finish_reason, choice.finish_reason)


async def sse_events(streams: list[RequestStream], choices: list[Choice],
                     events: Callable[[Choice, object], list[str]],
                     final_chunk: Callable[[], dict] | None = None) -> AsyncIterator[str]:
    """The SSE events of a streamed response: ``events(choice, delta)`` for every delta as it
    comes, then ``final_chunk()`` (the usage chunk) if given, then ``data: [DONE]``. An error
    (an APIError that ``events`` raises for a failed choice, a stopped engine) is one
    ``data: {"error": ...}`` event before [DONE]. The client leaving cancels this generator,
    which closes the streams and so aborts their requests."""
    try:
        async with aclosing(merged_deltas(streams)) as deltas:
            async for i, delta in deltas:
                for event in events(choices[i], delta):
                    yield event
        if final_chunk is not None:
            yield sse(final_chunk())
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:       # the engine stopped mid-stream
        yield sse(APIError(503, f"generation stopped: {exc}", code="engine_stopped").body())
    yield sse("[DONE]")
