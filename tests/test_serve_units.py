"""The server's pieces without a server: request-body checks, the Prometheus text, the body
limit, and the OpenAI log-probability shapes."""
from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import ValidationError

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
