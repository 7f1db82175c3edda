"""What the engine returns: one :class:`RequestOutput` per finished request, and
:class:`StreamDelta` pieces while a request streams."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "eos", "error", "abort"]
FINISH_REASONS = ("stop", "length", "eos", "error", "abort")
TopLogprobs = list[tuple[int, float]]          # (token id, log-probability), most likely first
PromptLogprob = tuple[float, TopLogprobs]       # a prompt token's log-probability and the top alternatives


def _check_finish_reason(reason) -> None:
    if reason is not None and reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS} or None, got {reason!r}")


@dataclass
class RequestMetrics:
    """Counts and timings of one request.

    Attributes:
        prompt_tokens: prompt length in tokens, per model role ({"knowledge": 12, "tuned": 30, ...}:
            each model may see its own prompt format).
        generated_tokens: tokens generated (stop strings' tokens included, text cut aside).
        time_to_first_token_s: seconds from arrival to the first generated token (None before it).
        total_time_s: seconds from arrival to finish.
        tokens_per_s: decode speed, (generated_tokens - 1) / (finish - first token) in seconds
            (the first token belongs to the prefill); 0.0 with fewer than two tokens.
        proposed_tokens: draft tokens proposed by speculative decoding (0 without it).
        accepted_tokens: draft tokens that verification accepted.
        rounds: draft-and-verify rounds.
        num_cached_tokens: per model role, prompt tokens whose K/V came from the prefix cache at
            the request's first admission (not computed again).
    """

    prompt_tokens: dict[str, int] | int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float | None = None
    total_time_s: float = 0.0
    tokens_per_s: float = 0.0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    num_cached_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float | None:
        """accepted / proposed draft tokens; None without speculative decoding."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None

    @property
    def mean_accepted_per_round(self) -> float | None:
        """Accepted draft tokens per verify round (the bonus token not counted); None without rounds."""
        return self.accepted_tokens / self.rounds if self.rounds else None


@dataclass
class RequestOutput:
    """A finished (or, while streaming, partial) request.

    Attributes:
        request_id: the engine's id for the request.
        prompt: the prompt as given (text or token ids).
        token_ids: generated token ids (shared by all models).
        text: the detokenised generation, cut before a stop string if one matched.
        logprobs: per generated token, log softmax(z)_y of the untempered EFT distribution (fp32 values).
        finish_reason: "eos" (the end-of-sequence token), "stop" (a stop string or one of
            ``stop_token_ids``), "length" (max_tokens), "error" (see ``error``), "abort"
            (``EFTEngine.abort``, a closed stream or an interrupted step), or None while unfinished.
        metrics: counts and timings.
        error: why the request failed (finish_reason "error") or was interrupted, else None.
        top_logprobs: with ``SamplingParams.logprobs = N``, per generated token the N most likely
            tokens of the untempered EFT distribution at its position; else [].
        prompt_logprobs: with ``SamplingParams.prompt_logprobs = N``, per prompt token None (the
            first) or (its log-probability, the N most likely tokens) under the EFT distribution
            given the tokens before it; else None.
    """

    request_id: int
    prompt: str | list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: str | None = None
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None

    def __post_init__(self):
        _check_finish_reason(self.finish_reason)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class StreamDelta:
    """What one request gained in one engine step, for streaming.

    Attributes:
        request_id: the request.
        token_ids: the new token ids (several after an accepted speculative round).
        text: the new final text (may be "" while a multi-byte character or a possible stop string
            is held back).
        finished: True on the request's last delta.
        finish_reason: as in :class:`RequestOutput`, set when finished.
        logprobs: log-probabilities of the new tokens.
        top_logprobs: the top alternatives at each new token (with ``SamplingParams.logprobs``).
        prompt_logprobs: the prompt's scores (with ``SamplingParams.prompt_logprobs``), in the
            request's first delta only.
        error: why the request failed, on its last delta (finish_reason "error").
        metrics: the request's counts and timings, on its last delta.
    """

    request_id: int
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprob | None] | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None

    def __post_init__(self):
        _check_finish_reason(self.finish_reason)
        if self.finish_reason is not None and not self.finished:
            raise ValueError("a StreamDelta with a finish_reason must have finished=True")
