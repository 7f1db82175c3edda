"""Running the engine requests of one HTTP request (its choices) and watching its client.

Every choice is one engine request. :func:`start_choices` queues them all or none (a bad one
closes those already queued); :func:`merged_deltas` interleaves their deltas as they come;
:func:`abort_on_disconnect` ends the work of a client that went away, so that its requests are
aborted within one engine step.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import Request

from ..engine.async_engine import AsyncEFTEngine, RequestStream
from ..engine.outputs import RequestMetrics, StreamDelta
from ..engine.sampling_params import SamplingParams


@dataclass
class Choice:
    """One choice: what to run, and what it produced so far."""

    index: int
    prompt: object                       # text, token ids or a conversation, as the engine takes it
    params: SamplingParams
    prompt_ids: list[int] | None = None  # completions: the ids given to the engine (echo, usage)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None

    def absorb(self, delta: StreamDelta) -> None:
        self.text += delta.text
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self.top_logprobs += delta.top_logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.finished:
            self.finish_reason, self.error, self.metrics = delta.finish_reason, delta.error, delta.metrics


async def start_choices(engine: AsyncEFTEngine, choices: list[Choice]) -> list[RequestStream]:
    """Queue every choice's engine request; if one is refused, close the others and re-raise.
    The client request is admitted or refused as a whole (max_waiting is checked once)."""
    streams: list[RequestStream] = []
    try:
        for i, choice in enumerate(choices):
            streams.append(await engine.add(choice.prompt, choice.params, check_overload=i == 0))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


async def merged_deltas(streams: list[RequestStream]) -> AsyncIterator[tuple[int, StreamDelta]]:
    """(position in ``streams``, delta) as each request produces them, until all have finished.
    Closing the iterator (or an exception) closes every stream, aborting unfinished requests."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:                  # EngineDeadError: hand it to the reader
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            if item.finished:
                remaining -= 1
            yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def abort_on_disconnect(request: Request, work):
    """Await the coroutine ``work``; if the client disconnects first, cancel it (closing its
    streams aborts their requests) and return None."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return None
    finally:
        watcher.cancel()
        task.cancel()
