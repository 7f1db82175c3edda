"""Decode rounds: one token per running request (plain), or a speculative draft-and-verify
round (speculative.py)."""
from __future__ import annotations

import time

import torch

from .adaptive_k import DraftLengthController
from .config import EngineConfig
from .model_runner import ModelRunner, SequenceStep
from .request import Request
from .sampler import Roles, TokensOut, sample
from .speculative import SpeculativeDecoder, draft_lengths
from .static_step import GraphPools, StaticStep


class Decoder:
    """Decode rounds over the engine's runners, through static (CUDA-graph) steps."""

    def __init__(self, runners: list[ModelRunner], roles: Roles, config: EngineConfig, vocab_size: int):
        self.runners = runners
        self.roles = roles
        self.config = config
        self.vocab_size = vocab_size
        self.graph_pools = GraphPools()      # every static step's CUDA graphs, one pool per device
        self.decode_steps = [StaticStep(r, 1, config.max_num_seqs, config.use_cuda_graph, graph_pools=self.graph_pools)
                             for r in runners]
        # Speculation needs a knowledge model to verify; a single model or s alone decodes plainly.
        self.speculative = None
        self.draft_control = None       # speculative_k="auto": the draft length of each round
        if config.adaptive_speculation and roles.knowledge is not None:
            self.draft_control = DraftLengthController(config.max_draft_len, config.max_num_seqs)
        if config.max_draft_len > 0 and roles.knowledge is not None:
            self.speculative = SpeculativeDecoder(runners, roles, config, vocab_size, self.decode_steps,
                                                  self.graph_pools)

    def sample(self, logits, rows: list[Request], positions: list[int], **kw):
        return sample(self.roles, logits, rows, positions, vocab_size=self.vocab_size, backend=self.config.backend,
                      **kw)

    def decode_round(self, requests: list[Request]) -> list[TokensOut]:
        """One round: speculative when configured (and there is room for drafts), else plain.

        Returns the new tokens (their logprobs, top alternatives, error) per request.
        """
        if self.speculative is None:
            return self.plain_round(requests)
        if self.draft_control is None:
            k, own = draft_lengths(requests, self.runners, self.speculative.k)
            return self.speculative.round(requests, k, own) if k > 0 else self.plain_round(requests)
        longest, own_longest = draft_lengths(requests, self.runners, self.speculative.k)
        # A length k <= the longest round runs k drafts, each request min(k, its own) of them.
        k = self.draft_control.choose(len(requests), longest)
        own = [min(n, k) for n in own_longest]
        steps_before = self.speculative.num_static_steps
        start = time.perf_counter()
        out = self.speculative.round(requests, k, own) if k > 0 else self.plain_round(requests)
        self.draft_control.record(k, len(requests), time.perf_counter() - start, own,
                                  [len(o.tokens) - 1 for o in out],
                                  built_step=self.speculative.num_static_steps != steps_before)
        return out

    @torch.inference_mode()
    def plain_round(self, requests: list[Request]) -> list[TokensOut]:
        """One token per request: every model reads its pending token; one fused sample."""
        logits = {m: self.decode_steps[m].forward([SequenceStep(r.tables[m], r.pending_tokens(m)) for r in requests])
                  for m in range(len(self.runners))}
        return self.sample(logits, requests, [r.next_position for r in requests]).per_request()
