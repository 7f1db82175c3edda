"""The request: the one object that passes between the scheduler, the runners and the sampler."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from .block_manager import BlockTable
from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One prompt being generated.

    Every model m sees its own prompt ``prompt_ids[m]`` (its own format) followed by the
    shared ``output_ids``, and keeps its own block table ``tables[m]``; ``tables[m].num_tokens``
    of those tokens have K/V in model m's pool. The token sampled at generation index i is
    drawn with noise position ``position_offset + i`` (section 3 of docs/DESIGN.md): the absolute
    position in the primary (tuned, else only) model's sequence.
    """

    request_id: int
    prompt: str | list[int]
    params: SamplingParams
    seed: int
    prompt_ids: list[list[int]]
    position_offset: int
    tables: list[BlockTable]
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)    # per output token, when params.logprobs is set
    prompt_logprobs: list | None = None  # per prompt token, when params.prompt_logprobs is set (after prefill)
    text: str = ""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    spec_rounds: int = 0
    detokenizer: object | None = None   # IncrementalDetokenizer when the engine has a tokenizer
    streamed_chars: int = 0             # text already handed out by stream deltas
    reported_tokens: int = 0            # output_ids already handed out by stream deltas
    final_reported: bool = False        # the delta with finished=True was handed out
    owned: bool = False                 # added by a stream / generate call, which takes its deltas
    cached_tokens: list[int] | None = None   # per model, prompt tokens found in the prefix cache at admission

    def num_tokens(self, model: int) -> int:
        """Tokens model ``model`` must have seen before sampling the next one."""
        return len(self.prompt_ids[model]) + len(self.output_ids)

    def tokens(self, model: int, start: int, end: int) -> list[int]:
        """Positions ``start`` to ``end`` of model ``model``'s sequence (its prompt, then the outputs)."""
        prompt = self.prompt_ids[model]
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_ids[start - n:end - n]
        return prompt[start:] + self.output_ids[:end - n]

    def pending_tokens(self, model: int) -> list[int]:
        """The tokens of model ``model``'s sequence that are not in its KV cache yet."""
        done = self.tables[model].num_tokens
        prompt = self.prompt_ids[model]
        if done >= len(prompt):
            return self.output_ids[done - len(prompt):]
        return prompt[done:] + self.output_ids

    @property
    def is_decoding(self) -> bool:
        """Prefilled: it has generated tokens and every model lacks only the K/V of the last one."""
        return bool(self.output_ids) and all(self.num_tokens(m) - t.num_tokens == 1
                                             for m, t in enumerate(self.tables))

    @property
    def wants_prompt_logprobs(self) -> bool:
        """The prompt still has to be scored (at the request's first prefill)."""
        return self.params.prompt_logprobs is not None and self.prompt_logprobs is None

    def has_news(self) -> bool:
        """Whether a stream delta would hand out anything: new tokens, or the finish."""
        return len(self.output_ids) > self.reported_tokens or (self.finished and not self.final_reported)

    @property
    def next_position(self) -> int:
        return self.position_offset + len(self.output_ids)

    @property
    def remaining_tokens(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
