"""`eft-fast serve` under load limits and signals: 503 with Retry-After past --max-waiting,
and SIGTERM ending the requests in flight and exiting 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from eft_fast.bench.serve_process import STOP_TIMEOUT_S
from serve_helpers import MODEL_NAME, running_server, save_family

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return save_family(tmp_path_factory.mktemp("serve_models"))


def test_overloaded_server_answers_503_with_retry_after(dirs, tmp_path):
    with running_server(dirs, tmp_path, "--max-waiting", "0") as server:
        for _ in range(3):
            response = httpx.post(f"{server.url}/v1/completions", timeout=30,
                                  json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "overloaded"
            assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_sigterm_ends_requests_in_flight_and_exits_0(dirs, tmp_path):
    with running_server(dirs, tmp_path) as server:
        events: list[str] = []
        first_chunk = threading.Event()

        def client():
            body = {"model": MODEL_NAME, "prompt": "Go", "max_tokens": 480, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        first_chunk.set()

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        assert first_chunk.wait(60), "no chunk arrived"
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(STOP_TIMEOUT_S)
        elapsed = time.monotonic() - start
        thread.join(10)
        assert status == 0, server.log()[-3000:]
        assert elapsed < 10
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "shutting_down"
        assert len(events) < 480


def test_tensor_parallel_server_answers_like_one_process_and_stops_its_workers(dirs, tmp_path):
    import psutil

    import eft_fast

    engine = eft_fast.EFTEngine(knowledge=dirs["knowledge"], tuned=dirs["tuned"], reference=dirs["reference"])
    ids = list(engine.tokenizer("Hello there")["input_ids"])
    want, = engine.generate([ids], eft_fast.SamplingParams(max_tokens=8, seed=1, ignore_eos=True))
    with running_server(dirs, tmp_path, "--tensor-parallel-size", "2") as server:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        assert workers, "no tensor-parallel worker was started"
        response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                              json={"model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 8, "seed": 1,
                                    "ignore_eos": True})
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == want.text
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(STOP_TIMEOUT_S) == 0
    gone, alive = psutil.wait_procs(workers, timeout=STOP_TIMEOUT_S)
    assert not alive, f"workers left behind: {alive}"
