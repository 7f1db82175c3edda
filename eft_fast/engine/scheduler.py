"""Continuous batching: waiting and running queues, FCFS admission, preemption by recompute,
prefix caching.

A step is either a prefill (new or preempted requests: every model gets each request's
uncached tokens, packed) or a decode round over every running request. Prefill goes first
whenever a waiting request fits. When a decode round cannot reserve KV blocks, the most
recently admitted running request is preempted: its blocks are released in every model and
it goes back to the head of the waiting queue with its generated tokens, to be recomputed
by a later prefill. Its output does not change (noise depends only on seed and position).

Prefix caching (``enable_prefix_caching``): a request taken from the waiting queue first
takes, per model, the cached blocks of the longest prefix of its sequence that is cached
(its own blocks, after a preemption), so its prefill computes only the rest. After every step
the full blocks of committed tokens are registered (:meth:`Scheduler.commit`), and a request
that finishes normally registers its last ones before its blocks are freed. A waiting request
whose next uncached block a request of the same prefill batch is computing waits one step, and
then finds it cached.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import ROOT_HASH, chain_hash
from .config import EngineConfig
from .model_runner import ModelRunner
from .request import Request, RequestStatus


@dataclass
class ScheduledStep:
    """``kind`` is "prefill" or "decode"; ``requests`` in batch order. A prefill step's
    ``chunks[i]``: the tokens each model computes for request i (None: all it has pending);
    with chunked prefill a prefill step also carries decoding requests (chunk of 1)."""

    kind: str
    requests: list[Request]
    chunks: list[list[int]] | None = None


class Scheduler:
    """Queues of one engine. ``runners[m]`` owns model m's block manager."""

    def __init__(self, runners: list[ModelRunner], config: EngineConfig):
        self.runners = runners
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        # per model, over first admissions: prompt tokens in full blocks looked up / found cached
        self.prefix_queried_tokens = [0] * len(runners)
        self.prefix_hit_tokens = [0] * len(runners)
        self.prefill_tokens_computed = [0] * len(runners)   # per model, by prefill steps
        self._round_turn = True    # chunked prefill with speculation: a round's turn next
        for runner in runners:
            runner.blocks.enable_caching = config.enable_prefix_caching

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _needed(self, request: Request, model: int, lookahead: int) -> int:
        """Positions model ``model``'s table must hold for a round with ``lookahead`` drafts:
        the sequence so far plus the drafts, never past the context (draft_lengths keeps drafts
        within it)."""
        n = request.num_tokens(model)
        return min(n + lookahead, max(self.runners[model].max_model_len, n))

    def _reserve(self, request: Request) -> bool:
        """Grow every model's table for the request's next round; all or nothing.

        Room for the sequence so far plus as many of the ``max_draft_len`` drafts as the free
        blocks allow: draft_lengths drafts only as far as every table reaches, so a short pool
        shortens the drafts instead of failing or preempting a request that fits without them
        (exact speculation then never changes a request's tokens or finish reason).
        """
        for lookahead in range(self.config.max_draft_len, -1, -1):
            needed = [self._needed(request, m, lookahead) for m in range(len(self.runners))]
            if all(r.blocks.can_hold(request.tables[m], needed[m]) for m, r in enumerate(self.runners)):
                for m, runner in enumerate(self.runners):
                    ok = runner.blocks.ensure(request.tables[m], needed[m])
                    assert ok, "can_hold and ensure disagree"
                return True
        return False

    def _release(self, request: Request) -> None:
        for m, runner in enumerate(self.runners):
            runner.blocks.release(request.tables[m])

    # ---- prefix cache ------------------------------------------------------------------------
    def _match_prefix(self, request: Request) -> tuple[list[int], list[list[bytes]]]:
        """Give a request that holds no blocks the cached blocks of its longest cached prefix,
        per model; at least its last token is left to compute (its logits are needed). A
        request that scores its prompt (prompt_logprobs) computes every position instead.

        Returns, per model, the tokens looked up (those of its full blocks but the last token)
        and the hashes of the full blocks it will compute itself."""
        queried = [0] * len(self.runners)
        computed: list[list[bytes]] = [[] for _ in self.runners]
        if not self.config.enable_prefix_caching or request.wants_prompt_logprobs:
            return queried, computed
        for m, runner in enumerate(self.runners):
            table, bs = request.tables[m], runner.block_size
            if table.blocks:
                continue
            hashes = []
            for i in range((request.num_tokens(m) - 1) // bs):
                hashes.append(chain_hash(hashes[-1] if hashes else ROOT_HASH, request.tokens(m, i * bs, (i + 1) * bs)))
            matched = runner.blocks.match(table, hashes)
            queried[m] = len(hashes) * bs
            computed[m] = hashes[matched:]
        return queried, computed

    def commit(self, request: Request) -> None:
        """Register the request's full blocks of committed tokens (every token of its sequence
        whose K/V is in the cache) in each model's prefix cache."""
        if not self.config.enable_prefix_caching:
            return
        for m, runner in enumerate(self.runners):
            table = request.tables[m]
            full = min(table.num_tokens, request.num_tokens(m)) // runner.block_size
            if full > len(table.hashes):
                runner.blocks.commit(table, request.tokens(m, 0, full * runner.block_size), full * runner.block_size)

    def finish(self, request: Request, *, commit: bool = False) -> None:
        """Free a finished (or failed) request's blocks and drop it from the queues;
        ``commit``: register its committed blocks first (a normal finish: its tables are whole)."""
        if commit:
            self.commit(request)
        self._release(request)
        self._drop(request)

    def _drop(self, request: Request) -> None:
        """Take a finished request out of its queue."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED

    def recover(self, victims: list[Request]) -> None:
        """After a step was interrupted part-way (KeyboardInterrupt): finish ``victims`` and
        recount every pool's blocks from the tables of the requests still queued.

        The victims' tables are dropped without freeing block by block, since their counts
        may be the ones the interruption left half updated.
        """
        for request in victims:
            for table in request.tables:
                table.blocks, table.num_tokens = [], 0
            self._drop(request)
        live = self.running + list(self.waiting)
        for m, runner in enumerate(self.runners):
            runner.blocks.rebuild([r.tables[m] for r in live])

    def preempt(self, request: Request) -> None:
        self._release(request)
        self.running.remove(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit(self, budget: int | None = None, *, first: bool = True) -> list[Request]:
        """Move waiting requests to running while they fit; returns them (the prefill batch).

        Each moves as soon as its blocks are reserved (the whole sequence's), so that a
        request is always in exactly one queue (or finished), even when a step raises halfway.
        ``budget``: the step's token budget left (default: ``max_num_batched_tokens``). Without
        chunked prefill a request's whole prompt must fit it (except the batch's first);
        with it, any room left admits the next request, which then prefills in chunks.
        """
        chunked = self.config.enable_chunked_prefill
        batch: list[Request] = []
        budget = self.config.max_num_batched_tokens if budget is None else budget
        if chunked and budget <= 0:
            return batch
        in_flight: list[set[bytes]] = [set() for _ in self.runners]   # blocks this batch computes
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            queried, computed = self._match_prefix(request)
            tokens = max(len(request.pending_tokens(m)) for m in range(len(self.runners)))
            # A request whose next block a batch mate computes waits one step and takes it
            # from the cache then, rather than computing the shared prefix a second time.
            shares = any(hashes and hashes[0] in in_flight[m] for m, hashes in enumerate(computed))
            over = budget <= 0 if chunked else tokens > budget
            if chunked and request.wants_prompt_logprobs and tokens > budget:
                over = bool(batch) or not first      # scored whole, in a step of its own
            if ((batch or not first) and (over or shares)) or not self._reserve(request):
                self._release(request)        # a waiting request holds no blocks
                break
            budget -= tokens
            for m, hashes in enumerate(computed):
                in_flight[m].update(hashes)
                self.prefill_tokens_computed[m] += len(request.pending_tokens(m))
            if request.cached_tokens is None:      # first admission: what the prefix cache gave
                request.cached_tokens = [t.num_tokens for t in request.tables]
                for m, (q, hit) in enumerate(zip(queried, request.cached_tokens)):
                    self.prefix_queried_tokens[m] += q
                    self.prefix_hit_tokens[m] += hit
            self.running.append(self.waiting.popleft())
            request.status = RequestStatus.RUNNING
            batch.append(request)
        return batch

    def schedule(self) -> ScheduledStep | None:
        """The next step, or None when there is nothing to run.

        A waiting request that cannot fit even into an empty pool is returned as a
        prefill of its own; the engine reports it (see ``fits_empty_pool``).
        """
        if self.config.enable_chunked_prefill:
            return self._schedule_chunked()
        batch = self._admit()
        if batch:
            return ScheduledStep("prefill", batch)
        return self._decode_step()

    def _decode_step(self) -> ScheduledStep | None:
        """A decode round over every running request, preempting the most recently admitted
        ones while the blocks of a round do not fit."""
        if not self.running:
            return None
        scheduled = self._reserve_decoding(list(self.running))
        return ScheduledStep("decode", scheduled) if scheduled else self.schedule()

    def _reserve_decoding(self, requests: list[Request]) -> list[Request]:
        """Reserve each request's next round, preempting from the back of the running queue
        when the blocks run out; returns those that keep their reservation."""
        scheduled: list[Request] = []
        for request in requests:
            if request not in self.running:      # preempted while making room
                continue
            while not self._reserve(request):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is request:
                    break
            else:
                scheduled.append(request)
        return [r for r in scheduled if r in self.running]

    # ---- chunked prefill ---------------------------------------------------------------------
    def _schedule_chunked(self) -> ScheduledStep | None:
        """Decode tokens first, then prompt chunks, within ``max_num_batched_tokens``.

        Without speculation one step holds every decoding request's next token and chunks of
        the prompts being prefilled (running ones first, then newly admitted ones); a long
        prompt takes several steps while the others keep decoding. A speculative round cannot
        share its forwards with prompt chunks: rounds and chunk steps alternate while both
        have work. A step with no prompt chunk is a plain decode round (CUDA-graph path).
        """
        decoding = [r for r in self.running if r.is_decoding]
        prefill_work = len(decoding) < len(self.running) or bool(self.waiting)
        speculative = self.config.max_draft_len > 0
        if decoding and (not prefill_work or (speculative and self._round_turn)):
            self._round_turn = False
            scheduled = self._reserve_decoding(decoding)
            if scheduled:
                return ScheduledStep("decode", scheduled)
        self._round_turn = True
        budget = self.config.max_num_batched_tokens
        scheduled, chunks = [], []
        if not speculative:
            for request in self._reserve_decoding(decoding):
                scheduled.append(request)
                chunks.append([1] * len(self.runners))
                budget -= 1
        for request in [r for r in self.running if not r.is_decoding]:
            chunk = self._chunk(request, budget, first=not scheduled)
            if chunk is not None:
                scheduled.append(request)
                chunks.append(chunk)
                budget -= max(chunk)
        for request in self._admit(budget, first=not scheduled):
            chunk = self._chunk(request, budget, first=not scheduled)
            assert chunk is not None, "an admitted request has a chunk"
            scheduled.append(request)
            chunks.append(chunk)
            budget -= max(chunk)
        if not scheduled:           # no prompt chunk fits now (the pool is full): decode instead
            scheduled = self._reserve_decoding([r for r in self.running if r.is_decoding])
            return ScheduledStep("decode", scheduled) if scheduled else None
        if all(r.is_decoding for r in scheduled):
            return ScheduledStep("decode", scheduled)
        return ScheduledStep("prefill", scheduled, chunks)

    def _chunk(self, request: Request, budget: int, *, first: bool) -> list[int] | None:
        """Tokens each model computes for ``request`` in this step, or None for none.

        The whole rest of its sequence if every model's fits in ``budget``; else the same
        number of tokens per model (at most ``budget``), each model keeping at least its last
        token, so that every model reaches the end of the prompt in the same step (where the
        request samples its token). A request that scores its prompt (prompt_logprobs) is
        computed whole, in a step of its own if it does not fit the budget (``first``).
        """
        pending = [request.num_tokens(m) - request.tables[m].num_tokens for m in range(len(self.runners))]
        if max(pending) <= budget or (first and request.wants_prompt_logprobs):
            return pending
        if budget <= 0 or request.wants_prompt_logprobs:
            return None
        return [min(p - 1, budget) for p in pending]

    def fits_empty_pool(self, request: Request) -> bool:
        """Whether the request's next round, without drafts, fits each model's whole pool."""
        from .block_manager import blocks_needed

        return all(blocks_needed(self._needed(request, m, 0), r.block_size) <= r.blocks.num_blocks
                   for m, r in enumerate(self.runners))
