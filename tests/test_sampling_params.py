"""SamplingParams validation and the request output types."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from eft_fast.engine.outputs import RequestMetrics, RequestOutput, StreamDelta
from eft_fast.engine.sampling_params import SamplingParams


def test_defaults_match_the_design():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.weight_top_p) == (128, 1.0, 0, 1.0, 1.0)
    assert p.reward_weights is None and p.seed is None and p.ignore_eos is False
    assert p.stop == () and p.stop_token_ids == ()
    assert [f.name for f in dataclasses.fields(SamplingParams)] == [
        "max_tokens", "temperature", "top_k", "top_p", "weight_top_p", "reward_weights", "seed", "stop",
        "stop_token_ids", "ignore_eos", "logprobs", "prompt_logprobs"]
    assert p.logprobs is None and p.prompt_logprobs is None


def test_normalisation():
    p = SamplingParams(max_tokens=np.int64(5), temperature=0, top_p=np.float32(0.5), reward_weights=[0.25, 0.75],
                       seed=2**63 - 1, stop="###", stop_token_ids=[7, np.int32(9)])
    assert p.max_tokens == 5 and type(p.max_tokens) is int
    assert p.temperature == 0.0 and type(p.temperature) is float
    assert p.top_p == 0.5 and type(p.top_p) is float
    assert p.reward_weights == (0.25, 0.75)
    assert p.stop == ("###",) and p.stop_token_ids == (7, 9)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    assert SamplingParams(reward_weights=(1.5, -0.5)).reward_weights == (1.5, -0.5)  # extrapolation is allowed


def test_frozen_and_replace_checks_again():
    p = SamplingParams(seed=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.seed = 4
    assert dataclasses.replace(p, seed=4).seed == 4
    with pytest.raises(ValueError, match="seed"):
        dataclasses.replace(p, seed=-1)
    assert hash(SamplingParams(stop=["x"])) == hash(SamplingParams(stop=("x",)))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1"),
    (dict(max_tokens=True), TypeError, "max_tokens must be an int, got bool"),
    (dict(max_tokens=10.0), TypeError, "max_tokens must be an int, got float"),
    (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(temperature=math.nan), ValueError, "temperature must be finite"),
    (dict(temperature=math.inf), ValueError, "temperature must be finite"),
    (dict(temperature="1"), TypeError, "temperature must be a float, got str"),
    (dict(temperature=False), TypeError, "temperature must be a float, got bool"),
    (dict(top_k=-1), ValueError, "top_k must be >= 0"),
    (dict(top_k=1.5), TypeError, "top_k must be an int"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.01), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=math.nan), ValueError, "top_p must be finite"),
    (dict(weight_top_p=0), ValueError, r"weight_top_p must be in \(0, 1\]"),
    (dict(weight_top_p=-math.inf), ValueError, "weight_top_p must be finite"),
    (dict(reward_weights=[]), ValueError, "reward_weights must hold one float per tuned model"),
    (dict(reward_weights=0.5), TypeError, "reward_weights must be a list"),
    (dict(reward_weights="0.5"), TypeError, "reward_weights must be a list"),
    (dict(reward_weights=[1.0, math.nan]), ValueError, r"reward_weights\[1\] must be finite"),
    (dict(reward_weights=[1.0, True]), TypeError, r"reward_weights\[1\] must be a float, got bool"),
    (dict(seed=-1), ValueError, "seed must be >= 0"),
    (dict(seed=2**63), ValueError, r"seed must be < 2\*\*63"),
    (dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(seed=True), TypeError, "seed must be an int, got bool"),
    (dict(stop=""), ValueError, r"stop\[0\] is an empty string"),
    (dict(stop=["a", ""]), ValueError, r"stop\[1\] is an empty string"),
    (dict(stop=["a", 3]), TypeError, r"stop\[1\] must be a str"),
    (dict(stop=3), TypeError, "stop must be a list"),
    (dict(stop_token_ids=[-1]), ValueError, r"stop_token_ids\[0\] must be >= 0"),
    (dict(stop_token_ids=[False]), TypeError, r"stop_token_ids\[0\] must be an int, got bool"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids must be a list"),
    (dict(ignore_eos=1), TypeError, "ignore_eos must be a bool"),
])
def test_invalid(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_metrics():
    m = RequestMetrics(prompt_tokens={"knowledge": 5, "tuned": 12}, generated_tokens=8)
    assert m.acceptance_rate is None and m.mean_accepted_per_round is None
    m.proposed_tokens, m.accepted_tokens, m.rounds = 12, 9, 3
    assert m.acceptance_rate == 0.75 and m.mean_accepted_per_round == 3.0


def test_outputs():
    out = RequestOutput(request_id="0", prompt="hi")
    assert out.token_ids == [] and out.text == "" and out.logprobs == [] and not out.finished
    assert isinstance(out.metrics, RequestMetrics) and out.metrics is not RequestOutput("1", "x").metrics
    assert RequestOutput("0", [1, 2], [3], "a", [-0.5], "eos").finished
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        RequestOutput("0", "hi", finish_reason="done")
    delta = StreamDelta("0", [3, 4], "ab", finished=True, finish_reason="length")
    assert delta.logprobs == []
    with pytest.raises(ValueError, match="finished=True"):
        StreamDelta("0", [3], "a", finish_reason="stop")
    with pytest.raises(ValueError, match="finish_reason must be one of"):
        StreamDelta("0", [3], "a", finished=True, finish_reason="aborted")


def test_temperatures_below_the_greedy_threshold_are_stored_as_greedy():
    """One normalisation for the fused op and the speculative acceptance math alike."""
    from eft_fast._validation import GREEDY_TEMPERATURE

    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).temperature == 0.0
    assert SamplingParams(temperature=GREEDY_TEMPERATURE).temperature == GREEDY_TEMPERATURE
    assert SamplingParams(temperature=0.7).temperature == 0.7
