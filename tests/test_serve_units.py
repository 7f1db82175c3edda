"""The server's pieces without a server: request-body checks, the Prometheus text, the body
limit, and the OpenAI log-probability shapes."""
from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import BaseModel, ValidationError

from eft_fast.serve.errors import BodyLimit
from eft_fast.serve.metrics import render_metrics
from eft_fast.serve.protocol import ChatCompletionRequest, CompletionRequest
from eft_fast.serve.responses import CompletionLogprobs, chat_logprobs, sse

_SAMPLE = re.compile(r'^eft_fast:[a-z_]+\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)+\} -?[0-9.e+-]+$')


def test_sampling_fields_map_to_sampling_params():
    body = CompletionRequest(model="m", prompt="x", top_k=-1, seed=5, stop="##", temperature=0,
                             reward_weights=[0.25, 0.75], weight_top_p=0.5, stop_token_ids=[3], ignore_eos=True)
    params = body.sampling_params(max_tokens=7, logprobs=2, seed_offset=1)
    assert (params.max_tokens, params.top_k, params.seed, params.stop, params.temperature) == (7, 0, 6, ("##",), 0.0)
    assert params.reward_weights == (0.25, 0.75) and params.weight_top_p == 0.5 and params.stop_token_ids == (3,)
    assert params.ignore_eos and params.logprobs == 2 and params.prompt_logprobs is None
    assert CompletionRequest(model="m", prompt="x").sampling_params(max_tokens=1).temperature == 1.0


@pytest.mark.parametrize("field,value", [("temperature", "0.5"), ("n", True), ("stream", 1), ("logprobs", 1.0),
                                         ("echo", "yes"), ("unknown", 1), ("n", 17), ("max_tokens", -1)])
def test_strict_completion_fields(field, value):
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**{"model": "m", "prompt": "x", field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_chat_messages():
    body = ChatCompletionRequest(model="m", messages=[
        {"role": "developer", "content": "terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert body.conversation() == [{"role": "system", "content": "terse"}, {"role": "user", "content": "ab"}]
    with pytest.raises(ValidationError):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": [{"type": "image_url"}]}])


def test_metrics_text_format():
    stats = {"num_requests_running": 2, "num_requests_waiting": 1, "kv_blocks_used": {"knowledge": 3, "tuned": 0},
             "kv_blocks_total": {"knowledge": 12, "tuned": 0}, "num_preemptions": 0, "prompt_tokens_total": 10,
             "generation_tokens_total": 20, "requests_finished_total": 3, "proposed_tokens": 8,
             "accepted_tokens": 6, "acceptance_rate": 0.75}
    text = render_metrics(stats, 'my "model"')
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(_SAMPLE.match(line) for line in samples), samples
    assert 'eft_fast:kv_cache_usage_perc{model_name="my \\"model\\"",model="knowledge"} 0.25' in samples
    assert 'eft_fast:spec_decode_acceptance_rate{model_name="my \\"model\\""} 0.75' in samples
    assert text.count("# TYPE") == text.count("# HELP") == len({line.split("{")[0] for line in samples})
    no_spec = render_metrics({k: v for k, v in stats.items() if k not in ("proposed_tokens", "accepted_tokens",
                                                                        "acceptance_rate")}, "m")
    assert "spec_decode" not in no_spec


def test_body_limit_refuses_streamed_and_declared_bodies():
    seen = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(headers, chunks):
        sent = []
        pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return pending.pop(0)

        async def send(message):
            sent.append(message)

        await BodyLimit(app, max_bytes=10)({"type": "http", "headers": headers}, receive, send)
        return sent[0]["status"]

    assert asyncio.run(call([], [b"12345", b"12345"])) == 200
    assert asyncio.run(call([], [b"123456", b"123456"])) == 413          # streamed past the limit
    assert asyncio.run(call([(b"content-length", b"11")], [b"x"])) == 413  # declared past the limit


class _Tokens:
    def decode(self, ids):
        return {1: "a", 2: "bc", 3: "bc"}[ids[0]]


def test_logprob_shapes():
    from eft_fast.serve.responses import TokenText

    text = TokenText(_Tokens())
    completion = CompletionLogprobs(text)
    first = completion.prompt_piece([1, 2], [None, (-0.5, [(2, -0.5), (3, -0.7), (1, -2.0)])])
    assert first == {"tokens": ["a", "bc"], "token_logprobs": [None, -0.5],
                     "top_logprobs": [None, {"bc": -0.5, "a": -2.0}], "text_offset": [0, 1]}
    later = completion.piece([1], [float("-inf")], [None])
    assert later["text_offset"] == [3] and later["token_logprobs"][0] < -1e38   # JSON has no -inf
    chat = chat_logprobs(text, [2], [-0.1], [[(2, -0.1), (1, -3.0)]])
    assert chat == {"content": [{"token": "bc", "logprob": -0.1, "bytes": [98, 99],
                                 "top_logprobs": [{"token": "bc", "logprob": -0.1, "bytes": [98, 99]},
                                                  {"token": "a", "logprob": -3.0, "bytes": [97]}]}]}
    assert sse({"a": 1}) == 'data: {"a": 1}\n\n' and sse("[DONE]") == "data: [DONE]\n\n"


class _PromptBody(BaseModel):
    prompt: str


def test_body_limit_answers_413_to_a_streamed_body_through_fastapi():
    """A body without Content-Length that grows past the limit: 413 from the real app stack
    (FastAPI's body parser would turn an error raised inside its own read into 400)."""
    import httpx
    from fastapi import FastAPI

    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=100)

    @app.post("/x")
    async def endpoint(body: _PromptBody):
        return {"length": len(body.prompt)}

    async def main():
        async def chunks(size):
            yield b'{"prompt": "'
            yield b"a" * size
            yield b'"}'

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            big = await client.post("/x", content=chunks(500), headers={"content-type": "application/json"})
            small = await client.post("/x", content=chunks(50), headers={"content-type": "application/json"})
            return big, small

    big, small = asyncio.run(main())
    assert big.status_code == 413 and "larger than 100 bytes" in big.text
    assert small.status_code == 200 and small.json() == {"length": 50}


def test_streamed_echo_is_sent_once_when_the_prompt_is_prefilled_in_chunks():
    """Chunked prefill gives a request empty deltas before its first token: the echoed prompt
    must still be the stream's first chunk, once."""
    import json
    from types import SimpleNamespace

    from eft_fast.engine.outputs import StreamDelta
    from eft_fast.engine.sampling_params import SamplingParams
    from eft_fast.serve import completions
    from eft_fast.serve.responses import TokenText
    from eft_fast.serve.runs import Choice

    class Tokens:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    state = SimpleNamespace(token_text=TokenText(Tokens()), model_name="m")
    body = CompletionRequest(model="m", prompt=[1, 2, 3], echo=True, stream=True, max_tokens=2)
    choices = [Choice(0, [1, 2, 3], SamplingParams(max_tokens=2), prompt_ids=[1, 2, 3])]
    deltas = [StreamDelta(0, [], ""), StreamDelta(0, [], ""), StreamDelta(0, [7], "x"),
              StreamDelta(0, [8], "y", finished=True, finish_reason="length")]

    class Stream:
        def __init__(self):
            self._deltas = iter(deltas)

        def __aiter__(self):
            return self

        async def __anext__(self):
            try:
                return next(self._deltas)
            except StopIteration:
                raise StopAsyncIteration from None

        def close(self):
            pass

    async def main():
        shaper = completions._Shaper(state, body, ["PROMPT"])
        return [e async for e in completions._stream(state, body, shaper, choices, [Stream()], "id", 0)]

    events = asyncio.run(main())
    texts = [json.loads(e[len("data: "):])["choices"][0]["text"] for e in events if e.startswith("data: {")]
    assert texts == ["PROMPT", "x", "y"]
