"""Tensor-parallel knowledge model (CPU, gloo, 2 processes): sharded logits equal the
single-process model's, the engine's tokens equal tensor_parallel_size=1, bad configurations
are refused before anything loads, and no worker process outlives its engine."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from eft_fast import EFTEngine
from eft_fast.engine.model_runner import SequenceStep
from eft_fast.engine.block_manager import BlockTable
from eft_fast.engine.parallel.group import TensorParallelError, TensorParallelGroup
import tp_common
from tiny_models import dense_logits, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tokenizer():
    return tp_common.tokenizer()


@pytest.fixture(scope="module")
def small(tokenizer):
    return tp_common.small_models(tokenizer)


@pytest.fixture(scope="module")
def knowledge_dir(tmp_path_factory, tokenizer):
    return tp_common.save_knowledge(tmp_path_factory.mktemp("knowledge"), tokenizer)


def _live_workers() -> list:
    return [p for p in multiprocessing.active_children() if p.name.startswith("eft_fast-tp-worker")]


@pytest.fixture(autouse=True)
def no_worker_left():
    yield
    deadline = time.monotonic() + 15
    while _live_workers() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _live_workers()
    for p in left:
        p.kill()
    assert not left, f"worker processes left behind: {left}"


def _engine(knowledge_dir, tokenizer, small, tp, **kw):
    tuned, reference = small
    kw.setdefault("tuned", tuned[0])
    return EFTEngine(knowledge=knowledge_dir, reference=reference, tokenizer=tokenizer, block_size=4,
                     backend="torch", tensor_parallel_size=tp, distributed_timeout_s=TIMEOUT_S, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_sharded_logits_equal_single_process_logits(tmp_path, tokenizer, small, arch):
    model = tiny_model(arch, len(tokenizer), torch.float32, seed=5)
    model.save_pretrained(tmp_path)
    ids = list(range(3, 14))
    expected = dense_logits(model, ids)
    with _engine(str(tmp_path), tokenizer, small, tp=2) as engine:
        runner = engine.runners[engine.roles.knowledge]
        assert runner.kv_cache.shape.num_kv_heads == model.config.num_key_value_heads // 2
        table = BlockTable()
        assert runner.blocks.ensure(table, len(ids))
        prefill = runner.forward([SequenceStep(table, ids[:-3])], all_logits=True)
        decode = [runner.forward([SequenceStep(table, [t])]) for t in ids[-3:]]
    got = torch.cat([prefill] + decode)
    assert (got - expected).abs().max() <= 1e-5


def test_engine_tokens_equal_one_rank_with_reward_interpolation(knowledge_dir, tokenizer, small):
    tuned, _ = small
    prompts, params = tp_common.requests(len(tokenizer), 5, weights=True)
    one = _engine(knowledge_dir, tokenizer, small, tp=1, tuned=tuned).generate(prompts, params)
    with _engine(knowledge_dir, tokenizer, small, tp=2, tuned=tuned) as engine:
        two = engine.generate(prompts, params)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert all(o.finish_reason == "length" for o in two)


def test_engine_tokens_equal_one_rank_speculative_and_preempted(knowledge_dir, tokenizer, small):
    prompts, params = tp_common.requests(len(tokenizer), 4, max_tokens=8)
    plain = _engine(knowledge_dir, tokenizer, small, tp=1).generate(prompts, params)
    with _engine(knowledge_dir, tokenizer, small, tp=2, speculative_k=3, num_blocks=10) as engine:
        two = engine.generate(prompts, params)
        assert engine.stats()["num_preemptions"] > 0
        assert engine.stats()["kv_blocks_total"]["knowledge"] == 10
    assert [o.token_ids for o in two] == [o.token_ids for o in plain]


def test_a_killed_worker_is_a_clear_error(knowledge_dir, tokenizer, small):
    prompts, params = tp_common.requests(len(tokenizer), 2, max_tokens=4)
    engine = _engine(knowledge_dir, tokenizer, small, tp=2)
    engine._tp_group.workers[0].kill()
    engine._tp_group.workers[0].join()
    with pytest.raises(TensorParallelError, match="worker"):
        engine.generate(prompts, params)
    with pytest.raises(TensorParallelError):
        engine.generate(prompts, params)
    engine.close()


def test_a_worker_whose_forward_raises_is_restarted_and_the_engine_goes_on(knowledge_dir, tokenizer, small, tmp_path,
                                                                          monkeypatch):
    """Self-spawned: rank 1's third forward raises (once). The requests of that step end with
    an error naming the rank and the error; the engine spawns new workers, reloads the shards,
    recomputes the requests that waited, and later requests give the one-rank tokens."""
    prompts, params = tp_common.requests(len(tokenizer), 4, max_tokens=6)
    expected = [o.token_ids for o in _engine(knowledge_dir, tokenizer, small, tp=1).generate(prompts, params)]
    monkeypatch.setenv("EFT_TEST_TP_FAIL_MARKER", str(tmp_path / "failed-once"))
    monkeypatch.setattr(TensorParallelGroup, "worker_entry", staticmethod(lambda: tp_common.failing_spawned_worker))
    with _engine(knowledge_dir, tokenizer, small, tp=2, max_num_seqs=2) as engine:
        first_workers = list(engine._tp_group.workers)
        outs = engine.generate(prompts, params)
        failed = [i for i, o in enumerate(outs) if o.finish_reason == "error"]
        assert failed == [0, 1], [(o.finish_reason, o.error) for o in outs]
        assert all("tensor-parallel rank 1 failed: RuntimeError: injected worker failure" in outs[i].error
                   for i in failed)
        assert [outs[i].token_ids for i in (2, 3)] == expected[2:]     # waited, then ran on the new workers
        assert engine._tp_group.restarts == 1 and not any(w.is_alive() for w in first_workers)
        assert [o.token_ids for o in engine.generate(prompts, params)] == expected
        assert engine.stats()["num_requests_running"] == 0


def test_a_worker_that_keeps_failing_stops_the_engine_after_the_restart_limit(knowledge_dir, tokenizer, small,
                                                                               monkeypatch):
    from eft_fast.engine.parallel.group import MAX_RESTARTS

    prompts, params = tp_common.requests(len(tokenizer), 4, max_tokens=6)
    monkeypatch.delenv("EFT_TEST_TP_FAIL_MARKER", raising=False)
    monkeypatch.setattr(TensorParallelGroup, "worker_entry", staticmethod(lambda: tp_common.failing_spawned_worker))
    engine = _engine(knowledge_dir, tokenizer, small, tp=2, max_num_seqs=2)
    try:
        with pytest.raises(TensorParallelError, match="injected worker failure"):
            for _ in range(2 * MAX_RESTARTS + 2):
                engine.generate(prompts, params)
        assert engine._tp_group.restarts == MAX_RESTARTS and engine._tp_group.closed
    finally:
        engine.close()


def test_dropped_frames_free_what_a_failed_forward_held():
    """The restart frees the old shard only if the failed forward's frames let go of it."""
    import weakref

    from eft_fast.engine.engine import _drop_frames

    class Big:
        pass

    refs = []

    def forward(held):
        refs.append(weakref.ref(held))
        raise RuntimeError("boom")

    def step():
        big = Big()
        try:
            forward(big)
        except RuntimeError as e:
            del big
            raise TensorParallelError("failed") from e

    try:
        step()
    except TensorParallelError as exc:
        assert refs[0]() is not None          # the failed forward's frame still holds it
        _drop_frames(exc)
        assert refs[0]() is None


def test_more_ranks_than_visible_gpus(knowledge_dir, monkeypatch):
    from eft_fast.engine.parallel import check_tensor_parallel

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 needs 2 GPUs, but 1 are visible"):
        check_tensor_parallel(2, knowledge_dir, device=torch.device("cuda"), other_specs=[])


def test_bad_configurations_are_refused_before_loading(tmp_path, knowledge_dir, tokenizer, small):
    tuned, reference = small
    with pytest.raises(ValueError, match=r"4 attention heads, not divisible by tensor_parallel_size=3"):
        _engine(knowledge_dir, tokenizer, small, tp=3)
    with pytest.raises(ValueError, match="path or hub id"):
        EFTEngine(knowledge=tuned[1], tuned=tuned[0], reference=reference, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="shards the knowledge model, but none was given"):
        EFTEngine(tuned=tuned[0], reference=reference, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        _engine(knowledge_dir, tokenizer, small, tp=0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        _engine(str(tmp_path), tokenizer, small, tp=2)
    with pytest.raises(ValueError, match="also a tuned or reference model"):
        EFTEngine(knowledge=knowledge_dir, tuned=knowledge_dir, reference=reference, tensor_parallel_size=2)
    assert not _live_workers()


# ---- the external launcher (torchrun): every rank runs tests/tp_launched.py ----------------

LAUNCHED = Path(__file__).with_name("tp_launched.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*torchrun_args, knowledge_dir, out, extra=()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, str(LAUNCHED), knowledge_dir, str(out),
           *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(LAUNCHED.parent), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _wait_all(procs: list[subprocess.Popen], timeout_s: float = 150) -> list[tuple[int, str]]:
    """Wait for every launch (return code, output); on a timeout kill every process group they started."""
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.mark.parametrize("nodes", [1, 2])
def test_external_launcher(knowledge_dir, tokenizer, small, tmp_path, nodes):
    prompts, params = tp_common.requests(len(tokenizer))
    expected = [o.token_ids for o in _engine(knowledge_dir, tokenizer, small, tp=1).generate(prompts, params)]
    out = tmp_path / "tokens.json"
    if nodes == 1:
        procs = [_launch("--standalone", "--nproc-per-node", "2", knowledge_dir=knowledge_dir, out=out)]
    else:   # two launches, one rank each, meeting at 127.0.0.1 as two nodes would
        port = str(_free_port())
        procs = [_launch("--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr",
                         "127.0.0.1", "--master-port", port, knowledge_dir=knowledge_dir, out=out) for r in (0, 1)]
    for code, output in _wait_all(procs):
        assert code == 0, output[-3000:]
    assert json.loads(out.read_text()) == expected


def test_a_worker_whose_forward_raises_ends_the_group_with_a_clear_error(knowledge_dir, tmp_path):
    """Rank 1's third forward raises: it reports and exits, and rank 0 gets TensorParallelError
    well before the collective timeout (60 s); both ranks' programs end. (Rank 0's torchrun
    agent then waits in torchrun's own exit barrier for the failed node, so the test ends it.)"""
    import psutil

    out = tmp_path / "result.json"
    port = str(_free_port())
    start = time.monotonic()
    node0, node1 = [_launch("--nnodes", "2", "--node-rank", str(r), "--nproc-per-node", "1", "--master-addr",
                            "127.0.0.1", "--master-port", port, knowledge_dir=knowledge_dir, out=out, extra=["3"])
                    for r in (0, 1)]
    try:
        (code1, out1), = _wait_all([node1], timeout_s=120)
        assert code1 != 0 and "tensor-parallel rank 1 failed: RuntimeError: injected worker failure" in out1
        deadline = time.monotonic() + 60
        while (not out.exists() or psutil.Process(node0.pid).children(recursive=True)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not psutil.Process(node0.pid).children(recursive=True), "rank 0's program did not end"
        assert "the tensor-parallel group failed" in json.loads(out.read_text())["error"]
        assert time.monotonic() - start < 55
    finally:
        if node0.poll() is None:
            os.killpg(node0.pid, signal.SIGKILL)
        node0.communicate()


def test_refused_before_any_rank_starts(knowledge_dir, tokenizer, small):
    tuned, reference = small
    start = time.monotonic()
    with pytest.raises(ValueError, match="a model sampled alone is not sharded"):
        EFTEngine(knowledge=knowledge_dir, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="prompt_format has unknown roles"):
        _engine(knowledge_dir, tokenizer, small, tp=2, prompt_format={"bogus": "plain"})
    assert time.monotonic() - start < 10 and not _live_workers()


def test_a_user_error_while_building_stops_the_workers_at_once(knowledge_dir, tokenizer, small):
    """A bad tuned model is found after the ranks started (they wait to agree on the pool)."""
    start = time.monotonic()
    with pytest.raises(ValueError, match="tuned"):
        _engine(knowledge_dir, tokenizer, small, tp=2, tuned="/nonexistent/tuned-model")
    assert time.monotonic() - start < 30                  # not the collective timeout (60 s)


def test_an_interrupt_mid_forward_closes_the_group_at_once(knowledge_dir, tokenizer, small, monkeypatch):
    from eft_fast.engine.model_runner import ModelRunner

    prompts, params = tp_common.requests(len(tokenizer), 2, max_tokens=4)
    engine = _engine(knowledge_dir, tokenizer, small, tp=2)
    runner = engine.runners[engine.roles.knowledge]
    run_model, calls = ModelRunner.run_model, []

    def interrupted(self, *args, **kwargs):    # rank 0's second knowledge forward, after its broadcast
        if self is runner:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return run_model(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "run_model", interrupted)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        engine.generate(prompts, params)
    assert runner.group.closed and time.monotonic() - start < 30
    with pytest.raises(TensorParallelError):
        engine.generate(prompts, params)
