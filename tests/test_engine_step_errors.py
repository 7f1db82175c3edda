"""A step that raises (model forward, scheduler, CUDA out of memory) ends only the requests of
that step with finish_reason "error" and frees their KV blocks; waiting and other running
requests go on unchanged, and the engine stays usable (plain and speculative decoding)."""
from __future__ import annotations

import logging

import pytest
import torch

from engine_helpers import RaiseOnCall, random_requests, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")


def _break(monkeypatch, engine, role: str, n: int | None, exc: Exception | None = None) -> RaiseOnCall:
    """Make the ``role`` model's forward raise on its n-th call from now."""
    model = engine.runners[engine.models.names.index(role)].model
    hook = RaiseOnCall(model.forward, n, exc if exc is not None else RuntimeError("boom"))
    monkeypatch.setattr(model, "forward", hook)
    return hook


def _generate(engine, prompts, params, max_steps: int = 500):
    """``engine.generate``, but a request that never finishes fails the test instead of hanging it."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(max_steps):
        if all(engine.output(i).finished for i in ids):
            return [engine.output(i, pop=True) for i in ids]
        engine.step()
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def _assert_all_blocks_free(engine):
    for runner in engine.runners:
        assert runner.blocks.num_free_blocks == runner.blocks.num_blocks, runner.role


def _check(outs, clean, failed: set[int], error: str, same_tokens=lambda i: True):
    """Failed requests end with `error`; the others finish as in the clean run, with its tokens
    where same_tokens(i) (see test_failed_speculative_round) and as many of them elsewhere."""
    for i, (out, ref) in enumerate(zip(outs, clean)):
        if i in failed:
            assert out.finish_reason == "error" and error in out.error, (i, out.error)
            assert out.token_ids == ref.token_ids[:len(out.token_ids)]   # what it had got before was right
        else:
            assert out.finish_reason == "length" and out.error is None, (i, out.error)
            if same_tokens(i):
                assert out.token_ids == ref.token_ids, i
            else:
                assert len(out.token_ids) == len(ref.token_ids), i


# knowledge forward calls with two requests in flight: 1 = their prefill, 3 = the second decode round
@pytest.mark.parametrize("call, exc", [(1, RuntimeError("boom")), (3, RuntimeError("boom")),
                                       (3, torch.OutOfMemoryError("CUDA out of memory"))])
def test_failed_step_ends_its_requests_and_waiting_ones_run(family, rng, monkeypatch, caplog, call, exc):
    prompts, params = random_requests(rng, 5, 8)
    clean = tiny_engine(family, max_num_seqs=2).generate(prompts, params)
    engine = tiny_engine(family, max_num_seqs=2)
    hook = _break(monkeypatch, engine, "knowledge", call, exc)
    with caplog.at_level(logging.ERROR, logger="eft_fast.engine.engine"):
        outs = _generate(engine, prompts, params)
    assert hook.calls > call
    _check(outs, clean, failed={0, 1}, error=f"{type(exc).__name__}: {exc}")
    assert [len(o.token_ids) for o in outs[:2]] == ([0, 0] if call == 1 else [2, 2])
    assert any(r.exc_info and r.exc_info[1] is exc for r in caplog.records)   # logged with its traceback
    _assert_all_blocks_free(engine)
    assert not engine.has_unfinished()
    # the engine stays usable: everything again, now without the failure
    monkeypatch.undo()
    again = engine.generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in clean]
    _assert_all_blocks_free(engine)


def test_running_requests_outside_the_failed_step_go_on(family, rng, monkeypatch):
    (a, b), (pa, pb) = random_requests(rng, 2, 10)
    clean_a = tiny_engine(family).generate([a], pa)[0].token_ids
    engine = tiny_engine(family, enable_chunked_prefill=False)    # (chunked, a's token would share b's step)
    ia = engine.add_request(a, pa)
    engine.step()
    engine.step()                                  # a is running, two tokens in
    ib = engine.add_request(b, pb)
    _break(monkeypatch, engine, "tuned", 1)        # b's prefill (prefill goes first) raises
    deltas = {d.request_id: d for d in engine.step()}
    assert list(deltas) == [ib]
    assert deltas[ib].finished and deltas[ib].finish_reason == "error" and deltas[ib].token_ids == []
    assert engine.output(ib).error == "the engine's prefill step failed: RuntimeError: boom"
    assert all(r.tables[m].blocks == [] for r in [engine._requests[ib]] for m in range(len(engine.runners)))
    for _ in range(100):
        if not engine.has_unfinished():
            break
        engine.step()
    assert engine.output(ia).token_ids == clean_a and engine.output(ia).finish_reason == "length"
    _assert_all_blocks_free(engine)


def test_a_model_that_always_raises_still_lets_generate_return(family, rng, monkeypatch):
    prompts, params = random_requests(rng, 4, 8)
    engine = tiny_engine(family, max_num_seqs=2)
    _break(monkeypatch, engine, "reference", None)
    outs = _generate(engine, prompts, params)
    assert all(o.finish_reason == "error" and "RuntimeError: boom" in o.error for o in outs)
    _assert_all_blocks_free(engine)
    monkeypatch.undo()
    assert engine.generate(prompts[:1], params[0])[0].finish_reason == "length"


# _reserve calls with two requests in flight: 1, 2 admit them (the first, then the second), 3 the decode round
@pytest.mark.parametrize("call, failed", [(1, {0}), (2, {0}), (3, {0, 1})])
def test_scheduler_failure_ends_the_running_requests_or_the_head(family, rng, monkeypatch, call, failed):
    prompts, params = random_requests(rng, 4, 8)
    clean = tiny_engine(family, max_num_seqs=2).generate(prompts, params)
    engine = tiny_engine(family, max_num_seqs=2)
    monkeypatch.setattr(engine.scheduler, "_reserve",
                        RaiseOnCall(engine.scheduler._reserve, call, AssertionError("can_hold and ensure disagree")))
    outs = _generate(engine, prompts, params)
    _check(outs, clean, failed, error="the engine's scheduler failed: AssertionError: can_hold and ensure disagree")
    _assert_all_blocks_free(engine)


# speculative k=3, knowledge calls: 1 = prefill, 2 = first verify; tuned (a draft model)
# calls: 1 = prefill, 2 and 3 = the first two draft steps, so 3 fails with a draft half written
@pytest.mark.parametrize("accept", ["exact", "rejection"])
@pytest.mark.parametrize("role, call", [("knowledge", 2), ("tuned", 3)])
def test_failed_speculative_round(family, rng, monkeypatch, accept, role, call):
    prompts, params = random_requests(rng, 4, 10)
    clean = tiny_engine(family, max_num_seqs=2, speculative_k=3, accept=accept).generate(prompts, params)
    engine = tiny_engine(family, max_num_seqs=2, speculative_k=3, accept=accept)
    _break(monkeypatch, engine, role, call)
    outs = _generate(engine, prompts, params)
    # With the failed requests gone the survivors run in other batches than in the clean run;
    # both accept modes are batch-invariant (each request drafts its own length), so they
    # emit the clean run's tokens.
    _check(outs, clean, failed={0, 1}, error="the engine's decode step failed: RuntimeError: boom")
    assert [len(o.token_ids) for o in outs[:2]] == [1, 1]       # the prefill's token only
    _assert_all_blocks_free(engine)
    monkeypatch.undo()
    again = engine.generate(prompts, params)
    assert [o.token_ids for o in again] == [o.token_ids for o in clean]
    _assert_all_blocks_free(engine)
