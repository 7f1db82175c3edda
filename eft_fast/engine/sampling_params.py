"""Per-request sampling parameters (docs/DESIGN.md sections 2 and 8)."""
from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass

from .._validation import GREEDY_TEMPERATURE

_SEED_LIMIT = 2**63
_INT64_LIMIT = 2**63
MAX_LOGPROBS = 20   # most alternatives per token that logprobs / prompt_logprobs may ask for


def _as_float32(value: float) -> float:
    """``value`` rounded to float32, as the sampling kernels read it (+-inf past its range)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"{text[:12]}...({len(text)} digits)"


def _int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _float(name: str, value) -> float:
    """A finite float within float32's range (the kernels compute in float32)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:   # an int beyond float64
        raise ValueError(f"{name} must be within float32's range (|x| <= 3.4028235e38), got {_short(value)}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if not math.isfinite(_as_float32(value)):
        raise ValueError(f"{name} must be within float32's range (|x| <= 3.4028235e38), got {value}")
    return value


def _probability(name: str, value) -> float:
    value = _float(name, value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    if _as_float32(value) == 0.0:
        raise ValueError(f"{name} must be in (0, 1] in float32, got {value}, which rounds to 0")
    return value


def _sequence(name: str, value) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list, got {type(value).__name__}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Immutable: derive variants with ``dataclasses.replace``
    (which checks them again).

    Attributes:
        max_tokens: most tokens to generate (>= 1).
        temperature: T >= 0 of the final distribution softmax(z / T); 0 = greedy. Values below
            GREEDY_TEMPERATURE (1e-5) are stored as 0 (z / T would overflow float32), so the
            fused op and the speculative acceptance math see the same temperature.
        top_k: keep the k most likely tokens of the final distribution (0 = off).
        top_p: nucleus filter on the final distribution, in (0, 1] (1 = off).
        weight_top_p: p_w in (0, 1], the top-p set of the small-scale policy where the knowledge
            model's up-scaling weights apply (1 = off); docs/DESIGN.md section 2.
        reward_weights: beta, one float per tuned model (None = all ones); beta = (a, 1 - a)
            interpolates two rewards.
        seed: int in [0, 2**63) for the request's noise (docs/DESIGN.md section 3); None = the engine draws one.
        stop: stop strings; generation ends before the first occurrence, which is not in the output.
            Normalised to a tuple (None -> ()).
        stop_token_ids: ids that end generation (kept in the output, like EOS). Normalised to a tuple.
        ignore_eos: keep generating past EOS (until max_tokens or a stop).
        logprobs: None, or N in [0, 20]: with every generated token also return the N most
            likely tokens of the untempered EFT distribution at its position, with their
            log-probabilities (the sampled token's own log-probability is always returned).
        prompt_logprobs: None, or N in [0, 20]: also score the prompt: the log-probability of
            every prompt token but the first under the EFT distribution given the tokens before
            it, and the N most likely alternatives. Needs every model to see the same prompt
            tokens (token-id prompts, or one plain format for all models).
    """

    max_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    weight_top_p: float = 1.0
    reward_weights: tuple[float, ...] | None = None
    seed: int | None = None
    stop: tuple[str, ...] | str | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        def put(name, value):  # the dataclass is frozen
            object.__setattr__(self, name, value)

        put("max_tokens", _int("max_tokens", self.max_tokens, minimum=1))
        temperature = _float("temperature", self.temperature)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        put("temperature", 0.0 if temperature < GREEDY_TEMPERATURE else temperature)
        top_k = _int("top_k", self.top_k, minimum=0)
        if top_k >= _INT64_LIMIT:
            raise ValueError(f"top_k must be < 2**63 (0 = off; any k >= the vocabulary keeps every token), "
                             f"got {_short(top_k)}")
        put("top_k", top_k)
        put("top_p", _probability("top_p", self.top_p))
        put("weight_top_p", _probability("weight_top_p", self.weight_top_p))

        if self.reward_weights is not None:
            weights = _sequence("reward_weights", self.reward_weights)
            if not weights:
                raise ValueError("reward_weights must hold one float per tuned model, got an empty list")
            put("reward_weights", tuple(_float(f"reward_weights[{i}]", w) for i, w in enumerate(weights)))

        if self.seed is not None:
            seed = _int("seed", self.seed, minimum=0)
            if seed >= _SEED_LIMIT:
                raise ValueError(f"seed must be < 2**63, got {seed}")
            put("seed", seed)

        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else _sequence("stop", self.stop)
        for i, s in enumerate(stop):
            if not isinstance(s, str):
                raise TypeError(f"stop[{i}] must be a str, got {type(s).__name__}")
            if not s:
                raise ValueError(f"stop[{i}] is an empty string")
        put("stop", stop)

        ids = () if self.stop_token_ids is None else _sequence("stop_token_ids", self.stop_token_ids)
        put("stop_token_ids", tuple(_int(f"stop_token_ids[{i}]", t, minimum=0) for i, t in enumerate(ids)))

        if not isinstance(self.ignore_eos, bool):
            raise TypeError(f"ignore_eos must be a bool, got {type(self.ignore_eos).__name__}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                value = _int(name, value, minimum=0)
                if value > MAX_LOGPROBS:
                    raise ValueError(f"{name} must be <= {MAX_LOGPROBS}, got {_short(value)}")
                put(name, value)
