"""Guarantees that adversarial inputs once broke: a request's bad parameter fails only that
request, speculation never changes a request's outcome on a tight KV pool, rejection-mode
speculation is batch-invariant, prompt types are checked, and an engine whose backend cannot
run on its models' device is refused up front."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from eft_fast import EFTEngine, SamplingParams
from engine_helpers import random_requests, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")
MIXED = ({"temperature": 1.0}, {"temperature": 0.8, "weight_top_p": 0.9}, {"temperature": 0.0},
         {"temperature": 1.0, "top_k": 10, "top_p": 0.9})


def _unchecked(params: SamplingParams, **values) -> SamplingParams:
    """A copy of ``params`` holding values its checks would refuse (as a bug elsewhere could)."""
    out = dataclasses.replace(params)
    for name, value in values.items():
        object.__setattr__(out, name, value)
    return out


# ---- 5: one request's parameter never fails its batch mates --------------------------------

@pytest.mark.parametrize("kwargs", [dict(temperature=1e39), dict(reward_weights=[1e39]), dict(top_k=2**64),
                                    dict(top_p=1e-50), dict(weight_top_p=1e-46)])
def test_params_the_kernel_would_reject_are_refused_when_added(family, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("speculative_k, accept", [(0, "exact"), (2, "exact"), (2, "rejection")])
@pytest.mark.parametrize("bad", [dict(temperature=float("nan")), dict(top_p=0.0), dict(top_k=2**64),
                                 dict(reward_weights=(float("inf"),))])
@pytest.mark.parametrize("from_step", [0, 1])     # 0: the prefill samples it; 1: decode rounds do
def test_a_row_the_op_rejects_fails_only_its_request(family, rng, speculative_k, accept, bad, from_step):
    prompts, params = random_requests(rng, 3, 6, MIXED)
    clean = tiny_engine(family, speculative_k=speculative_k, accept=accept).generate(prompts, params)
    engine = tiny_engine(family, speculative_k=speculative_k, accept=accept)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    for _ in range(from_step):
        engine.step()
    request = engine._requests[ids[1]]
    request.params = _unchecked(request.params, **bad)
    while engine.has_unfinished():
        engine.step()
    outs = [engine.output(i, pop=True) for i in ids]
    assert outs[1].finish_reason == "error" and outs[1].error.startswith("sampling failed:")
    assert next(iter(bad)) in outs[1].error
    assert len(outs[1].token_ids) == from_step
    for i in (0, 2):
        assert outs[i].finish_reason == "length" and outs[i].token_ids == clean[i].token_ids


# ---- 6: exact speculation on a tight KV pool ----------------------------------------------

@pytest.mark.parametrize("accept", ["exact", "rejection"])
def test_speculation_never_changes_the_outcome_on_a_tight_pool(family, accept):
    prompt, params = [[5, 6, 7, 8]], SamplingParams(max_tokens=20, seed=7, ignore_eos=True, temperature=0.0)
    outs = {k: tiny_engine(family, num_blocks=6, speculative_k=k, accept=accept).generate(prompt, params)[0]
            for k in (0, 1, 2, 5)}
    for k, out in outs.items():
        assert out.finish_reason == "length" and out.error is None, (k, out.error)
        assert out.token_ids == outs[0].token_ids, k


def test_exact_speculation_with_preemption_on_a_tight_pool(family, rng):
    prompts, params = random_requests(rng, 6, 14, MIXED)
    plain = tiny_engine(family, num_blocks=12).generate(prompts, params)
    for k in (2, 5):
        engine = tiny_engine(family, num_blocks=12, speculative_k=k)
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == [o.token_ids for o in plain], k
        assert [o.finish_reason for o in outs] == [o.finish_reason for o in plain], k


# ---- rejection-mode speculation is batch-invariant ----------------------------------------

def test_rejection_speculation_is_batch_invariant(family, rng):
    prompts, params = random_requests(rng, 24, 12, MIXED)
    params = [dataclasses.replace(p, max_tokens=4 + i % 9) for i, p in enumerate(params)]   # budgets differ
    alone = [o.token_ids for o in tiny_engine(family, speculative_k=3, accept="rejection", max_num_seqs=1)
             .generate(prompts, params)]
    together = [o.token_ids for o in tiny_engine(family, speculative_k=3, accept="rejection", max_num_seqs=64)
                .generate(prompts, params)]
    assert together == alone


# ---- 9: prompt types ---------------------------------------------------------------------

def test_prompt_types(family):
    engine = tiny_engine(family)
    params = SamplingParams(max_tokens=2, seed=1)
    ids = [3, 4, 5]
    expected = engine.generate([ids], params)[0].token_ids
    assert engine.generate((p for p in [ids]), params)[0].token_ids == expected   # a generator of prompts
    assert engine.generate([tuple(ids)], params)[0].token_ids == expected
    assert engine.generate([torch.tensor(ids)], params)[0].token_ids == expected
    with pytest.raises(TypeError, match="bytes"):
        engine.add_request(b"hello", params)
    with pytest.raises(TypeError, match="NoneType"):
        engine.add_request(None, params)
    with pytest.raises(TypeError, match=r"prompts\[1\].*int"):
        engine.generate([ids, 7], params)
    with pytest.raises(TypeError, match="prompts must be"):
        engine.generate(None, params)
    with pytest.raises(TypeError, match="single prompt"):
        engine.generate(ids, params)
    assert not engine._requests and engine.stats()["num_requests_waiting"] == 0


def test_lone_surrogate_prompt(tmp_path):
    from tiny_hf import byte_level_bpe
    from tiny_models import tiny_model

    tokenizer = byte_level_bpe()
    model = tiny_model("llama", len(tokenizer))
    engine = EFTEngine(tuned=model, tokenizer=tokenizer, backend="torch")
    with pytest.raises(ValueError, match="not valid Unicode.*surrogate"):
        engine.add_request("abc\ud800", SamplingParams(max_tokens=1))


# ---- 11: a backend that cannot run on the models' device --------------------------------

def test_backend_device_mismatch_is_refused_up_front(family, monkeypatch):
    knowledge, tuned, reference = family
    with pytest.raises(ValueError, match="backend='cuda'.*cpu"):
        EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, backend="triton")
        with pytest.raises(ValueError, match="device='cuda'.*no CUDA GPU"):
            EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, device="cuda")
