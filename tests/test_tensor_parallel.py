"""Tensor-parallel knowledge model (CPU, gloo, 2 processes): sharded logits equal the
single-process model's, the engine's tokens equal tensor_parallel_size=1, bad configurations
are refused before anything loads, and no worker process outlives its engine."""
from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from eft_fast import EFTEngine, SamplingParams
from eft_fast.engine.model_runner import SequenceStep
from eft_fast.engine.block_manager import BlockTable
from eft_fast.engine.parallel.group import TensorParallelError
from tiny_hf import byte_level_bpe
from tiny_models import dense_logits, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_bpe()


@pytest.fixture(scope="module")
def small(tokenizer):
    """Two tuned models and a reference, in memory (they stay on rank 0)."""
    v = len(tokenizer)
    return [tiny_model("llama", v, torch.float32, seed=20 + i) for i in range(2)], \
        tiny_model("llama", v, torch.float32, seed=30)


@pytest.fixture(scope="module")
def knowledge_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("knowledge")
    tiny_model("llama", len(tokenizer), torch.float32, seed=11, num_hidden_layers=3, hidden_size=96,
               intermediate_size=128).save_pretrained(path)
    return str(path)


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


def _requests(rng, n, vocab, max_tokens, weights=False):
    prompts = [torch.randint(0, vocab, (int(m),), generator=rng).tolist()
               for m in torch.randint(1, 9, (n,), generator=rng)]
    params = []
    for i in range(n):
        w = None
        if weights:
            a = float(torch.rand((), generator=rng))
            w = (a, 1.0 - a)
        params.append(SamplingParams(max_tokens=max_tokens, seed=1000 + i, ignore_eos=True, temperature=1.0,
                                     weight_top_p=0.9, reward_weights=w))
    return prompts, params


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


def test_engine_tokens_equal_one_rank_with_reward_interpolation(knowledge_dir, tokenizer, small, rng):
    tuned, _ = small
    prompts, params = _requests(rng, 5, len(tokenizer), 6, weights=True)
    one = _engine(knowledge_dir, tokenizer, small, tp=1, tuned=tuned).generate(prompts, params)
    with _engine(knowledge_dir, tokenizer, small, tp=2, tuned=tuned) as engine:
        two = engine.generate(prompts, params)
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    assert all(o.finish_reason == "length" for o in two)


def test_engine_tokens_equal_one_rank_speculative_and_preempted(knowledge_dir, tokenizer, small, rng):
    prompts, params = _requests(rng, 4, len(tokenizer), 8)
    plain = _engine(knowledge_dir, tokenizer, small, tp=1).generate(prompts, params)
    with _engine(knowledge_dir, tokenizer, small, tp=2, speculative_k=3, num_blocks=10) as engine:
        two = engine.generate(prompts, params)
        assert engine.stats()["num_preemptions"] > 0
        assert engine.stats()["kv_blocks_total"]["knowledge"] == 10
    assert [o.token_ids for o in two] == [o.token_ids for o in plain]


def test_a_killed_worker_is_a_clear_error(knowledge_dir, tokenizer, small, rng):
    prompts, params = _requests(rng, 2, len(tokenizer), 4)
    engine = _engine(knowledge_dir, tokenizer, small, tp=2)
    engine._tp_group.workers[0].kill()
    engine._tp_group.workers[0].join()
    with pytest.raises(TensorParallelError, match="worker"):
        engine.generate(prompts, params)
    with pytest.raises(TensorParallelError):
        engine.generate(prompts, params)
    engine.close()


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
