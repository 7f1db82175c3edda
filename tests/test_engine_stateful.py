"""A state machine drives the engine with random sequences of add / step / abort / generate /
stream (advance, close, interrupt) / interrupted steps, on a KV pool small enough to preempt,
with prefix caching and chunked prefill on (the defaults; a 4-token step budget, so prompts
are chunked). After every action: each block is free or owned by a
live request (counts exact), the prefix cache's maps agree, and every
request that finished by length has exactly the tokens it gets when run alone (exact mode,
with and without speculation); one that was aborted or interrupted has a prefix of them."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from eft_fast import EFTEngine, SamplingParams
from engine_helpers import tiny_family

PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11, 12], [13]]
PARAMS = [SamplingParams(max_tokens=5, seed=1, ignore_eos=True, temperature=1.0),
          SamplingParams(max_tokens=3, seed=2, ignore_eos=True, temperature=0.0),
          SamplingParams(max_tokens=7, seed=3, ignore_eos=True, temperature=0.8, weight_top_p=0.9),
          SamplingParams(max_tokens=1, seed=4, ignore_eos=True, temperature=1.0, top_k=5)]
KEYS = [(p, q) for p in range(len(PROMPTS)) for q in range(len(PARAMS))]
ENGINE_KW = dict(block_size=2, num_blocks=14, max_num_seqs=3, backend="torch", max_num_batched_tokens=4)


@pytest.fixture(scope="module")
def family():
    return tiny_family(torch.float32)


@pytest.fixture(scope="module")
def alone(family):
    """Each (prompt, params) pair's tokens, every request run on its own (no prefix cache)."""
    knowledge, tuned, reference = family
    engine = EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference,
                       **{**ENGINE_KW, "num_blocks": 64, "max_num_seqs": 1, "enable_prefix_caching": False,
                          "enable_chunked_prefill": False, "max_num_batched_tokens": 8192})
    return {key: engine.generate([PROMPTS[key[0]]], PARAMS[key[1]])[0].token_ids for key in KEYS}


class OneShotInterrupt:
    """Replaces a model's forward; its first call raises KeyboardInterrupt."""

    def __init__(self, model):
        self.model, self.fired = model, False
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.fired = True
        self.restore()
        raise KeyboardInterrupt

    def restore(self):
        self.model.__dict__.pop("forward", None)


class EngineMachine(RuleBasedStateMachine):
    family = alone = None          # set by the test

    @initialize(speculative_k=st.sampled_from([0, 2]))
    def build(self, speculative_k):
        knowledge, tuned, reference = self.family
        self.engine = EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference,
                                speculative_k=speculative_k, **ENGINE_KW)
        self.keys: dict[int, tuple[int, int]] = {}      # request id -> (prompt, params) index
        self.manual: list[int] = []                     # ids added by add_request, not taken yet
        self.streams: list[tuple[object, dict[int, list[int]]]] = []

    # ---- checks ------------------------------------------------------------------------
    def _check_tokens(self, request_id: int, tokens: list[int], reason: str | None) -> None:
        expected = self.alone[self.keys[request_id]]
        if reason == "length":
            assert tokens == expected, (request_id, tokens, expected)
        else:
            assert reason in (None, "abort"), (request_id, reason)
            assert tokens == expected[:len(tokens)], (request_id, tokens, expected)

    @invariant()
    def blocks_are_owned_by_live_requests(self):
        sched = self.engine.scheduler
        live = sched.running + list(sched.waiting)
        assert all(not r.finished for r in live)
        assert len({id(r) for r in live}) == len(live)              # one queue each
        for m, runner in enumerate(self.engine.runners):
            counts = [0] * runner.blocks.num_blocks
            for r in live:
                for b in r.tables[m].blocks:
                    counts[b] += 1
            assert [runner.blocks.ref_count(b) for b in range(len(counts))] == counts, runner.role
            assert runner.blocks.num_free_blocks == counts.count(0), runner.role
            cache = runner.blocks
            assert all(cache._block_hash[b] == h for h, b in cache._cached.items()), runner.role
            assert len(cache._block_hash) == len(cache._cached), runner.role
            for r in live:      # a table's registered prefix: its leading blocks, all full of computed tokens
                table = r.tables[m]
                assert len(table.hashes) * runner.block_size <= table.num_tokens, runner.role

    @invariant()
    def finished_requests_match_their_solo_run(self):
        for request_id in self.manual:
            out = self.engine.output(request_id)
            if out.finished:
                self._check_tokens(request_id, out.token_ids, out.finish_reason)

    # ---- actions -----------------------------------------------------------------------
    @rule(key=st.sampled_from(KEYS))
    def add(self, key):
        request_id = self.engine.add_request(PROMPTS[key[0]], PARAMS[key[1]])
        self.keys[request_id] = key
        self.manual.append(request_id)

    @rule()
    def step(self):
        self.engine.step()

    @precondition(lambda self: self.manual)
    @rule(data=st.data())
    def abort(self, data):
        request_id = data.draw(st.sampled_from(self.manual))
        self.engine.abort(request_id)

    @precondition(lambda self: self.manual)
    @rule(data=st.data())
    def take_output(self, data):
        request_id = data.draw(st.sampled_from(self.manual))
        if self.engine.output(request_id).finished:
            self.manual.remove(request_id)
            self.engine.output(request_id, pop=True)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3))
    def generate(self, keys):
        first = self.engine._next_id
        outs = self.engine.generate([PROMPTS[p] for p, _ in keys], [PARAMS[q] for _, q in keys])
        for i, (key, out) in enumerate(zip(keys, outs)):
            self.keys[first + i] = key
            assert out.finish_reason == "length", out.error
            self._check_tokens(first + i, out.token_ids, out.finish_reason)

    @rule(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=3))
    def open_stream(self, keys):
        first = self.engine._next_id
        for i, key in enumerate(keys):
            self.keys[first + i] = key
        stream = self.engine.stream([PROMPTS[p] for p, _ in keys], [PARAMS[q] for _, q in keys])
        self.streams.append((stream, {}))

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def advance_stream(self, data):
        stream, tokens = data.draw(st.sampled_from(self.streams))
        delta = next(stream, None)
        if delta is None:
            self.streams.remove((stream, tokens))
            return
        tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
        if delta.finished:
            self._check_tokens(delta.request_id, tokens[delta.request_id], delta.finish_reason)

    @precondition(lambda self: self.streams)
    @rule(data=st.data())
    def close_stream(self, data):
        stream, tokens = data.draw(st.sampled_from(self.streams))
        stream.close()
        self.streams.remove((stream, tokens))

    @rule(model=st.integers(0, 2), through_stream=st.booleans())
    def interrupted_step(self, model, through_stream):
        hook = OneShotInterrupt(self.engine.runners[model].model)
        try:
            if through_stream and self.streams:
                stream, tokens = self.streams.pop()   # an exception out of a generator ends it
                next(stream, None)
            else:
                self.engine.step()
        except KeyboardInterrupt:
            assert hook.fired
        finally:
            hook.restore()

    def teardown(self):
        for stream, _ in getattr(self, "streams", []):
            stream.close()
        if not hasattr(self, "engine"):
            return
        for request_id in list(self.engine._requests):
            self.engine.abort(request_id)
        for _ in range(100):
            if not self.engine.has_unfinished():
                break
            self.engine.step()
        for runner in self.engine.runners:      # at the end every block is free (cached ones evictable)
            assert runner.blocks.num_free_blocks == runner.blocks.num_blocks, runner.role


@pytest.mark.usefixtures("one_thread")
def test_engine_state_machine(family, alone):
    EngineMachine.family, EngineMachine.alone = family, alone
    run = EngineMachine.TestCase
    run.settings = settings(max_examples=30, stateful_step_count=30, deadline=None, derandomize=True,
                            database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    run().runTest()
