"""Scheduler: FCFS admission under max_num_seqs / max_num_batched_tokens / KV blocks, decode
rounds, preemption by recompute (no models needed)."""
from __future__ import annotations

from dataclasses import dataclass

from eft_fast.engine.block_manager import BlockManager, BlockTable
from eft_fast.engine.config import EngineConfig
from eft_fast.engine.request import Request, RequestStatus
from eft_fast.engine.sampling_params import SamplingParams
from eft_fast.engine.scheduler import Scheduler


@dataclass
class FakeRunner:
    blocks: BlockManager
    max_model_len: int = 1024

    @property
    def block_size(self):
        return self.blocks.block_size


def _scheduler(num_blocks=64, models=2, **config):
    """Admission and preemption alone: the prompts here repeat, so the prefix cache is off
    (tests/test_prefix_cache.py covers it), and whole prompts are prefilled unless a test
    turns chunked prefill on."""
    runners = [FakeRunner(BlockManager(num_blocks, 4)) for _ in range(models)]
    config = {"enable_prefix_caching": False, "enable_chunked_prefill": False, **config}
    return Scheduler(runners, EngineConfig(block_size=4, **config)), runners


def _request(i, prompt_len, models=2):
    return Request(i, [1] * prompt_len, SamplingParams(max_tokens=100), seed=i,
                   prompt_ids=[[1] * prompt_len for _ in range(models)], position_offset=prompt_len,
                   tables=[BlockTable() for _ in range(models)])


def _run_prefill(step):
    """What the runners do: every model caches the pending tokens, one token is sampled."""
    for r in step.requests:
        for t in r.tables:
            t.num_tokens = len(r.prompt_ids[0]) + len(r.output_ids)
        r.output_ids.append(7)


def test_fcfs_admission_respects_limits():
    sched, _ = _scheduler(max_num_seqs=3, max_num_batched_tokens=10)
    reqs = [_request(i, n) for i, n in enumerate((4, 5, 3, 2))]
    for r in reqs:
        sched.add(r)
    step = sched.schedule()
    assert step.kind == "prefill" and step.requests == reqs[:2]        # 4 + 5 <= 10, + 3 > 10
    _run_prefill(step)
    step = sched.schedule()
    assert step.kind == "prefill" and step.requests == reqs[2:3]       # max_num_seqs = 3
    _run_prefill(step)
    step = sched.schedule()
    assert step.kind == "decode" and step.requests == reqs[:3]
    assert all(r.status is RequestStatus.RUNNING for r in reqs[:3]) and reqs[3].status is RequestStatus.WAITING


def test_preemption_releases_blocks_and_requeues_first():
    sched, runners = _scheduler(num_blocks=6)
    a, b = _request(0, 8), _request(1, 8)       # 8 prompt tokens + 1 = 3 blocks each
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.requests == [a, b]
    _run_prefill(step)
    for _ in range(4):                          # 13 tokens each: 4 blocks, but the pool has 6
        a.output_ids.append(7)
        b.output_ids.append(7)
    step = sched.schedule()                     # a needs a 4th block: b (the newest) is preempted
    assert step.kind == "decode" and step.requests == [a]
    assert b.status is RequestStatus.WAITING and sched.waiting[0] is b and b.num_preemptions == 1
    assert all(t.blocks == [] and t.num_tokens == 0 for t in b.tables)
    assert sched.num_preemptions == 1
    sched.finish(a)
    step = sched.schedule()                     # b comes back first, to be recomputed
    assert step.kind == "prefill" and step.requests == [b]
    sched.finish(b)
    assert all(r.blocks.num_free_blocks == 6 for r in runners)


def test_lookahead_reserves_speculative_slots():
    sched, runners = _scheduler(num_blocks=64, speculative_k=8)
    r = _request(0, 5)
    sched.add(r)
    step = sched.schedule()
    assert step.requests == [r]
    assert all(len(t.blocks) == 4 for t in r.tables)    # 5 + 1 tokens + 8 lookahead -> 14 positions


def test_nothing_to_do():
    sched, _ = _scheduler()
    assert sched.schedule() is None and not sched.has_work()


def _run_chunks(step):
    """What the engine does with a chunked prefill step: each model caches its chunk; a
    request whose chunk ends its pending tokens samples one token."""
    for r, chunk in zip(step.requests, step.chunks):
        complete = all(c == r.num_tokens(m) - r.tables[m].num_tokens for m, c in enumerate(chunk))
        for m, c in enumerate(chunk):
            r.tables[m].num_tokens += c
        if complete:
            r.output_ids.append(7)


def test_chunked_prefill_shares_steps_with_decode_tokens():
    sched, _ = _scheduler(max_num_batched_tokens=8, enable_chunked_prefill=True)
    short, long = _request(0, 3), _request(1, 21)
    sched.add(short)
    step = sched.schedule()
    assert step.kind == "prefill" and step.chunks == [[3, 3]]
    _run_chunks(step)
    sched.add(long)
    seen = []
    for _ in range(10):
        step = sched.schedule()
        if step.kind == "decode":
            break
        assert step.requests[0] is short and step.chunks[0] == [1, 1]       # decode tokens first
        assert sum(max(c) for c in step.chunks) <= 8
        seen.append(step.chunks[1])
        _run_chunks(step)
    assert seen == [[7, 7], [7, 7], [7, 7]]                                  # 21 = 7 + 7 + 7, one budget each
    assert long.output_ids == [7] and long.is_decoding and step.requests == [short, long]


def test_chunks_end_every_model_in_the_same_step():
    sched, _ = _scheduler(max_num_batched_tokens=5, enable_chunked_prefill=True)
    r = Request(0, [1], SamplingParams(max_tokens=4), seed=0, prompt_ids=[[1] * 4, [2] * 11], position_offset=4,
                tables=[BlockTable(), BlockTable()])
    sched.add(r)
    chunks = []
    while not r.output_ids:
        step = sched.schedule()
        chunks.append(step.chunks[0])
        _run_chunks(step)
    assert chunks == [[3, 5], [0, 5], [1, 1]]         # the short model keeps its last token for the last step
