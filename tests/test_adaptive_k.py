"""speculative_k="auto": the draft-length controller's choices, and the engine's tokens (exact
acceptance: identical to plain decoding whatever lengths it picks)."""
from __future__ import annotations

import pytest

import eft_fast
from eft_fast.engine.adaptive_k import CANDIDATES, REMEASURE_EVERY, DraftLengthController, expected_tokens
from eft_fast.engine.config import EngineConfig
from engine_helpers import random_requests, tiny_engine


def test_expected_tokens():
    assert expected_tokens(0, 0.9) == 1.0
    assert expected_tokens(1, 0.5) == pytest.approx(1.5)
    assert expected_tokens(4, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125 + 0.0625)
    assert expected_tokens(3, 1.0) == 4.0
    assert expected_tokens(8, 0.0) == 1.0


def _run(controller, batch, cost_of, accepted_fraction=1.0, rounds=1, limit=None):
    """Let the controller choose ``rounds`` times; each round costs cost_of(k) seconds and
    every request accepts round(accepted_fraction * k) of its k drafts."""
    chosen = []
    for _ in range(rounds):
        k = controller.choose(batch, limit)
        a = round(accepted_fraction * k)
        controller.record(k, batch, cost_of(k), [k] * batch, [a] * batch)
        chosen.append(k)
    return chosen


def test_the_climb_measures_lengths_while_they_pay_then_keeps_the_fastest():
    # Every draft accepted and cheap drafts: each longer length pays, the climb reaches 8.
    controller = DraftLengthController(max_k=8, max_batch=16)
    assert _run(controller, 1, lambda k: 1.0 + 0.1 * k, rounds=len(CANDIDATES)) == list(CANDIDATES)
    assert controller.acceptance > 0.85
    assert _run(controller, 1, lambda k: 1.0 + 0.1 * k, rounds=5) == [8] * 5
    # Drafts as dear as the verify and always rejected: k = 1 loses to k = 0, so 2, 4 and 8 are
    # never tried, and plain decoding is kept.
    rejecting = DraftLengthController(max_k=8, max_batch=16)
    assert _run(rejecting, 1, lambda k: 1.0 + k, accepted_fraction=0.0, rounds=8) == [0, 1] + [0] * 6
    # A peak in the middle: the climb stops after the first length past it.
    peaked = DraftLengthController(max_k=8, max_batch=16)
    cost = {0: 1.0, 1: 1.2, 2: 1.4, 4: 4.0, 8: 20.0}
    assert _run(peaked, 1, cost.__getitem__, rounds=6) == [0, 1, 2, 4, 2, 2]


def test_buckets_limits_remeasurement_and_built_steps():
    controller = DraftLengthController(max_k=4, max_batch=64)
    assert controller.candidates == (0, 1, 2, 4)
    _run(controller, 1, lambda k: 1.0, rounds=4)
    assert controller.choose(16) == 0              # a new bucket climbs again
    assert controller.choose(1, limit=1) in (0, 1)  # never past the round's feasible length
    # Every REMEASURE_EVERY rounds of a bucket, a neighbour of the best is measured again.
    chosen = _run(controller, 1, lambda k: 1.0 + 0.01 * k, rounds=3 * REMEASURE_EVERY)
    assert len(set(chosen)) > 1 and chosen.count(4) > 2 * REMEASURE_EVERY
    # A round that built a static step does not set the cost of its length.
    fresh = DraftLengthController(max_k=2, max_batch=4)
    k = fresh.choose(1)
    fresh.record(k, 1, 100.0, [k], [k], built_step=True)
    assert fresh.choose(1) == k                    # still unmeasured


def test_auto_needs_exact_acceptance_and_rejects_other_strings():
    assert EngineConfig(speculative_k="auto").max_draft_len == 8
    assert EngineConfig(speculative_k=3).max_draft_len == 3 and not EngineConfig(speculative_k=3).adaptive_speculation
    with pytest.raises(ValueError, match="needs accept='exact'"):
        EngineConfig(speculative_k="auto", accept="rejection")
    for bad in ("fast", -1, 2.5, True):
        with pytest.raises(ValueError, match="speculative_k must be a non-negative int or 'auto'"):
            EngineConfig(speculative_k=bad)


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8])
def test_auto_gives_plain_decoding_tokens(family, rng, max_num_seqs):
    prompts, params = random_requests(rng, 8, 24)
    plain = [o.token_ids for o in tiny_engine(family, max_num_seqs=max_num_seqs).generate(prompts, params)]
    engine = tiny_engine(family, speculative_k="auto", max_num_seqs=max_num_seqs)
    assert [o.token_ids for o in engine.generate(prompts, params)] == plain
    stats = engine.stats()["adaptive_speculation"]
    assert set(stats["rounds_per_k"]) <= set(CANDIDATES) and sum(stats["rounds_per_k"].values()) > 0
    assert 0.0 < stats["acceptance_estimate"] < 1.0


def test_auto_with_preemption_on_a_tight_pool(family, rng):
    prompts, params = random_requests(rng, 6, 16)
    plain = [o.token_ids for o in tiny_engine(family).generate(prompts, params)]
    engine = tiny_engine(family, speculative_k="auto", num_blocks=14)
    assert [o.token_ids for o in engine.generate(prompts, params)] == plain
    assert engine.stats()["num_preemptions"] > 0


def test_cli_takes_auto(tmp_path):
    from eft_fast.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--tuned", "x", "--speculative-k", "fast"])
    assert main(["generate", "--tuned", str(tmp_path / "missing"), "--speculative-k", "auto",
                 "--prompt", "a"]) == 2             # parsed; then the missing model is the error
    assert eft_fast.EFTEngine is not None
