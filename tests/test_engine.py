"""EFTEngine: outputs equal the naive fp64 loop; batch / preemption invariance; reward
interpolation; stops and streaming; bad input (docs/DESIGN.md sections 5 and 8)."""
from __future__ import annotations

import pytest
import torch

import eft_fast
from eft_fast import EFTEngine, SamplingParams
from engine_helpers import VOCAB, reference_generate, tiny_family
from tiny_hf import byte_level_bpe
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=20),
         dict(temperature=1.0, weight_top_p=0.9), dict(temperature=0.9, top_p=0.8),
         dict(temperature=0.0, weight_top_p=0.5), dict(temperature=1.2, top_k=5, top_p=0.9), dict(temperature=0.5)]


def _prompts(rng, n, lo=1, hi=12):
    lengths = torch.randint(lo, hi, (n,), generator=rng).tolist()
    return [torch.randint(0, VOCAB, (length,), generator=rng).tolist() for length in lengths]


def _params(rng, n, max_tokens):
    seeds = torch.randint(0, 2**62, (n,), generator=rng).tolist()
    return [SamplingParams(max_tokens=max_tokens, seed=s, ignore_eos=True, **MIXED[i % len(MIXED)])
            for i, s in enumerate(seeds)]


@pytest.fixture(scope="module")
def family():
    return tiny_family()


def _engine(family, **kw):
    knowledge, tuned, reference = family
    kw.setdefault("backend", "torch")
    return EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4, **kw)


def test_engine_equals_naive_fp64_loop(family, rng):
    prompts, params = _prompts(rng, 8), _params(rng, 8, 32)
    outputs = _engine(family, max_num_seqs=8).generate(prompts, params)
    knowledge, tuned, reference = family
    for prompt, p, out in zip(prompts, params, outputs):
        assert out.token_ids == reference_generate(knowledge, tuned, reference, prompt, p)
        assert out.finish_reason == "length" and len(out.logprobs) == 32
        assert all(lp <= 0 for lp in out.logprobs)
        assert out.metrics.generated_tokens == 32 and out.metrics.prompt_tokens["tuned"] == len(prompt)


def test_cpu_backend_engine_matches_reference_backend(family, rng):
    prompts, params = _prompts(rng, 4), _params(rng, 4, 12)
    fast = _engine(family, backend="cpu").generate(prompts, params)
    exact = _engine(family, backend="torch").generate(prompts, params)
    # fp32 vs fp64 sampling may only differ at float near-ties, which random tiny models make rare
    same = sum(a.token_ids == b.token_ids for a, b in zip(fast, exact))
    assert same >= 3


def test_request_output_independent_of_batch_and_preemption(family, rng):
    prompts, params = _prompts(rng, 32, 2, 20), _params(rng, 32, 24)
    target = 5
    alone = _engine(family).generate([prompts[target]], params[target])[0].token_ids
    batched = _engine(family, max_num_seqs=32).generate(prompts, params)
    assert batched[target].token_ids == alone
    # 24 blocks of 4 tokens in each pool: far less than 32 requests need, so decode rounds preempt
    tight = _engine(family, max_num_seqs=32, num_blocks=24)
    squeezed = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in batched]
    for runner in tight.runners:   # every block came back
        assert runner.blocks.num_free_blocks == runner.blocks.num_blocks


def test_reward_interpolation_per_request_weights(rng):
    knowledge, tuned, reference = tiny_family(num_tuned=2)
    engine = EFTEngine(knowledge=knowledge, tuned=tuned, reference=reference, block_size=4, backend="torch")
    prompts = _prompts(rng, 3)
    weights = [(1.0, 0.0), (0.3, 0.7), (0.0, 1.0)]
    params = [SamplingParams(max_tokens=16, seed=7 + i, temperature=1.0, reward_weights=w, ignore_eos=True)
              for i, w in enumerate(weights)]
    together = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        assert engine.generate([prompt], p)[0].token_ids == out.token_ids
        assert out.token_ids == reference_generate(knowledge, tuned, reference, prompt, p)
    with pytest.raises(ValueError, match="reward_weights has 1 weights"):
        engine.add_request([1, 2], SamplingParams(reward_weights=[1.0]))


@pytest.mark.parametrize("mode", ["tuned alone", "knowledge alone", "small-scale policy"])
def test_single_model_modes_equal_naive_loop(family, mode, rng):
    knowledge, tuned, reference = family
    if mode == "tuned alone":
        engine, ref_args = EFTEngine(tuned=tuned[0], backend="torch"), (None, tuned, None)
    elif mode == "knowledge alone":
        engine, ref_args = EFTEngine(knowledge=knowledge, backend="torch"), (None, [knowledge], None)
    else:
        engine, ref_args = EFTEngine(tuned=tuned[0], reference=reference, backend="torch"), (None, tuned, reference)
    prompts, params = _prompts(rng, 3), _params(rng, 3, 10)
    params = [SamplingParams(max_tokens=10, seed=p.seed, ignore_eos=True,
                             reward_weights=[0.5] if mode == "small-scale policy" else None)
              for p in params]
    for prompt, p, out in zip(prompts, params, engine.generate(prompts, params)):
        assert out.token_ids == reference_generate(*ref_args, prompt, p)


# ---- text: stops, EOS, streaming -------------------------------------------------------------
@pytest.fixture(scope="module")
def text_engine_parts():
    tok = byte_level_bpe()
    vocab = len(tok)
    knowledge, tuned, reference = tiny_family(vocab=vocab)
    return tok, knowledge, tuned[0], reference


def _text_engine(parts, **kw):
    tok, knowledge, tuned, reference = parts
    return EFTEngine(knowledge=knowledge, tuned=tuned, reference=reference, tokenizer=tok, block_size=4, **kw)


def test_stop_strings_eos_and_max_tokens(text_engine_parts):
    tok = text_engine_parts[0]
    engine = _text_engine(text_engine_parts)
    free = engine.generate(["hello world"], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 40
    assert free.text == tok.decode(free.token_ids, skip_special_tokens=True)
    # a stop string from the middle of the free text: the text is cut before it
    stop = free.text[len(free.text) // 2: len(free.text) // 2 + 3]
    cut = free.text.find(stop)
    stopped = engine.generate(["hello world"], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop]))[0]
    assert stopped.finish_reason == "stop" and stopped.text == free.text[:cut]
    assert stopped.token_ids == free.token_ids[:len(stopped.token_ids)]
    # a stop token id: generation ends with it
    token = free.token_ids[6]
    by_id = engine.generate(["hello world"], SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[token]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[:free.token_ids.index(token) + 1]
    # EOS: make the 10th greedy token the model's EOS
    eos = free.token_ids[9]
    engine.models.eos_token_ids = frozenset({eos})
    ended = engine.generate(["hello world"], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert ended.finish_reason == "eos" and ended.token_ids == free.token_ids[:free.token_ids.index(eos) + 1]
    ignored = engine.generate(["hello world"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids


def test_streaming_yields_exactly_the_final_text(text_engine_parts):
    engine = _text_engine(text_engine_parts, max_num_seqs=4)
    prompts = ["hello world", "the quick brown fox", "café", "a"]
    params = [SamplingParams(max_tokens=30, seed=i, temperature=1.0, stop=[" th", "é"] if i % 2 else None)
              for i in range(4)]
    final = engine.generate(prompts, params)
    texts, ids, reasons = {}, {}, {}
    for delta in engine.stream(prompts, params):
        texts[delta.request_id] = texts.get(delta.request_id, "") + delta.text
        ids.setdefault(delta.request_id, []).extend(delta.token_ids)
        if delta.finished:
            reasons[delta.request_id] = delta.finish_reason
    assert len(texts) == 4
    for out, rid in zip(final, sorted(texts)):
        assert texts[rid] == out.text
        assert ids[rid] == out.token_ids
        assert reasons[rid] == out.finish_reason


# ---- bad input ---------------------------------------------------------------------------------
def test_bad_inputs_name_the_problem(family, tmp_path):
    knowledge, tuned, reference = family
    with pytest.raises(ValueError, match="knowledge"):
        EFTEngine(knowledge=str(tmp_path / "no-such-model"), tuned=tuned[0], reference=reference)
    with pytest.raises(ValueError, match="reference"):
        EFTEngine(knowledge=knowledge, tuned=tuned[0])
    with pytest.raises(ValueError, match="at least one model"):
        EFTEngine()
    wrong_vocab = tiny_model("llama", VOCAB + 5, torch.float64, seed=3)
    with pytest.raises(ValueError, match="vocabulary"):
        EFTEngine(knowledge=knowledge, tuned=wrong_vocab, reference=reference)
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=16))
    with pytest.raises(ValueError, match="softcapping"):
        EFTEngine(tuned=gemma2)
    engine = _engine(family)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], SamplingParams(temperature=-1.0))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate([[1, 2]], {"max_tokens": 3})
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        engine.generate([[1, 2]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate([[1, VOCAB + 3]], SamplingParams())


def test_prompt_longer_than_context_fails_only_that_request(family, rng):
    engine = _engine(family, max_model_len=16)
    prompts = [_prompts(rng, 1)[0][:5], list(range(20)), [3, 4, 5]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, seed=1))
    assert outs[1].finish_reason == "error" and "context holds 16" in outs[1].error and outs[1].token_ids == []
    assert [o.finish_reason for o in (outs[0], outs[2])] == ["length", "length"]
    # a request reaching the context limit finishes with "length"
    long = engine.generate([list(range(12))], SamplingParams(max_tokens=50, seed=1))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 16 - 12
