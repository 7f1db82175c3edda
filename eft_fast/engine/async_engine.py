"""AsyncEFTEngine: an EFTEngine driven by one background thread, for asyncio servers.

    engine = AsyncEFTEngine(EFTEngine(knowledge=..., tuned=..., reference=...))
    async for delta in engine.generate("Why is the sky blue?", SamplingParams(max_tokens=64)):
        print(delta.text, end="")

The thread owns the EFTEngine: it alone calls its methods. Coroutines talk to it through a
command queue (add a request, abort one, stop), which the thread reads between steps, so adding
and aborting never wait for a step and never touch the engine under a step's feet. Each step's
deltas go back to the awaiting coroutines on their own event loops. A request whose consumer
stops iterating (a client that left, a cancelled task) is aborted at the thread's next turn,
which frees its KV blocks within one engine step. Finished requests are released from the
engine as their last delta is delivered, so a long-running server holds nothing for them.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from .engine import EFTEngine
from .outputs import StreamDelta
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.5        # how long the idle thread blocks on its command queue at a time


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (closed, or a step failed in a way the engine cannot
    recover from, such as a lost tensor-parallel worker); no request can run."""


class EngineOverloadedError(RuntimeError):
    """More requests wait for their first token than ``max_waiting`` allows."""


@dataclass
class _Sink:
    """Where one request's deltas go: a queue on the event loop of its consumer."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:          # the consumer's loop is closed: nobody is listening
            pass


@dataclass
class _Add:
    prompt: Any
    params: SamplingParams
    sink: _Sink
    handle: int                              # the caller's key for later aborts
    accepted: "asyncio.Future"               # resolved with None, or failed with the add error


@dataclass
class _Abort:
    handle: int


@dataclass
class _Stop:
    final: bool      # False: abort every request and go on; True: then stop the thread


class AsyncEFTEngine:
    """Serve an :class:`EFTEngine` to coroutines.

    Args:
        engine: the engine; from now on only this object's thread may call it.
        max_waiting: refuse (:class:`EngineOverloadedError`) a new request while this many
            requests wait for their first token; None = no limit.

    Counters and the engine's :meth:`EFTEngine.stats` (refreshed after every step) are
    available through :meth:`stats` without touching the engine.
    """

    def __init__(self, engine: EFTEngine, *, max_waiting: int | None = None):
        if max_waiting is not None and max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._handles = itertools.count()
        self._waiting_first_token = 0          # event-loop side: requests queued that have no token yet
        self._counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "requests_finished_total": 0}
        self._snapshot = engine.stats()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="eft_fast-engine", daemon=True)
        self._thread.start()

    # ---- the event-loop side ----------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def stats(self) -> dict:
        """The engine's stats as of its last step, plus prompt_tokens_total,
        generation_tokens_total and requests_finished_total since start, and
        num_requests_waiting_first_token."""
        return {**self._snapshot, **self._counters, "num_requests_waiting_first_token": self._waiting_first_token}

    async def add(self, prompt: str | Sequence[int] | list[dict], params: SamplingParams | None = None, *,
                  check_overload: bool = True) -> "RequestStream":
        """Queue one request; returns the async iterator of its deltas once the engine took it.

        Raises TypeError / ValueError for a bad prompt or params, or a prompt too long for a
        model's context; :class:`EngineOverloadedError` past ``max_waiting`` (unless
        ``check_overload`` is False: the later parts of one client request that was admitted
        as a whole); :class:`EngineDeadError` once the engine has stopped, also when it stops
        while the request is queued. Closing the stream before its last delta (``aclose()``,
        or dropping it) aborts the request and frees its KV blocks at the engine's next turn.
        """
        self._check_alive()
        if check_overload and self.max_waiting is not None and self._waiting_first_token >= self.max_waiting:
            raise EngineOverloadedError(f"{self._waiting_first_token} requests are waiting for their first token "
                                        f"(max_waiting={self.max_waiting})")
        loop = asyncio.get_running_loop()
        add = _Add(prompt, params if params is not None else SamplingParams(), _Sink(loop, asyncio.Queue()),
                   next(self._handles), loop.create_future())
        stream = RequestStream(self, add.handle, add.sink)
        self._commands.put(add)
        if self._dead is not None:
            # The thread may have drained the queue before this add arrived: nobody else answers it.
            _resolve(loop, add.accepted, EngineDeadError(f"the engine has stopped: {self._dead}"))
        try:
            stream.prompt_tokens = await add.accepted      # raises the add's TypeError / ValueError
        except BaseException:
            stream.close()
            raise
        return stream

    async def generate(self, prompt: str | Sequence[int] | list[dict], params: SamplingParams | None = None
                       ) -> AsyncIterator[StreamDelta]:
        """:meth:`add`, then yield the request's deltas as steps produce them; the last has
        ``finished=True``. Leaving the loop early (break, cancellation, an exception) aborts
        the request."""
        stream = await self.add(prompt, params)
        try:
            async for delta in stream:
                yield delta
        finally:
            stream.close()

    def _count(self, delta: StreamDelta) -> None:
        """Event-loop side counters (called by every stream for every delta)."""
        self._counters["generation_tokens_total"] += len(delta.token_ids)
        if delta.finished:
            self._counters["requests_finished_total"] += 1
            if delta.metrics is not None:
                prompt = delta.metrics.prompt_tokens
                self._counters["prompt_tokens_total"] += max(prompt.values()) if isinstance(prompt, dict) else prompt

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has stopped: {self._dead}") from self._dead
        if not self._thread.is_alive():
            raise EngineDeadError("the engine has stopped")

    def abort_all(self) -> None:
        """End every request now (finish_reason "abort"); new requests are still taken.
        Safe from any thread and from signal handlers."""
        self._commands.put(_Stop(final=False))

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Abort every request (their consumers get :class:`EngineDeadError`), stop the thread
        and close the engine (tensor-parallel workers included). Safe to call twice and from
        any thread."""
        if self._thread.is_alive():
            self._commands.put(_Stop(final=True))
            self._thread.join(timeout_s)
        self.engine.close()

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        sinks: dict[int, tuple[int, _Sink]] = {}   # engine request id -> (caller handle, sink)
        by_handle: dict[int, int] = {}             # caller handle -> engine request id
        try:
            while True:
                busy = self.engine.has_unfinished()
                commands = self._take_commands(block=not busy)
                if any(isinstance(c, _Stop) and c.final for c in commands):
                    self._abort_everything(sinks, by_handle)
                    self._refuse_adds(commands)
                    return
                acted = False
                for command in commands:
                    acted |= self._apply(command, sinks, by_handle)
                if not (busy or acted or self.engine.has_unfinished()):
                    continue
                for delta in self.engine.step():
                    self._deliver(delta, sinks, by_handle)
                self._snapshot = self.engine.stats()
        except BaseException as exc:            # a dead tensor-parallel group, a bug: nothing can run now
            logger.exception("the eft_fast engine thread stopped")
            self._dead = exc
            for _, sink in sinks.values():
                sink.put(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))
        finally:
            # _dead is set first, so an add queued after this drain answers itself (see add()).
            if self._dead is None:
                self._dead = EngineDeadError("the engine thread stopped")
            self._refuse_adds(self._take_commands(block=False))

    def _refuse_adds(self, commands: list) -> None:
        """Fail the adds among ``commands`` with EngineDeadError (the thread is stopping)."""
        for command in commands:
            if isinstance(command, _Add):
                _resolve(command.sink.loop, command.accepted,
                         EngineDeadError(f"the engine has stopped: {self._dead}"))

    def _take_commands(self, block: bool) -> list:
        commands = []
        if block:
            try:
                commands.append(self._commands.get(timeout=_IDLE_POLL_S))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command, sinks: dict[int, tuple[int, _Sink]], by_handle: dict[int, int]) -> bool:
        """Carry out one command; True if the engine has something new to report."""
        if isinstance(command, _Add):
            try:
                request_id = self.engine.add_request(command.prompt, command.params, strict=True)
            except Exception as exc:           # the caller's TypeError / ValueError
                _resolve(command.sink.loop, command.accepted, exc)
                return False
            sinks[request_id] = (command.handle, command.sink)
            by_handle[command.handle] = request_id
            _resolve(command.sink.loop, command.accepted, None, self.engine.output(request_id).metrics.prompt_tokens)
            return True
        if isinstance(command, _Abort):
            request_id = by_handle.pop(command.handle, None)
            if request_id is not None:
                sinks.pop(request_id, None)    # the consumer is gone: nobody reads the final delta
                self.engine.abort(request_id)
                return True
            return False
        if isinstance(command, _Stop):
            for request_id in list(sinks):
                self.engine.abort(request_id)
            return bool(sinks)
        raise TypeError(f"unknown engine command {command!r}")

    def _deliver(self, delta: StreamDelta, sinks: dict[int, tuple[int, _Sink]], by_handle: dict[int, int]) -> None:
        entry = sinks.pop(delta.request_id, None) if delta.finished else sinks.get(delta.request_id)
        if delta.finished:
            self.engine.output(delta.request_id, pop=True)     # release the finished request
            if entry is not None:
                by_handle.pop(entry[0], None)
        if entry is not None:
            entry[1].put(delta)

    def _abort_everything(self, sinks: dict[int, tuple[int, _Sink]], by_handle: dict[int, int]) -> None:
        """Shut down: every request ends, its consumer gets EngineDeadError."""
        self._dead = EngineDeadError("the engine was shut down")
        live = list(sinks.values())
        for request_id in list(sinks):
            self.engine.abort(request_id)
        while self.engine.has_unfinished() or sinks:
            deltas = self.engine.step()
            for delta in deltas:
                self._deliver(delta, sinks, by_handle)
            if not deltas:
                break
        for _, sink in live:
            sink.put(self._dead)
        self._snapshot = self.engine.stats()


class RequestStream:
    """The deltas of one request of an :class:`AsyncEFTEngine` (``async for``); the last has
    ``finished=True``. ``close()`` / ``aclose()`` before then aborts the request, as does
    dropping the stream. ``prompt_tokens``: the prompt's length per model role (as in
    :class:`RequestMetrics`)."""

    def __init__(self, engine: AsyncEFTEngine, handle: int, sink: _Sink):
        self._engine, self._sink = engine, sink
        self.prompt_tokens: dict[str, int] | int = 0
        self._finished = False
        self._waiting = _WaitingSlot(engine, sink.loop)
        self._abort_on_drop = weakref.finalize(self, _drop_stream, engine, handle, self._waiting)

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> StreamDelta:
        if self._finished:
            raise StopAsyncIteration
        item = await self._sink.queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if item.token_ids or item.finished:
            self._first_token()
        self._engine._count(item)
        if item.finished:
            self._finished = True
            self._abort_on_drop.detach()
        return item

    def _first_token(self) -> None:
        self._waiting.release()

    def close(self) -> None:
        """Abort the request unless it finished (idempotent)."""
        self._first_token()
        self._finished = True
        self._abort_on_drop()

    async def aclose(self) -> None:
        self.close()


class _WaitingSlot:
    """A stream's place in ``num_requests_waiting_first_token``, held from the add until its
    first token (or its end). Released on the stream's event loop."""

    def __init__(self, engine: AsyncEFTEngine, loop: asyncio.AbstractEventLoop):
        self._engine, self._loop, self._held = engine, loop, True
        engine._waiting_first_token += 1

    def release(self) -> None:
        if self._held:
            self._held = False
            self._engine._waiting_first_token -= 1

    def release_from_any_thread(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self.release)
        except RuntimeError:                   # the loop is closed: nobody counts any more
            pass


def _drop_stream(engine: AsyncEFTEngine, handle: int, waiting: _WaitingSlot) -> None:
    """A stream was garbage-collected before its end (in any thread): abort its request and
    give its waiting slot back."""
    engine._commands.put(_Abort(handle))
    waiting.release_from_any_thread()


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, exc: BaseException | None,
             result=None) -> None:
    def settle():
        if future.done():
            return
        if exc is None:
            future.set_result(result)
        else:
            future.set_exception(exc)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass
