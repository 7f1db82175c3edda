"""The OpenAI response shapes: completion and chat objects, stream chunks, log-probabilities
and usage. Plain functions from the engine's values to JSON-ready dicts."""
from __future__ import annotations

import json
import time

from ..engine.outputs import PromptLogprob, TopLogprobs

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}   # the engine's -> OpenAI's


def sse(payload: dict | str) -> str:
    """One server-sent event: ``data: {...}`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, request_id: str, model: str, created: int, choices: list[dict], **extra) -> dict:
    """A response or chunk object: ``kind`` is "text_completion", "chat.completion" or
    "chat.completion.chunk"."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def now() -> int:
    return int(time.time())


def _finite(x: float) -> float:
    """JSON has no infinities: a token the distribution excludes gets the most negative float."""
    return x if x == x and abs(x) != float("inf") else (-3.4028234663852886e38 if x < 0 else x)


class TokenText:
    """Token id -> its text (``tokenizer.decode([id])``), cached per server."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self.tokenizer.decode([token_id])
        return text


class CompletionLogprobs:
    """The legacy completions ``logprobs`` object, built a piece at a time (a stream chunk
    carries the new tokens' part; ``text_offset`` keeps counting across pieces)."""

    def __init__(self, token_text: TokenText, offset: int = 0):
        self.token_text, self.offset = token_text, offset

    def piece(self, token_ids: list[int], logprobs: list[float | None], tops: list[TopLogprobs | None]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in zip(token_ids, logprobs, tops):
            text = self.token_text(token)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if logprob is None else _finite(logprob))
            alternatives = None
            if top is not None:
                alternatives = {}
                for alt, alt_logprob in top:
                    alternatives.setdefault(self.token_text(alt), _finite(alt_logprob))
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out

    def prompt_piece(self, prompt_ids: list[int], scores: list[PromptLogprob | None]) -> dict:
        """The echoed prompt's part: the first token's log-probability and alternatives are null."""
        logprobs = [None if s is None else s[0] for s in scores]
        tops = [None if s is None else s[1] for s in scores]
        return self.piece(prompt_ids, logprobs, tops)


def merge_completion_logprobs(pieces: list[dict]) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for piece in pieces:
        for key in out:
            out[key].extend(piece[key])
    return out


def chat_logprobs(token_text: TokenText, token_ids: list[int], logprobs: list[float],
                  tops: list[TopLogprobs | None]) -> dict:
    """The chat ``logprobs`` object: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}

    content = []
    for token, logprob, top in zip(token_ids, logprobs, tops):
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or [])]})
    return {"content": content}
