"""`eft-fast serve` end to end: the real `openai` client (and raw HTTP for the error cases)
against a server subprocess on 127.0.0.1, over tiny models saved with SmolLM2's tokenizer.
Every answer is checked against EFTEngine.generate in this process, or the fp64 reference."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

import eft_fast
from eft_fast.reference import eft_sample_reference
from serve_helpers import API_KEY, MODEL_NAME, running_server, save_family

pytestmark = pytest.mark.usefixtures("one_thread")
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("serve_models"))


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    with running_server(dirs, tmp_path_factory.mktemp("serve_logs"), "--api-key", API_KEY) as s:
        yield s


@pytest.fixture(scope="module")
def engine(dirs):
    """The server's engine, built here: what every answer must equal."""
    return eft_fast.EFTEngine(knowledge=dirs["knowledge"], tuned=dirs["tuned"], reference=dirs["reference"],
                              max_num_seqs=16, block_size=16)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ids_of(engine, text: str) -> list[int]:
    return list(engine.tokenizer(text)["input_ids"])


def token_strings(engine, ids: list[int]) -> list[str]:
    return [engine.tokenizer.decode([t]) for t in ids]


def metrics(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(server, timeout_s: float = 20.0) -> dict[str, float]:
    """/metrics once no request runs or waits and no KV block is in use (bounded wait)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(server)
        busy = {k: v for k, v in m.items() if k.startswith(("eft_fast:num_requests_running",
                                                            "eft_fast:num_requests_waiting",
                                                            "eft_fast:kv_cache_usage_perc")) and v != 0}
        if not busy or time.monotonic() > deadline:
            assert not busy, f"still busy after {timeout_s} s: {busy}"
            return m
        time.sleep(0.1)


# ---------------------------------------------------------------- discovery


def test_health_and_models(server, client):
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


# ---------------------------------------------------------------- completions


def test_completion_equals_engine_generate(client, engine):
    prompt = "The quick brown fox"
    params = eft_fast.SamplingParams(max_tokens=12, seed=7, logprobs=2, ignore_eos=True)
    want, = engine.generate([ids_of(engine, prompt)], params)
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, seed=7, logprobs=2,
                                    extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.text == want.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == token_strings(engine, want.token_ids)
    assert choice.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert len(choice.logprobs.top_logprobs) == 12 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    assert got.usage.prompt_tokens == len(ids_of(engine, prompt)) and got.usage.completion_tokens == 12


def test_streamed_completion_and_n_seeded_choices(client, engine):
    prompt = "Once upon a time"
    params = [eft_fast.SamplingParams(max_tokens=10, seed=s, temperature=0.8, ignore_eos=True) for s in (21, 22)]
    want = engine.generate([ids_of(engine, prompt)] * 2, params)
    assert want[0].token_ids != want[1].token_ids             # two distinct samples
    texts, finish, usage = ["", ""], [None, None], None
    stream = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=10, seed=21, n=2,
                                       temperature=0.8, stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            finish[c.index] = c.finish_reason or finish[c.index]
    assert texts == [w.text for w in want] and finish == ["length", "length"]
    assert usage.completion_tokens == 20 and usage.prompt_tokens == len(ids_of(engine, prompt))


def test_prompt_lists_and_token_ids(client, engine):
    ids = ids_of(engine, "Hello there")
    got = client.completions.create(model=MODEL_NAME, prompt=[ids, ids[:1]], max_tokens=4, seed=5,
                                    extra_body={"ignore_eos": True})
    want = engine.generate([ids, ids[:1]], eft_fast.SamplingParams(max_tokens=4, seed=5, ignore_eos=True))
    assert [c.text for c in sorted(got.choices, key=lambda c: c.index)] == [w.text for w in want]
    texts = client.completions.create(model=MODEL_NAME, prompt=["a b", "c d"], max_tokens=2, seed=1)
    assert sorted(c.index for c in texts.choices) == [0, 1]


def test_echo_logprobs_score_the_prompt_like_the_fp64_reference(client, engine, dirs):
    prompt = "One two three four five six"
    ids = ids_of(engine, prompt)
    got = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = got.choices[0]
    assert choice.text == prompt and got.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.tokens == token_strings(engine, ids)

    with torch.no_grad():   # HF's own forward of each model over the whole prompt
        logits = [m(input_ids=torch.tensor([ids])).logits[0].double() for m in engine.models.models]
    n, V = len(ids), engine.models.vocab_size
    knowledge, tuned, reference = (logits[engine.roles.knowledge], logits[engine.roles.tuned[0]],
                                   logits[engine.roles.reference[0]])
    ref = eft_sample_reference(knowledge, tuned[None], reference[None], torch.zeros(n, dtype=torch.int64),
                               torch.arange(n), torch.ones(n, 1, dtype=torch.float64),
                               torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64),
                               torch.zeros(n, dtype=torch.int64), torch.ones(n, dtype=torch.float64), V).row_logprobs
    want = ref[torch.arange(n - 1), torch.tensor(ids[1:])]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want.tolist(), abs=2e-4)
    for i, top in enumerate(choice.logprobs.top_logprobs[1:]):
        assert sorted(top.values(), reverse=True) == pytest.approx(ref[i].topk(3).values.tolist(), abs=2e-4)

    # echo with generated tokens: the prompt's part first, then the generation's
    both = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True, logprobs=1, seed=2,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert both.text.startswith(prompt) and len(both.logprobs.tokens) == n + 3
    assert both.logprobs.token_logprobs[1:n] == pytest.approx(choice.logprobs.token_logprobs[1:], abs=1e-6)


# ---------------------------------------------------------------- chat


def test_chat_equals_engine_generate(client, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"}]
    want, = engine.generate([messages], eft_fast.SamplingParams(max_tokens=10, seed=3, logprobs=2, ignore_eos=True))
    got = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, seed=3, logprobs=True,
                                         top_logprobs=2, extra_body={"ignore_eos": True})
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert [e.token for e in choice.logprobs.content] == token_strings(engine, want.token_ids)
    assert [e.logprob for e in choice.logprobs.content] == pytest.approx(want.logprobs, abs=1e-5)
    assert got.usage.prompt_tokens == want.metrics.prompt_tokens["tuned"]

    pieces, roles = [], []
    for chunk in client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10,
                                                seed=3, stream=True, extra_body={"ignore_eos": True}):
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        pieces.append(delta.content or "")
    assert roles[0] == "assistant" and not any(roles[1:])
    assert "".join(pieces) == want.text


def test_eft_extension_fields(client, engine):
    params = eft_fast.SamplingParams(max_tokens=6, seed=9, top_k=5, weight_top_p=0.5, ignore_eos=True)
    want, = engine.generate([ids_of(engine, "Hi")], params)
    got = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, seed=9,
                                    extra_body={"top_k": 5, "weight_top_p": 0.5, "ignore_eos": True})
    assert got.choices[0].text == want.text


# ---------------------------------------------------------------- many clients


def test_concurrent_streams_with_disconnects(server, engine):
    prompts = [f"Story number {i}:" for i in range(64)]
    leaving = set(range(0, 64, 4))                          # a quarter disconnect after their first chunk
    body = {"model": MODEL_NAME, "max_tokens": 16, "stream": True, "ignore_eos": True, "temperature": 0.9}

    async def one(http: httpx.AsyncClient, i: int):
        text = ""
        async with http.stream("POST", f"{server.url}/v1/completions", headers=AUTH,
                               json={**body, "prompt": prompts[i], "seed": 1000 + i}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return text
                event = json.loads(line[len("data: "):])
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                if i in leaving:
                    return None                             # closes the connection mid-stream
        raise AssertionError("the stream ended without [DONE]")

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(64))), 240)

    texts = asyncio.run(main())
    kept = [i for i in range(64) if i not in leaving]
    want = engine.generate([ids_of(engine, prompts[i]) for i in kept],
                           [eft_fast.SamplingParams(max_tokens=16, seed=1000 + i, temperature=0.9, ignore_eos=True)
                            for i in kept])
    assert [texts[i] for i in kept] == [w.text for w in want]
    m = wait_idle(server)
    assert m[f'eft_fast:num_requests_running{{model_name="{MODEL_NAME}"}}'] == 0


# ---------------------------------------------------------------- errors


def _post(server, path: str, body, headers=AUTH, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", headers=headers, timeout=60,
                      **({"content": body} if isinstance(body, (bytes, str)) else {"json": body}), **kw)


COMPLETION = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ERROR_CASES = {
    "unknown field": ("/v1/completions", {**COMPLETION, "foo": 1}, 400, "foo"),
    "wrong type": ("/v1/completions", {**COMPLETION, "temperature": "hot"}, 400, "temperature"),
    "bad temperature": ("/v1/completions", {**COMPLETION, "temperature": -1}, 400, "temperature"),
    "bad top_p": ("/v1/completions", {**COMPLETION, "top_p": 0}, 400, "top_p"),
    "n = 0": ("/v1/completions", {**COMPLETION, "n": 0}, 400, "n"),
    "too many logprobs": ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs"),
    "max_tokens 0 without echo": ("/v1/completions", {**COMPLETION, "max_tokens": 0}, 400, "max_tokens"),
    "reward weights": ("/v1/completions", {**COMPLETION, "reward_weights": [0.5, 0.5]}, 400, "reward_weights"),
    "empty prompt": ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt"),
    "token outside vocabulary": ("/v1/completions", {**COMPLETION, "prompt": [1, 10**9]}, 400, "prompt"),
    "negative token id": ("/v1/completions", {**COMPLETION, "prompt": [1, -1]}, 400, "prompt"),
    "prompt too long": ("/v1/completions", {**COMPLETION, "prompt": "word " * 600}, 400, "prompt"),
    "missing prompt": ("/v1/completions", {"model": MODEL_NAME}, 400, "prompt"),
    "unknown model": ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model"),
    "bad role": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    "no messages": ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    "top_logprobs without logprobs": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    "malformed JSON": ("/v1/completions", b'{"model": "eft-tiny", "prompt": ', 400, None),
    "not an object": ("/v1/completions", b"[1, 2, 3]", 400, None),
}


def _check_still_serving(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    ok = _post(server, "/v1/completions", COMPLETION)
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_envelopes(server, case):
    path, body, status, param = ERROR_CASES[case]
    response = _post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param or error["param"].startswith(param), error
    _check_still_serving(server)


def test_auth_and_unknown_paths(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = _post(server, "/v1/completions", COMPLETION, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    missing = httpx.get(f"{server.url}/v1/nothing", headers=AUTH, timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    _check_still_serving(server)


def test_huge_body_is_refused(server):
    response = _post(server, "/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (17 << 20) + b'"}')
    assert response.status_code == 413 and "error" in response.json()
    _check_still_serving(server)


def test_metrics_after_traffic(server, client):
    client.completions.create(model=MODEL_NAME, prompt="count me", max_tokens=3, extra_body={"ignore_eos": True})
    m = wait_idle(server)
    label = f'{{model_name="{MODEL_NAME}"}}'
    assert m[f"eft_fast:generation_tokens_total{label}"] >= 3
    assert m[f"eft_fast:prompt_tokens_total{label}"] >= 2
    for role in ("knowledge", "tuned", "reference"):
        assert m[f'eft_fast:kv_cache_usage_perc{{model_name="{MODEL_NAME}",model="{role}"}}'] == 0


def test_a_client_that_leaves_a_non_streamed_request_aborts_it(server):
    label = f'{{model_name="{MODEL_NAME}"}}'
    before = wait_idle(server)[f"eft_fast:generation_tokens_total{label}"]
    body = {**COMPLETION, "prompt": "Go", "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):        # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, json=body, timeout=httpx.Timeout(60, read=0.5))
    after = wait_idle(server)[f"eft_fast:generation_tokens_total{label}"]
    assert after - before < 480, "the request ran to its end after its client left"
    _check_still_serving(server)


def test_serving_benchmark_client(server):
    from eft_fast.bench.serve_load import run_serving_benchmark

    result = asyncio.run(run_serving_benchmark(server.url, MODEL_NAME, [f"prompt {i}" for i in range(6)],
                                               num_clients=3, max_tokens=4, api_key=API_KEY, timeout_s=120))
    assert (result.completed, result.failed, result.total_output_tokens) == (6, 0, 24), result.errors
    assert 0 < result.ttft_ms["p50"] <= result.e2e_ms["p50"] and result.tpot_ms["mean"] > 0
    bad = asyncio.run(run_serving_benchmark(server.url, "no-such-model", ["x"], num_clients=1, max_tokens=2,
                                            api_key=API_KEY, timeout_s=60))
    assert bad.failed == 1 and "404" in bad.errors[0]


def test_continuous_usage_stats(client, engine):
    stream = client.completions.create(model=MODEL_NAME, prompt="Count", max_tokens=5, seed=4, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    counts = [c.usage.completion_tokens for c in chunks if c.choices]
    assert counts == sorted(counts) and counts[-1] == 5 and len(counts) >= 2
    assert all(c.usage.prompt_tokens == len(ids_of(engine, "Count")) for c in chunks)
    assert not chunks[-1].choices and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
