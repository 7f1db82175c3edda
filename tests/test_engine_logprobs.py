"""Log-probabilities the engine returns: the top alternatives of each generated token and the
prompt's scores (SamplingParams.logprobs / prompt_logprobs), against the fp64 reference over
HF's own forward of the whole sequence."""
from __future__ import annotations

import pytest
import torch

import eft_fast
import tiny_hf
from eft_fast.reference import eft_sample_reference
from engine_helpers import VOCAB, tiny_engine


def reference_row_logprobs(family, ids: list[int], weight_top_p: float = 1.0) -> torch.Tensor:
    """[len(ids), V] fp64: log softmax of the untempered EFT scores after each prefix of ``ids``
    (HF forward of every model over the whole sequence, then the fp64 reference)."""
    knowledge, (tuned,), reference = family
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = [m(input_ids=x).logits[0].double() for m in (knowledge, tuned, reference)]
    n = len(ids)
    out = eft_sample_reference(
        logits[0], logits[1][None], logits[2][None], torch.zeros(n, dtype=torch.int64),
        torch.arange(n), torch.ones(n, 1, dtype=torch.float64), torch.ones(n, dtype=torch.float64),
        torch.full((n,), weight_top_p, dtype=torch.float64), torch.zeros(n, dtype=torch.int64),
        torch.ones(n, dtype=torch.float64), VOCAB)
    return out.row_logprobs


def check_top(top, row: torch.Tensor, n: int) -> None:
    assert len(top) == n
    want = row.topk(n)
    assert [t for t, _ in top] == want.indices.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in top], dtype=torch.float64), want.values,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("weight_top_p", [1.0, 0.7])
def test_prompt_logprobs_match_the_fp64_reference(family, rng, weight_top_p):
    engine = tiny_engine(family)
    prompt = torch.randint(0, VOCAB, (11,), generator=rng).tolist()
    params = eft_fast.SamplingParams(max_tokens=2, seed=3, prompt_logprobs=4, weight_top_p=weight_top_p)
    out, = engine.generate([prompt], params)
    rows = reference_row_logprobs(family, prompt, weight_top_p)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, (logprob, top) in enumerate(out.prompt_logprobs[1:]):
        assert logprob == pytest.approx(float(rows[i, prompt[i + 1]]), abs=1e-5)
        check_top(top, rows[i], 4)


@pytest.mark.parametrize("speculative_k,accept", [(0, "exact"), (3, "exact"), (3, "rejection")])
def test_generated_top_logprobs_match_the_fp64_reference(family, rng, speculative_k, accept):
    _check_generated_logprobs(family, rng, speculative_k, accept)


def test_rejection_reports_the_log_prob_of_the_draft_it_accepted(family):
    """Rejection acceptance can accept a draft other than its verify row's own sample: the
    reported log-prob is the accepted draft's (inputs where that happens, found by seed)."""
    _check_generated_logprobs(family, torch.Generator().manual_seed(3665592826905066253), 3, "rejection")


def _check_generated_logprobs(family, rng, speculative_k, accept):
    engine = tiny_engine(family, speculative_k=speculative_k, accept=accept)
    prompts = [torch.randint(0, VOCAB, (n,), generator=rng).tolist() for n in (3, 8)]
    params = eft_fast.SamplingParams(max_tokens=7, seed=5, logprobs=3, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params)):
        assert len(out.top_logprobs) == len(out.token_ids) == 7
        rows = reference_row_logprobs(family, prompt + out.token_ids)[len(prompt) - 1:]
        for i, (token, logprob, top) in enumerate(zip(out.token_ids, out.logprobs, out.top_logprobs)):
            check_top(top, rows[i], 3)
            assert logprob == pytest.approx(float(rows[i, token]), abs=1e-5)


def test_logprobs_off_by_default_and_zero_gives_no_alternatives(family):
    engine = tiny_engine(family)
    off, zero = engine.generate([[1, 2, 3]] * 2, [eft_fast.SamplingParams(max_tokens=3, seed=1),
                                                  eft_fast.SamplingParams(max_tokens=3, seed=1, logprobs=0)])
    assert off.top_logprobs == [] and off.prompt_logprobs is None
    assert zero.top_logprobs == [[]] * 3
    assert zero.token_ids == off.token_ids and zero.logprobs == off.logprobs


def test_stream_deltas_carry_top_and_prompt_logprobs(family):
    engine = tiny_engine(family, speculative_k=2)
    params = eft_fast.SamplingParams(max_tokens=6, seed=2, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    deltas = list(engine.stream([[4, 5, 6, 7]], params))
    whole, = tiny_engine(family).generate([[4, 5, 6, 7]], params)
    assert deltas[0].prompt_logprobs == whole.prompt_logprobs
    assert all(d.prompt_logprobs is None for d in deltas[1:])
    assert [t for d in deltas for t in d.top_logprobs] == whole.top_logprobs


def test_prompt_logprobs_of_a_one_token_prompt(family):
    out, = tiny_engine(family).generate([[9]], eft_fast.SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert out.prompt_logprobs == [None]


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value,error", [(-1, ValueError), (21, ValueError), (1.5, TypeError), (True, TypeError)])
def test_logprobs_bounds(field, value, error):
    with pytest.raises(error, match=field):
        eft_fast.SamplingParams(**{field: value})


def test_prompt_logprobs_need_one_prompt_for_every_model():
    tok = tiny_hf.byte_level_bpe()
    models = [tiny_hf.tiny_llama(len(tok), seed=s) for s in range(3)]
    engine = eft_fast.EFTEngine(*models, tokenizer=tok, backend="torch",
                                prompt_format={"knowledge": "plain", "tuned": "Q: {prompt}", "reference": "plain"})
    with pytest.raises(ValueError, match="prompt_logprobs"):
        engine.add_request("hi", eft_fast.SamplingParams(prompt_logprobs=1))
    out, = engine.generate([[5, 6, 7]], eft_fast.SamplingParams(max_tokens=1, prompt_logprobs=1))  # ids: one prompt
    assert len(out.prompt_logprobs) == 3
