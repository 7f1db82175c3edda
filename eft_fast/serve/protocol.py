"""The OpenAI request bodies the server takes, checked strictly: a wrong type or an unknown
field is a 400 that names the field (``param``). Besides the OpenAI fields, the vLLM-style
extensions ``top_k``, ``ignore_eos`` and ``stop_token_ids`` and the EFT ones ``weight_top_p``
and ``reward_weights`` are taken at the top level of the body."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16     # most completions one request may ask for (n, times the prompts of a completion)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    weight_top_p: float | None = None
    reward_weights: list[float] | None = None

    def sampling_params(self, *, max_tokens: int, logprobs: int | None = None,
                        prompt_logprobs: int | None = None, seed_offset: int = 0) -> SamplingParams:
        """The engine's parameters for one choice (choice j of a seeded request uses seed + j).
        Raises ValueError / TypeError naming the field, as SamplingParams does."""
        kw = dict(max_tokens=max_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
                  prompt_logprobs=prompt_logprobs)
        for name in ("temperature", "top_p", "weight_top_p"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        if self.top_k is not None:
            kw["top_k"] = 0 if self.top_k == -1 else self.top_k      # -1 = off, as in vLLM
        if self.seed is not None:
            kw["seed"] = self.seed + seed_offset
        if self.stop is not None:
            kw["stop"] = self.stop
        if self.stop_token_ids is not None:
            kw["stop_token_ids"] = self.stop_token_ids
        if self.reward_weights is not None:
            kw["reward_weights"] = tuple(self.reward_weights)
        return SamplingParams(**kw)


class CompletionRequest(_Sampling):
    """POST /v1/completions. ``prompt``: a string, a list of strings, a list of token ids or a
    list of id lists. ``max_tokens`` 0 is allowed with ``echo`` (score the prompt only)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the engine takes them ("developer" is OpenAI's newer "system")."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
