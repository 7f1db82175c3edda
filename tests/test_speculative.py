"""Speculative EFT decoding: exact mode is token-identical to k = 0; rejection mode keeps the
k = 0 distribution; stops, preemption and budgets inside a round; forward-pass counts."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

import eft_fast
from eft_fast import EFTEngine, SamplingParams
from eft_fast.reference import sampling_log_probs
from engine_helpers import VOCAB, tiny_family
from tiny_hf import byte_level_bpe
from tiny_models import dense_logits

pytestmark = pytest.mark.usefixtures("one_thread")

MIXED = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.8, weight_top_p=0.9),
         dict(temperature=1.0, top_k=10, top_p=0.9)]


@pytest.fixture(scope="module")
def family():
    return tiny_family()


@pytest.fixture(scope="module")
def family_r2():
    return tiny_family(num_tuned=2)


def _requests(rng, n, max_tokens, num_tuned=1):
    lengths = torch.randint(1, 10, (n,), generator=rng).tolist()
    prompts = [torch.randint(0, VOCAB, (m,), generator=rng).tolist() for m in lengths]
    seeds = torch.randint(0, 2**62, (n,), generator=rng).tolist()
    params = []
    for i, s in enumerate(seeds):
        weights = None
        if num_tuned == 2:
            a = torch.rand((), generator=rng).item()
            weights = (a, 1.0 - a)
        params.append(SamplingParams(max_tokens=max_tokens, seed=s, ignore_eos=True, reward_weights=weights,
                                     **MIXED[i % len(MIXED)]))
    return prompts, params


def _engine(family, **kw):
    knowledge, tuned, reference = family
    tuned = tuned[0] if len(tuned) == 1 else tuned
    return EFTEngine(knowledge=knowledge, tuned=tuned, reference=reference, block_size=4, backend="torch",
                     max_num_seqs=32, **kw)


@pytest.mark.parametrize("num_tuned", [1, 2])
def test_exact_speculation_is_token_identical_to_plain_decoding(family, family_r2, num_tuned, rng):
    fam = family if num_tuned == 1 else family_r2
    prompts, params = _requests(rng, 32, 64, num_tuned)
    plain = [o.token_ids for o in _engine(fam).generate(prompts, params)]
    for k in (1, 2, 4, 8):
        engine = _engine(fam, speculative_k=k)
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == plain, f"k={k}"
        proposed = sum(o.metrics.proposed_tokens for o in outs)
        accepted = sum(o.metrics.accepted_tokens for o in outs)
        assert proposed > 0 and 0 < accepted <= proposed
        for o in outs:
            assert o.metrics.rounds > 0 and o.metrics.mean_accepted_per_round <= k
        stats = engine.stats()
        assert (stats["proposed_tokens"], stats["accepted_tokens"]) == (proposed, accepted)
        assert stats["rounds"] == sum(o.metrics.rounds for o in outs)
        assert stats["acceptance_rate"] == accepted / proposed


def test_stops_budgets_and_preemption_inside_rounds(rng):
    tok = byte_level_bpe()
    knowledge, tuned, reference = tiny_family(vocab=len(tok))

    def engine(**kw):
        return EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, tokenizer=tok, block_size=4,
                         backend="torch", **kw)

    prompts = ["hello world", "the quick brown fox", "a", "café"]
    free = engine().generate(prompts, SamplingParams(max_tokens=30, temperature=0.0))
    stops = [o.text[10:12] for o in free]
    params = [SamplingParams(max_tokens=30, temperature=0.0, stop=[s]) for s in stops]
    params.append(SamplingParams(max_tokens=3, seed=3))                                # k > remaining budget
    params.append(SamplingParams(max_tokens=30, seed=4, stop_token_ids=[free[1].token_ids[7]]))
    prompts = prompts + ["hello", "the quick brown fox"]
    want = engine().generate(prompts, params)
    for k in (3, 8):
        got = engine(speculative_k=k).generate(prompts, params)
        assert [(o.token_ids, o.text, o.finish_reason) for o in got] == \
            [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert want[4].token_ids and len(want[4].token_ids) == 3
    # preemption mid-speculation: a pool far too small for 6 requests with 8 lookahead slots
    tight = engine(speculative_k=4, num_blocks=12, max_num_seqs=6)
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("reward_weight", [None, 0.5])
def test_forward_passes_per_round(family, reward_weight):
    knowledge, tuned, reference = family
    engine = _engine(family, speculative_k=4)
    calls = {name: 0 for name in ("knowledge", "tuned", "reference")}
    for name, model in (("knowledge", knowledge), ("tuned", tuned[0]), ("reference", reference)):
        original = model.forward

        def counted(*a, _name=name, _orig=original, **kw):
            calls[_name] += 1
            return _orig(*a, **kw)

        model.forward = counted
    try:
        weights = None if reward_weight is None else [reward_weight]
        engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=6, seed=1, ignore_eos=True,
                                                            reward_weights=weights))
    finally:
        for model in (knowledge, tuned[0], reference):
            del model.forward
    # prefill: 1 forward each; one round of k = 4 (max_tokens 6 -> 5 left): the draft models run
    # k + 1 one-token steps, the verify models one (k + 1)-token step; then at most one more round.
    assert calls["knowledge"] >= 2
    verify_rounds = calls["knowledge"] - 1
    draft_steps = calls["tuned"] - 1
    assert draft_steps <= verify_rounds * 5           # never more than k + 1 draft steps per round
    if reward_weight is None:                         # s = l_T: the reference only verifies
        assert calls["reference"] == calls["knowledge"]
    else:                                             # s needs the reference: it drafts with the tuned model
        assert calls["reference"] == calls["tuned"]
    counts = engine.decoder.speculative.forward_counts   # the engine's own count of round forwards
    assert 1 <= counts[0] <= verify_rounds                # rounds near the budget end may be plain


def _exact_chain(family, prompt, params):
    """Exact k = 0 distributions of generated tokens 2 and 3 given the prompt (tiny V)."""
    knowledge, tuned, reference = family
    models = (knowledge, tuned[0], reference)
    t = torch.tensor([params.temperature], dtype=torch.float64)
    kk, pp = torch.tensor([params.top_k]), torch.tensor([params.top_p], dtype=torch.float64)

    def pi(context):
        k_l, t_l, r_l = (dense_logits(m, context)[-1][None] for m in models)
        _, _, z = eft_fast.eft_sample(k_l, t_l, r_l, 0, 0, weight_top_p=params.weight_top_p, return_logprobs=True,
                                      backend="torch")
        return sampling_log_probs(z.double(), t, kk, pp)[0].exp()

    p1 = pi(prompt)
    p2 = torch.zeros(VOCAB, dtype=torch.float64)
    p3 = torch.zeros(VOCAB, dtype=torch.float64)
    for a in range(VOCAB):
        if p1[a] < 1e-12:
            continue
        pa = pi(prompt + [a])
        p2 += p1[a] * pa
        for b in range(VOCAB):
            if pa[b] > 1e-12:
                p3 += p1[a] * pa[b] * pi(prompt + [a, b])
    return p2, p3


def test_rejection_sampling_keeps_the_plain_distribution(rng):
    global VOCAB
    knowledge, tuned, reference = fam = tiny_family(vocab=6)
    vocab, saved = 6, VOCAB
    prompt = [1, 4, 2]
    params = SamplingParams(max_tokens=4, temperature=0.9, weight_top_p=0.9)
    VOCAB = vocab
    try:
        p2, p3 = _exact_chain(fam, prompt, params)
    finally:
        VOCAB = saved
    engine = EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, block_size=4, backend="torch",
                       speculative_k=2, accept="rejection", max_num_seqs=256)
    n = 3000
    seeds = torch.randint(0, 2**62, (n,), generator=rng).tolist()
    outs = engine.generate([prompt] * n, [SamplingParams(max_tokens=4, temperature=0.9, weight_top_p=0.9, seed=s,
                                                         ignore_eos=True) for s in seeds])
    second = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=vocab).double()
    third = torch.bincount(torch.tensor([o.token_ids[2] for o in outs]), minlength=vocab).double()
    for counts, expected in ((second, p2), (third, p3)):
        keep = expected > 0
        _, p_value = stats.chisquare(counts[keep].numpy(), (expected[keep] * n).numpy())
        assert p_value > 1e-3, (counts, expected * n)
    proposed = sum(o.metrics.proposed_tokens for o in outs)
    accepted = sum(o.metrics.accepted_tokens for o in outs)
    assert 0 < accepted < proposed              # both acceptance and rejection happened
    assert all(-50 < lp <= 0 for o in outs for lp in o.logprobs)
    # greedy rows: pi and q are point masses, so rejection sampling emits the plain greedy tokens
    greedy = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)] * 4
    prompts = [[1, 4, 2], [3], [5, 5, 0, 1], [2, 2]]
    plain = EFTEngine(knowledge=knowledge, tuned=tuned[0], reference=reference, backend="torch").generate(prompts, greedy)
    assert [o.token_ids for o in engine.generate(prompts, greedy)] == [o.token_ids for o in plain]
