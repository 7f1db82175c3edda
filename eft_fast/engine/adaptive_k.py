"""Adaptive speculation (``speculative_k="auto"``): each round's draft length from the running
acceptance rate and the measured cost of a round at the current batch size.

With a per-token acceptance probability a (drafts accepted independently), a round of k drafts
emits E(k) = (1 - a^(k + 1)) / (1 - a) tokens per request (the accepted drafts and one more
token), and k = 0 (a plain decode step) emits 1. The controller measures the wall time of
rounds per (k, batch bucket), as an exponential moving average, and picks the k with the most
tokens per second, E(k) / cost(k). Every candidate is measured in a bucket before any is
trusted (its first round of a kind builds lazily made steps, so two are taken), and one
candidate is measured again every ``REMEASURE_EVERY`` rounds of a bucket, so the choice
follows a changing machine load or acceptance rate.

a is estimated from the rounds' outcomes: a request that accepted x of its d drafts adds x
successes and, if x < d, one failure; a = successes / (successes + failures), both decayed.

In exact mode every k gives the same tokens as plain decoding, so the choice changes only
the speed; "auto" is refused for rejection mode, whose samples depend on k.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .static_step import batch_buckets

AUTO_MAX_K = 8
CANDIDATES = (0, 1, 2, 4, 8)
COST_DECAY = 0.7            # weight of the old cost in the moving average
ACCEPT_DECAY = 0.98         # per round, on the success / failure counts
PRIOR_ACCEPTANCE = 0.7      # a before any round (as 7 successes and 3 failures)
MEASURE_ROUNDS = 2          # rounds of each candidate per bucket before choosing
REMEASURE_EVERY = 32        # rounds of a bucket between two re-measurements


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
    seen: dict[int, int] = field(default_factory=dict)       # k -> rounds measured
    rounds: int = 0
    next_remeasure: int = 0                                  # index into the candidates


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
        size = next((b for b in self.buckets if b >= batch), self.buckets[-1])
        return self._by_bucket.setdefault(size, _Bucket())

    def choose(self, batch: int, limit: int | None = None) -> int:
        """The draft length for a round of ``batch`` requests, at most ``limit`` (the longest
        round the requests' budgets, contexts and KV blocks allow now), so the round runs the
        length chosen and its cost is recorded under it."""
        bucket = self._bucket(batch)
        candidates = [k for k in self.candidates if limit is None or k <= limit]
        unmeasured = [k for k in candidates if bucket.seen.get(k, 0) < MEASURE_ROUNDS]
        if unmeasured:
            k = unmeasured[0]
        elif bucket.rounds % REMEASURE_EVERY == REMEASURE_EVERY - 1:
            k = candidates[bucket.next_remeasure % len(candidates)]
            bucket.next_remeasure += 1
        else:
            a = self.acceptance
            k = max(candidates, key=lambda c: expected_tokens(c, a) / bucket.cost[c])
        self.chosen[k] = self.chosen.get(k, 0) + 1
        return k

    def record(self, k: int, batch: int, seconds: float, drafted: list[int], accepted: list[int]) -> None:
        """A round of draft length ``k`` over ``batch`` requests took ``seconds``; request b
        drafted ``drafted[b]`` tokens and accepted ``accepted[b]`` of them."""
        bucket = self._bucket(batch)
        bucket.rounds += 1
        seen = bucket.seen.get(k, 0)
        bucket.seen[k] = seen + 1
        if seen < MEASURE_ROUNDS:
            bucket.cost[k] = seconds             # the first round may build steps: the second replaces it
        else:
            bucket.cost[k] = COST_DECAY * bucket.cost[k] + (1 - COST_DECAY) * seconds
        if k > 0:
            self.successes *= ACCEPT_DECAY
            self.failures *= ACCEPT_DECAY
            for d, x in zip(drafted, accepted):
                self.successes += x
                self.failures += 1 if x < d else 0

    def stats(self) -> dict:
        return {"acceptance_estimate": self.acceptance, "rounds_per_k": dict(sorted(self.chosen.items()))}
