"""Request lifecycle: a closed stream aborts its requests, streamed requests are released,
an interruption inside a step leaves the engine consistent, abort(), and stats() shows what
the engine holds."""
from __future__ import annotations

import gc

import pytest

from eft_fast import SamplingParams
from engine_helpers import VOCAB, RaiseOnCall, random_requests, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = ({"temperature": 0.0}, {"temperature": 1.0})


def assert_nothing_held(engine):
    stats = engine.stats()
    assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0, stats
    assert all(n == 0 for n in stats["kv_blocks_used"].values()), stats
    assert stats["num_requests_unclaimed"] == 0 and not engine._requests, stats
    for runner in engine.runners:
        assert runner.blocks.num_free_blocks == runner.blocks.num_blocks, runner.role


def test_stats_report_what_is_held(family, rng):
    prompts, params = random_requests(rng, 3, 6, SETTINGS)
    engine = tiny_engine(family)
    stats = engine.stats()
    assert set(stats["kv_blocks_used"]) == {"knowledge", "tuned", "reference"}
    assert_nothing_held(engine)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    assert engine.stats()["num_requests_waiting"] == 3
    engine.step()                                     # the prefill admits all three
    stats = engine.stats()
    assert stats["num_requests_running"] == 3 and stats["num_requests_waiting"] == 0
    assert all(n > 0 for n in stats["kv_blocks_used"].values())
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["num_requests_unclaimed"] == 3
    for i in ids:
        engine.output(i, pop=True)
    assert_nothing_held(engine)


@pytest.mark.parametrize("speculative_k", [0, 2])
def test_closing_a_stream_aborts_its_requests(family, rng, speculative_k):
    prompts, params = random_requests(rng, 4, 12, SETTINGS)
    later, later_params = random_requests(rng, 2, 6, SETTINGS)
    clean = tiny_engine(family).generate(later, later_params)
    engine = tiny_engine(family, speculative_k=speculative_k)
    stream = engine.stream(prompts, params)
    for delta in stream:
        if delta.token_ids:
            break                                     # abandon it with requests in flight
    assert engine.stats()["num_requests_running"] > 0
    stream.close()
    assert_nothing_held(engine)
    # later calls decode only their own requests and yield only their own deltas
    outs = engine.generate(later, later_params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in clean]
    ids = set()
    for delta in engine.stream(later, later_params):
        ids.add(delta.request_id)
    assert len(ids) == 2 and min(ids) > max(o.request_id for o in outs)
    assert_nothing_held(engine)


def test_a_garbage_collected_stream_aborts_its_requests(family, rng):
    prompts, params = random_requests(rng, 3, 12, SETTINGS)
    engine = tiny_engine(family)
    stream = engine.stream(prompts, params)
    next(stream)
    del stream
    gc.collect()
    assert_nothing_held(engine)


def test_an_exception_in_the_consumer_aborts_the_stream(family, rng):
    prompts, params = random_requests(rng, 3, 12, SETTINGS)
    engine = tiny_engine(family)
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in engine.stream(prompts, params):
            raise RuntimeError("consumer failed")
    assert_nothing_held(engine)


def test_streamed_requests_are_released(family, rng):
    prompts, params = random_requests(rng, 40, 2, SETTINGS)
    engine = tiny_engine(family)
    finished = 0
    for delta in engine.stream(prompts, params):
        finished += delta.finished
    assert finished == 40
    assert_nothing_held(engine)


def test_streams_interleaved_each_get_their_own_deltas(family, rng):
    prompts, params = random_requests(rng, 4, 5, SETTINGS)
    clean = tiny_engine(family).generate(prompts, params)
    engine = tiny_engine(family)
    a, b = engine.stream(prompts[:2], params[:2]), engine.stream(prompts[2:], params[2:])
    tokens: dict[int, list[int]] = {}
    reasons = {}
    streams = [a, b]
    while streams:                               # alternate: each stream drives steps for both
        for stream in list(streams):
            delta = next(stream, None)
            if delta is None:
                streams.remove(stream)
                continue
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            reasons[delta.request_id] = delta.finish_reason
    assert [tokens[i] for i in sorted(tokens)] == [o.token_ids for o in clean]
    assert all(r == "length" for r in reasons.values())
    assert_nothing_held(engine)


def test_a_bad_prompt_adds_none_of_the_call(family):
    engine = tiny_engine(family)
    with pytest.raises(ValueError, match=r"prompts\[2\]"):
        engine.generate([[1, 2], [3], [VOCAB + 5]], SamplingParams(max_tokens=2))
    assert_nothing_held(engine)


def test_abort(family, rng):
    prompts, params = random_requests(rng, 3, 10, SETTINGS)
    engine = tiny_engine(family)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.step()
    engine.step()
    assert engine.abort(ids[1]) is True
    assert engine.abort(ids[1]) is False and engine.abort(12345) is False
    deltas = {d.request_id: d for d in engine.step()}
    assert deltas[ids[1]].finished and deltas[ids[1]].finish_reason == "abort"
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(i, pop=True) for i in ids]
    assert [o.finish_reason for o in outs] == ["length", "abort", "length"]
    assert len(outs[1].token_ids) == 2
    assert_nothing_held(engine)


# knowledge forward calls with two requests: 1 = their prefill, 2 = the first decode round;
# with k = 2 the tuned model's call 3 is a draft step in the middle of a round
@pytest.mark.parametrize("role, call, speculative_k", [("knowledge", 1, 0), ("knowledge", 2, 0),
                                                       ("tuned", 3, 2), ("knowledge", 2, 2)])
@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
def test_interrupt_inside_generate_leaves_the_engine_consistent(family, rng, monkeypatch, role, call,
                                                                 speculative_k, exc):
    prompts, params = random_requests(rng, 2, 8, SETTINGS)
    after = ([[9, 9]], SamplingParams(max_tokens=6, seed=3, ignore_eos=True))
    clean = tiny_engine(family).generate(*after)[0].token_ids
    engine = tiny_engine(family, speculative_k=speculative_k)
    model = engine.runners[engine.models.names.index(role)].model
    monkeypatch.setattr(model, "forward", RaiseOnCall(model.forward, call, exc()))
    with pytest.raises(exc):
        engine.generate(prompts, params)
    assert_nothing_held(engine)
    monkeypatch.undo()
    out = engine.generate(*after)[0]
    assert out.finish_reason == "length" and out.token_ids == clean
    assert_nothing_held(engine)


def test_interrupt_inside_manual_steps_ends_only_the_step(family, rng, monkeypatch):
    """Driven by hand (add_request / step), an interrupted step ends its own requests with
    finish_reason "abort"; a request still waiting goes on."""
    prompts, params = random_requests(rng, 3, 6, SETTINGS)
    clean = tiny_engine(family).generate(prompts[2:], params[2:])[0].token_ids
    engine = tiny_engine(family, max_num_seqs=2)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    model = engine.runners[0].model
    monkeypatch.setattr(model, "forward", RaiseOnCall(model.forward, 2, KeyboardInterrupt()))
    engine.step()                                      # prefill of the first two
    with pytest.raises(KeyboardInterrupt):
        engine.step()                                  # their first decode round
    deltas = {d.request_id: d for d in engine.step()}  # reports the two, prefills the third
    assert [deltas[i].finish_reason for i in ids[:2]] == ["abort", "abort"]
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(i, pop=True) for i in ids]
    assert "KeyboardInterrupt" in outs[0].error
    assert outs[2].finish_reason == "length" and outs[2].token_ids == clean
    assert_nothing_held(engine)


def test_interrupt_inside_the_scheduler(family, rng, monkeypatch):
    prompts, params = random_requests(rng, 4, 6, SETTINGS)
    engine = tiny_engine(family, max_num_seqs=2)
    # _reserve calls: 1, 2 admit two requests; 3 is the first decode round's
    monkeypatch.setattr(engine.scheduler, "_reserve", RaiseOnCall(engine.scheduler._reserve, 3, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, params)
    assert_nothing_held(engine)
    monkeypatch.undo()
    assert [o.finish_reason for o in engine.generate(prompts, params)] == ["length"] * 4
    assert_nothing_held(engine)


def test_a_stream_dropped_before_its_first_item_aborts_its_requests(family, rng):
    prompts, params = random_requests(rng, 3, 6, SETTINGS)
    engine = tiny_engine(family)
    stream = engine.stream(prompts, params)
    assert engine.stats()["num_requests_waiting"] == 3      # queued at the call
    del stream
    gc.collect()
    assert_nothing_held(engine)


def test_a_bad_prompt_fails_the_stream_call_itself(family):
    engine = tiny_engine(family)
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.stream([[1, 2], [VOCAB + 1]], SamplingParams(max_tokens=2))
    assert_nothing_held(engine)


def test_a_stream_closed_in_the_middle_of_a_step_is_dropped_after_it(family, rng, monkeypatch):
    """As when the garbage collector finalises an abandoned stream during another call's step."""
    prompts, params = random_requests(rng, 2, 6, SETTINGS)
    clean = tiny_engine(family).generate(prompts[1:], params[1:])[0].token_ids
    engine = tiny_engine(family)
    abandoned = engine.stream(prompts[:1], params[:1])
    next(abandoned)                                       # its request is running
    model = engine.runners[0].model
    forward = model.forward

    def forward_then_close(*args, **kwargs):
        out = forward(*args, **kwargs)
        abandoned.close()
        return out

    monkeypatch.setattr(model, "forward", forward_then_close)
    out = engine.generate(prompts[1:], params[1:])[0]
    assert out.finish_reason == "length" and out.token_ids == clean
    assert_nothing_held(engine)
