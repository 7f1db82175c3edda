"""Adaptive speculation (``speculative_k="auto"``): each round's draft length from the running
acceptance rate and the measured cost of a round at the current batch size.

With a per-token acceptance probability a (drafts accepted independently), a round of k drafts
emits E(k) = (1 - a^(k + 1)) / (1 - a) tokens per request (the accepted drafts and one more
token), and k = 0 (a plain decode step) emits 1. The controller keeps, per batch bucket, the
wall time of a round of each draft length it tried (an exponential moving average) and runs the
length with the most tokens per second, E(k) / cost(k).

Exploration climbs: in a new bucket it measures k = 0, then 1, 2, 4, 8 in turn while each
gives more tokens per second than the one before, and stops at the first that gives fewer
(the rate is unimodal in k: drafts add tokens at a falling rate and cost at a rising one), so
long drafts are not tried where short ones already lose (a large batch). Afterwards, every
``REMEASURE_EVERY`` rounds of the bucket it measures a neighbour of the current best, so the
choice follows a changing load or acceptance rate. A round that built a static verify step
(its first at that length) is not counted.

a is estimated from the rounds' outcomes: a request that accepted x of its d drafts adds x
successes and, if x < d, one failure; a = successes / (successes + failures), both decayed.

In exact mode every k gives the same tokens as plain decoding, so the choice changes only
the speed; "auto" is refused for rejection mode, whose samples depend on k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .static_step import batch_buckets, bucket_for

AUTO_MAX_K = 8
CANDIDATES = (0, 1, 2, 4, 8)
COST_DECAY = 0.7            # weight of the old cost in the moving average
ACCEPT_DECAY = 0.98         # per round, on the success / failure counts
PRIOR_ACCEPTANCE = 0.7      # a before any round (as 7 successes and 3 failures)
REMEASURE_EVERY = 16        # rounds of a bucket between two measurements of a neighbour of the best


def expected_tokens(k: int, acceptance: float) -> float:
    """Tokens one request emits per round of k drafts when each is accepted with ``acceptance``."""
    if k == 0:
        return 1.0
    if acceptance >= 1.0:
        return float(k + 1)
    return (1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)


@dataclass
class _Bucket:
    cost: dict[int, float] = field(default_factory=dict)     # k -> seconds per round (EMA)
    rounds: int = 0
    explored: bool = False                                   # the first climb has stopped
    remeasures: int = 0


class DraftLengthController:
    """Chooses the draft length of each round (see the module docstring).

    Args:
        max_k: the largest draft length (the engine reserves KV room for it).
        max_batch: the engine's max_num_seqs (batch buckets as the static steps use).
    """

    def __init__(self, max_k: int = AUTO_MAX_K, max_batch: int = 64):
        self.candidates = tuple(k for k in CANDIDATES if k <= max_k)
        self.buckets = batch_buckets(max_batch)
        self._by_bucket: dict[int, _Bucket] = {}
        self.successes = PRIOR_ACCEPTANCE * 10
        self.failures = (1 - PRIOR_ACCEPTANCE) * 10
        self.chosen: dict[int, int] = {}          # k -> rounds it was chosen for (for stats)

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def _bucket(self, batch: int) -> _Bucket:
        size = bucket_for(self.buckets, min(batch, self.buckets[-1]))
        return self._by_bucket.setdefault(size, _Bucket())

    def _rate(self, bucket: _Bucket, k: int) -> float:
        return expected_tokens(k, self.acceptance) / bucket.cost[k]

    def choose(self, batch: int, limit: int | None = None) -> int:
        """The draft length for a round of ``batch`` requests, at most ``limit`` (the longest
        round the requests' budgets, contexts and KV blocks allow now), so the round runs the
        length chosen and its cost is recorded under it."""
        k = self._choose(self._bucket(batch), [c for c in self.candidates if limit is None or c <= limit])
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return k

    def _choose(self, bucket: _Bucket, candidates: list[int]) -> int:
        if not bucket.explored:
            for i, k in enumerate(candidates):
                if k not in bucket.cost:
                    return k
                if i > 0 and self._rate(bucket, k) < self._rate(bucket, candidates[i - 1]):
                    break                            # past the peak: stop climbing
            bucket.explored = True
        measured = [k for k in candidates if k in bucket.cost]
        if not measured:                             # a limit below every measured length
            return candidates[0]
        best = max(measured, key=lambda k: self._rate(bucket, k))
        if bucket.rounds and bucket.rounds % REMEASURE_EVERY == 0:
            i = candidates.index(best)
            side = -1 if bucket.remeasures % 2 else 1
            bucket.remeasures += 1
            for j in (i + side, i - side):
                if 0 <= j < len(candidates):
                    return candidates[j]
        return best

    def record(self, k: int, batch: int, seconds: float, drafted: list[int], accepted: list[int], *,
               built_step: bool = False) -> None:
        """A round of draft length ``k`` over ``batch`` requests took ``seconds``; request b
        drafted ``drafted[b]`` tokens and accepted ``accepted[b]`` of them. ``built_step``: the
        round built a static step (its time is not a round's cost)."""
        bucket = self._bucket(batch)
        bucket.rounds += 1
        if not built_step:
            old = bucket.cost.get(k)
            bucket.cost[k] = seconds if old is None else COST_DECAY * old + (1 - COST_DECAY) * seconds
        if k > 0:
            self.successes *= ACCEPT_DECAY
            self.failures *= ACCEPT_DECAY
            for d, x in zip(drafted, accepted):
                self.successes += x
                self.failures += 1 if x < d else 0

    def stats(self) -> dict:
        return {"acceptance_estimate": self.acceptance, "rounds_per_k": dict(sorted(self.chosen.items()))}
