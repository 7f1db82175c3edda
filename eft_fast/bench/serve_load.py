"""A serving benchmark client for any OpenAI-compatible server, measured as serving benchmark
suites do: N concurrent streaming clients share a queue of prompts; per request the time to
first token (TTFT), the gaps between content chunks (ITL), the time per output token after
the first (TPOT) and the end-to-end latency; overall request and output-token throughput.

One stream chunk can carry several tokens (a speculative round emits up to k + 1), so ITL is
the gap between chunks, and TPOT = (latency - TTFT) / (output tokens - 1) per request.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between order statistics
    (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values_s: list[float]) -> dict[str, float]:
    """mean and p50 / p90 / p99 of durations in seconds, in milliseconds."""
    ms = [v * 1e3 for v in values_s]
    out = {"mean": sum(ms) / len(ms) if ms else float("nan")}
    out.update({f"p{q}": percentile(ms, q) for q in PERCENTILES})
    return out


@dataclass
class RequestRecord:
    """One request: seconds since its send for each content chunk, the output tokens, and
    the error, if any."""

    chunk_times_s: list[float] = field(default_factory=list)
    latency_s: float = 0.0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times_s)


@dataclass
class ServingResult:
    num_clients: int
    completed: int
    failed: int
    duration_s: float
    request_throughput: float          # completed requests / s
    output_throughput: float           # output tokens / s
    total_output_tokens: int
    ttft_ms: dict
    itl_ms: dict
    tpot_ms: dict
    e2e_ms: dict
    errors: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        lines = [f"clients {self.num_clients}: {self.completed} completed, {self.failed} failed in "
                 f"{self.duration_s:.2f} s; {self.request_throughput:.2f} req/s, "
                 f"{self.output_throughput:.1f} output tokens/s ({self.total_output_tokens} tokens)",
                 f"{'ms':<6}{'mean':>9}" + "".join(f"{'p' + str(q):>9}" for q in PERCENTILES)]
        for name in ("ttft", "itl", "tpot", "e2e"):
            stats = getattr(self, f"{name}_ms")
            lines.append(f"{name:<6}{stats['mean']:>9.1f}" + "".join(f"{stats[f'p{q}']:>9.1f}" for q in PERCENTILES))
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


async def _one_request(http: httpx.AsyncClient, url: str, body: dict, headers: dict) -> RequestRecord:
    record = RequestRecord()
    start = time.perf_counter()
    chunks = 0
    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    record.error = str(event["error"].get("message"))
                    break
                if event.get("usage"):
                    record.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    record.chunk_times_s.append(time.perf_counter() - start)
                    chunks += 1
    except (httpx.HTTPError, ValueError) as e:
        record.error = f"{type(e).__name__}: {e}"
    record.latency_s = time.perf_counter() - start
    if not record.output_tokens:
        record.output_tokens = chunks
    if record.error is None and not record.chunk_times_s:
        record.error = "no content arrived"
    return record


async def run_serving_benchmark(base_url: str, model: str, prompts: list, *, num_clients: int, max_tokens: int,
                                api_key: str | None = None, extra_body: dict | None = None,
                                timeout_s: float = 600.0) -> ServingResult:
    """Send every prompt (text or token ids) once as a streamed completion, ``num_clients`` at a
    time; prompt i uses seed i. Failed requests are counted, never raised."""
    queue: asyncio.Queue = asyncio.Queue()
    for i, prompt in enumerate(prompts):
        queue.put_nowait((i, prompt))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = f"{base_url.rstrip('/')}/v1/completions"
    records: list[RequestRecord] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "seed": i,
                    "stream_options": {"include_usage": True}, "ignore_eos": True, **(extra_body or {})}
            records.append(await _one_request(http, url, body, headers))

    limits = httpx.Limits(max_connections=num_clients, max_keepalive_connections=num_clients)
    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(num_clients)))
    duration = time.perf_counter() - start
    return summarize(records, num_clients, duration)


def summarize(records: list[RequestRecord], num_clients: int, duration_s: float) -> ServingResult:
    ok = [r for r in records if r.ok]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])]
    tpot = [(r.latency_s - r.chunk_times_s[0]) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    tokens = sum(r.output_tokens for r in ok)
    return ServingResult(
        num_clients=num_clients, completed=len(ok), failed=len(records) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) / duration_s, output_throughput=tokens / duration_s, total_output_tokens=tokens,
        ttft_ms=summary([r.chunk_times_s[0] for r in ok]), itl_ms=summary(gaps), tpot_ms=summary(tpot),
        e2e_ms=summary([r.latency_s for r in ok]), errors=[r.error for r in records if r.error][:5])
