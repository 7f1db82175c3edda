"""AsyncEFTEngine: many coroutines over one engine thread; aborts, errors and shutdown."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from contextlib import aclosing

import pytest

import eft_fast
from eft_fast.engine.async_engine import AsyncEFTEngine, EngineDeadError, EngineOverloadedError
from engine_helpers import RaiseOnCall, random_requests, tiny_engine

TIMEOUT_S = 120


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


@pytest.fixture
def engine(family):
    async_engine = AsyncEFTEngine(tiny_engine(family, speculative_k=2, max_num_seqs=8))
    yield async_engine
    async_engine.shutdown()


async def collect(async_engine, prompt, params):
    deltas = [d async for d in async_engine.generate(prompt, params)]
    assert deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1]


def assert_idle(async_engine):
    stats = async_engine.engine.stats()
    assert stats["num_requests_running"] == stats["num_requests_waiting"] == stats["num_requests_unclaimed"] == 0
    assert not any(stats["kv_blocks_used"].values())
    assert not async_engine.engine._requests


def test_concurrent_requests_match_generate(family, rng, engine):
    prompts, params = random_requests(rng, 12, max_tokens=9)

    async def main():
        return await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params)))

    results = run(main())
    expected = tiny_engine(family).generate(prompts, params)
    for (tokens, _, last), want in zip(results, expected):
        assert tokens == want.token_ids
        assert last.finish_reason == want.finish_reason
        assert last.metrics.generated_tokens == len(want.token_ids)
    stats = engine.stats()
    assert stats["generation_tokens_total"] == sum(len(w.token_ids) for w in expected)
    assert stats["requests_finished_total"] == 12 and stats["prompt_tokens_total"] == sum(map(len, prompts))
    assert_idle(engine)


def test_leaving_early_aborts_and_frees_blocks(rng, engine):
    prompts, params = random_requests(rng, 6, max_tokens=40)

    async def leave_after(prompt, sp, n):
        async with aclosing(engine.generate(prompt, sp)) as deltas:
            seen = 0
            async for _ in deltas:
                seen += 1
                if seen == n:
                    return "left"
        return "finished"

    async def cancelled(prompt, sp):
        task = asyncio.create_task(collect(engine, prompt, sp))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return "cancelled"

    async def main():
        outcomes = await asyncio.gather(*(leave_after(p, sp, 2) for p, sp in zip(prompts[:4], params[:4])),
                                        *(cancelled(p, sp) for p, sp in zip(prompts[4:], params[4:])))
        # the aborts reach the engine at its next turn: one more request flushes them through
        await collect(engine, [1, 2, 3], eft_fast.SamplingParams(max_tokens=2))
        return outcomes

    assert run(main()) == ["left"] * 4 + ["cancelled"] * 2
    assert_idle(engine)


def test_bad_requests_raise_and_others_go_on(engine):
    async def main():
        with pytest.raises(ValueError, match="reward_weights"):
            await collect(engine, [1, 2], eft_fast.SamplingParams(reward_weights=(1.0, 2.0)))
        with pytest.raises(TypeError, match="prompt"):
            await collect(engine, None, eft_fast.SamplingParams())
        return await collect(engine, [1, 2], eft_fast.SamplingParams(max_tokens=3, ignore_eos=True))

    tokens, _, last = run(main())
    assert len(tokens) == 3 and last.finish_reason == "length"
    assert_idle(engine)


def test_failing_steps_end_their_requests_and_the_loop_goes_on(rng, engine):
    prompts, params = random_requests(rng, 3, max_tokens=6)
    inner, decoder = engine.engine, engine.engine.decoder
    # every step fails while the three run (however the engine thread batches them)
    inner._prefill = RaiseOnCall(inner._prefill, None, RuntimeError("boom"))
    decoder.decode_round = RaiseOnCall(decoder.decode_round, None, RuntimeError("boom"))

    async def main():
        first = await asyncio.gather(*(collect(engine, p, sp) for p, sp in zip(prompts, params)))
        del inner._prefill, decoder.decode_round               # the model works again
        after = await collect(engine, prompts[0], params[0])
        return first, after

    first, after = run(main())
    assert all(last.finish_reason == "error" and "boom" in last.error for _, _, last in first)
    assert after[2].finish_reason in ("length", "eos")
    assert_idle(engine)


def test_max_waiting_refuses_new_requests(family):
    engine = AsyncEFTEngine(tiny_engine(family), max_waiting=2)
    try:
        async def main():
            params = eft_fast.SamplingParams(max_tokens=3)
            gens = [engine.generate([1, 2, 3], params) for _ in range(3)]
            firsts = [asyncio.ensure_future(anext(g)) for g in gens[:2]]
            await asyncio.sleep(0)                  # both are queued, neither has a token yet
            with pytest.raises(EngineOverloadedError, match="max_waiting=2"):
                await anext(gens[2])
            await asyncio.gather(*firsts)
            for g in gens[:2]:
                async for _ in g:
                    pass
            return await collect(engine, [4, 5], params)   # room again

        assert len(run(main())[0]) >= 1
        assert engine.stats()["num_requests_waiting_first_token"] == 0
    finally:
        engine.shutdown()


def test_shutdown_ends_requests_and_refuses_new_ones(family):
    engine = AsyncEFTEngine(tiny_engine(family))

    async def main():
        params = eft_fast.SamplingParams(max_tokens=10_000, ignore_eos=True)
        deltas = engine.generate([1, 2, 3], params)
        await anext(deltas)
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
        finish = None
        try:
            async for delta in deltas:
                finish = delta.finish_reason
        except EngineDeadError:
            finish = "dead"
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([1], params))
        return finish

    assert run(main()) in ("abort", "dead")
    assert not engine.is_running
    assert_idle(engine)
    engine.shutdown()                                # twice is fine


async def _endless_request(engine):
    """A request that runs until aborted, past its first delta; (its stream, its params)."""
    params = eft_fast.SamplingParams(max_tokens=10_000, ignore_eos=True)
    stream = await engine.add([1, 2, 3], params)
    await anext(stream)
    return stream, params


def test_an_add_queued_when_the_thread_dies_is_refused_not_left_waiting(family):
    """step() lets an exception through (a lost tensor-parallel group) while an add waits in
    the queue: the add raises EngineDeadError instead of waiting forever."""
    engine = AsyncEFTEngine(tiny_engine(family))
    try:
        async def main():
            stream, params = await _endless_request(engine)
            step_started = threading.Event()

            def dying_step():
                step_started.set()
                time.sleep(0.3)                       # the next add is queued meanwhile
                raise SystemError("the tensor-parallel group is gone")

            engine.engine.step = dying_step
            await asyncio.get_running_loop().run_in_executor(None, step_started.wait, 10)
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(engine.add([4, 5], params), 10)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):      # and every later add
                await asyncio.wait_for(engine.add([6], params), 10)

        run(main())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("attempt", range(3))
def test_an_add_racing_shutdown_is_answered(family, attempt):
    """An add queued while shutdown() stops the thread gets either EngineDeadError or a stream
    that ends (aborted), never silence (the stop and the add can land in one batch of commands)."""
    engine = AsyncEFTEngine(tiny_engine(family))
    try:
        async def main():
            _, params = await _endless_request(engine)
            racing = asyncio.ensure_future(engine.add([4, 5], params))
            await asyncio.sleep(0.001 * attempt)
            await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)
            try:
                late = await asyncio.wait_for(racing, 10)
            except EngineDeadError:
                return "refused"
            try:
                deltas = [d async for d in late]
            except EngineDeadError:
                return "ended"
            assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
            return "ended"

        assert run(main()) in ("refused", "ended")
    finally:
        engine.shutdown()


def test_max_waiting_admits_a_client_request_as_a_whole(family):
    """The n choices of one client request are admitted together: on an idle engine with
    max_waiting=1 a request with 3 choices runs; while its choices wait, the next is refused."""
    from eft_fast.serve.runs import Choice, start_choices

    engine = AsyncEFTEngine(tiny_engine(family), max_waiting=1)
    try:
        async def main():
            params = eft_fast.SamplingParams(max_tokens=2)
            choices = [Choice(j, [1, 2, 3], params) for j in range(3)]
            streams = await start_choices(engine, choices)
            with pytest.raises(EngineOverloadedError):
                await start_choices(engine, [Choice(0, [4], params)])
            for stream in streams:
                async for _ in stream:
                    pass
            return len(streams)

        assert run(main()) == 3
        assert engine.stats()["num_requests_waiting_first_token"] == 0
    finally:
        engine.shutdown()


def test_a_dropped_stream_gives_its_waiting_slot_back(family):
    engine = AsyncEFTEngine(tiny_engine(family), max_waiting=1)
    try:
        async def main():
            params = eft_fast.SamplingParams(max_tokens=50, ignore_eos=True)
            stream = await engine.add([1, 2, 3], params)
            assert engine.stats()["num_requests_waiting_first_token"] == 1
            del stream
            gc.collect()
            await asyncio.sleep(0.01)                 # the release runs on the loop
            assert engine.stats()["num_requests_waiting_first_token"] == 0
            return await collect(engine, [4, 5], eft_fast.SamplingParams(max_tokens=2))

        assert len(run(main())[0]) >= 1
        for _ in range(100):                           # the dropped request is aborted
            if not engine.engine._requests:
                break
            time.sleep(0.05)
        assert_idle(engine)
    finally:
        engine.shutdown()
