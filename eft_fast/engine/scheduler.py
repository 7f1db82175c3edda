"""Continuous batching: waiting and running queues, FCFS admission, preemption by recompute.

A step is either a prefill (new or preempted requests: every model gets each request's
uncached tokens, packed) or a decode round over every running request. Prefill goes first
whenever a waiting request fits. When a decode round cannot reserve KV blocks, the most
recently admitted running request is preempted: its blocks are released in every model and
it goes back to the head of the waiting queue with its generated tokens, to be recomputed
by a later prefill. Its output does not change (noise depends only on seed and position).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .config import EngineConfig
from .model_runner import ModelRunner
from .request import Request, RequestStatus


@dataclass
class ScheduledStep:
    """``kind`` is "prefill" or "decode"; ``requests`` in batch order."""

    kind: str
    requests: list[Request]


class Scheduler:
    """Queues of one engine. ``runners[m]`` owns model m's block manager."""

    def __init__(self, runners: list[ModelRunner], config: EngineConfig):
        self.runners = runners
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def lookahead(self) -> int:
        """KV positions reserved beyond the next token (speculative drafts)."""
        return self.config.speculative_k

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _needed(self, request: Request, model: int) -> int:
        return min(request.num_tokens(model) + self.lookahead, self.runners[model].max_model_len + self.lookahead)

    def _can_hold(self, request: Request) -> bool:
        return all(r.blocks.can_hold(request.tables[m], self._needed(request, m)) for m, r in enumerate(self.runners))

    def _reserve(self, request: Request) -> bool:
        """Grow every model's table for the request's next round; all or nothing."""
        if not self._can_hold(request):
            return False
        for m, runner in enumerate(self.runners):
            ok = runner.blocks.ensure(request.tables[m], self._needed(request, m))
            assert ok, "can_hold and ensure disagree"
        return True

    def _release(self, request: Request) -> None:
        for m, runner in enumerate(self.runners):
            runner.blocks.release(request.tables[m])

    def finish(self, request: Request) -> None:
        """Free a finished (or failed) request's blocks and drop it from the queues."""
        self._release(request)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    def preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self) -> list[Request]:
        """Move waiting requests to running while they fit; returns them (the prefill batch).

        Each moves as soon as its blocks are reserved, so that a request is always in exactly
        one queue (or finished), even when a step raises halfway.
        """
        batch: list[Request] = []
        budget = self.config.max_num_batched_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            tokens = max(len(request.pending_tokens(m)) for m in range(len(self.runners)))
            if batch and tokens > budget:
                break
            if not self._reserve(request):
                break
            budget -= tokens
            self.running.append(self.waiting.popleft())
            request.status = RequestStatus.RUNNING
            batch.append(request)
        return batch

    def schedule(self) -> ScheduledStep | None:
        """The next step, or None when there is nothing to run.

        A waiting request that cannot fit even into an empty pool is returned as a
        prefill of its own; the engine reports it (see ``fits_empty_pool``).
        """
        batch = self._admit()
        if batch:
            return ScheduledStep("prefill", batch)
        if not self.running:
            return None
        scheduled: list[Request] = []
        for request in list(self.running):
            if request not in self.running:      # preempted while making room
                continue
            while not self._reserve(request):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(request)
        return ScheduledStep("decode", scheduled) if scheduled else self.schedule()

    def fits_empty_pool(self, request: Request) -> bool:
        """Whether the request's next round fits each model's whole pool."""
        from .block_manager import blocks_needed

        return all(blocks_needed(self._needed(request, m), r.block_size) <= r.blocks.num_blocks
                   for m, r in enumerate(self.runners))
