"""Speculative EFT decoding (docs/DESIGN.md section 4).

Up-scaling drafts cheaply: the small-scale policy s needs only the small models. One round,
for every running request at once:

1. Draft: the small models read the pending token, and k times a drafted token; after each
   read one fused ``eft_sample`` call in draft mode samples d_i from s with the noise of
   position p_i (k + 1 small steps in all; the last gives the small logits at p_k).
2. Verify: the knowledge model (and any model the draft did not run) reads the pending token
   and d_0..d_{k-1} in one (k + 1)-token forward. The small logits kept from drafting fill the
   other rows of one fused ``eft_sample`` call over all B (k + 1) rows: y_0..y_k.
3. Accept:
   - "exact": keep d_i while d_i == y_i, then emit y at the first mismatch (or the bonus y_k).
     y_i uses the same logits and noise as plain decoding would, so the output is token for
     token the k = 0 output.
   - "rejection" (Leviathan et al. 2023): keep d_i with probability min(1, pi_i(d_i) / q_i(d_i));
     at the first rejection sample the residual max(pi - q, 0). Its uniforms and residual noise
     come from Philox streams 1 and 2, never the shared Gumbel noise of stream 0. The bonus y_k
     is the stream-0 sample at a position no draft used.
4. Rollback: every model's table is cut back to the accepted tokens; stale slots are
   overwritten by later rounds.
"""
from __future__ import annotations

import torch

from ..philox import gumbel_noise, uniform
from ..reference import sampling_log_probs
from .config import EngineConfig
from .model_runner import ModelRunner, SequenceStep
from .request import Request
from .sampler import ROW_REJECTED, Roles, TokensOut, needs_reference, sample
from .sampling_params import SamplingParams
from .adaptive_k import CANDIDATES
from .static_step import GraphPools, StaticStep

NEG_INF = float("-inf")
STREAM_ACCEPT, STREAM_RESIDUAL = 1, 2
_DEFAULT_PARAMS = SamplingParams()


def draft_lengths(requests: list[Request], runners: list[ModelRunner], k: int) -> tuple[int, list[int]]:
    """(the round's draft length, each request's own draft length).

    A request drafts ``min(k, remaining budget - 1, context room)``: a function of the request
    alone, so that in rejection mode its samples do not depend on its batch mates. The round
    runs the longest of those, cut to what every request's reserved blocks and context hold
    (the round writes its k + 1 positions for every request; a request's rows past its own
    length are computed, ignored and rolled back). Only that cut (a short KV pool, or a batch
    mate at its context limit) can shorten a request's own drafts.
    """
    own, limit = [], k
    for r in requests:
        context = min(runner.max_model_len - r.num_tokens(m) for m, runner in enumerate(runners))
        reserved = min(len(r.tables[m].blocks) * runner.block_size - r.num_tokens(m)
                       for m, runner in enumerate(runners))
        own.append(max(0, min(k, r.remaining_tokens - 1, context)))
        limit = min(limit, context, reserved)
    round_len = max(0, min(max(own), limit))
    return round_len, [min(n, round_len) for n in own]


class SpeculativeDecoder:
    """Draft-and-verify rounds. ``decode_steps[m]`` are the 1-token static steps of the models."""

    def __init__(self, runners: list[ModelRunner], roles: Roles, config: EngineConfig, vocab_size: int,
                 decode_steps: list[StaticStep], graph_pools: GraphPools | None = None):
        self.runners = runners
        self.roles = roles
        self.k = config.max_draft_len
        self.accept = config.accept
        self.backend = config.backend
        self.vocab_size = vocab_size
        self.decode_steps = decode_steps
        self.max_batch = config.max_num_seqs
        self.use_cuda_graph = config.use_cuda_graph
        self.graph_pools = graph_pools
        self._verify_steps: dict[tuple[int, int], StaticStep] = {}    # (model, k) -> its verify step
        # Draft lengths whose verify is a static step: k itself, or every adaptive candidate.
        self.static_ks = set(CANDIDATES) - {0} if config.adaptive_speculation else {self.k}
        self.forward_counts = [0] * len(runners)       # model forwards, for tests and metrics
        self.proposed = self.accepted = self.rounds = 0  # aggregate over every request

    @property
    def num_static_steps(self) -> int:
        """Verify steps built so far (they are built at their first use)."""
        return len(self._verify_steps)

    def _verify_forward(self, m: int, steps: list[SequenceStep], k: int) -> torch.Tensor:
        if k in self.static_ks:   # a full-length verify (or an adaptive candidate): a static (CUDA-graph) step
            if (m, k) not in self._verify_steps:
                self._verify_steps[m, k] = StaticStep(self.runners[m], k + 1, self.max_batch, self.use_cuda_graph,
                                                      graph_pools=self.graph_pools)
            return self._verify_steps[m, k].forward(steps)
        return self.runners[m].forward(steps, all_logits=True)

    def _sample(self, logits, rows, positions, **kw):
        return sample(self.roles, logits, rows, positions, vocab_size=self.vocab_size, backend=self.backend, **kw)

    @torch.inference_mode()
    def round(self, requests: list[Request], k: int, own: list[int]) -> list[TokensOut]:
        """One round of k >= 1 draft steps; request b accepts at most ``own[b]`` <= k drafts
        (see :func:`draft_lengths`). Returns the emitted tokens of each request."""
        roles, rejection = self.roles, self.accept == "rejection"
        need_ref = needs_reference(roles, requests)
        draft_models = roles.small_models(need_ref)
        verify_models = [m for m in roles.all_models() if m not in draft_models]
        n, base = len(requests), [r.next_position for r in requests]
        cached_before = [[r.tables[m].num_tokens for m in range(len(self.runners))] for r in requests]
        pending = [r.output_ids[-1] for r in requests]      # the one token no model has read yet

        # 1. draft: k + 1 one-token steps of the small models, k samples from s
        drafts = torch.zeros(n, k, dtype=torch.int64)
        draft_results = []
        # Each small model's logits of the k + 1 steps, [n, k + 1, V]: step i is copied into
        # column i (the static step's output is rewritten by its next call), sampled from
        # there as a strided [n, V] view, and verified as [n (k + 1), V] without another copy.
        small_logits: dict[int, torch.Tensor] = {}
        draft_logq = []
        for i in range(k + 1):
            feed = pending if i == 0 else drafts[:, i - 1].tolist()
            for m in draft_models:
                out = self.decode_steps[m].forward([SequenceStep(r.tables[m], [t]) for r, t in zip(requests, feed)])
                if m not in small_logits:
                    small_logits[m] = out.new_empty(n, k + 1, out.shape[-1])
                small_logits[m][:, i].copy_(out)
                self.forward_counts[m] += 1
            if i == k:
                break
            res = self._sample({m: small_logits[m][:, i] for m in draft_models}, requests, [p + i for p in base],
                               draft=True, need_reference=need_ref, return_row_logprobs=rejection)
            draft_results.append(res)
            drafts[:, i] = torch.where(res.status == 0, res.tokens, torch.zeros_like(res.tokens))
            if rejection:
                draft_logq.append(res.row_logprobs)

        # 2. verify: one (k + 1)-token forward of the other models, one fused sample of all rows
        verify_tokens = [[t] + d for t, d in zip(pending, drafts.tolist())]
        logits = {}
        for m in verify_models:
            logits[m] = self._verify_forward(m, [SequenceStep(r.tables[m], v) for r, v in zip(requests, verify_tokens)], k)
            self.forward_counts[m] += 1
        for m in draft_models:
            logits[m] = small_logits[m].flatten(0, 1)                          # [n (k + 1), V]
        rows = [r for r in requests for _ in range(k + 1)]
        positions = [p + i for p in base for i in range(k + 1)]
        res = self._sample(logits, rows, positions, return_row_logprobs=rejection)
        targets = res.tokens.view(n, k + 1)
        target_logprobs = res.logprobs.view(n, k + 1)

        # 3. accept (at most own[b] drafts; then the sample at the first rejection, or the bonus)
        own_len = torch.tensor(own, dtype=torch.int64)
        # The EFT log-prob of each draft token at its verify row: with exact acceptance an
        # accepted draft is the row's own sample; with rejection it may be another token.
        draft_logprobs = target_logprobs[:, :k]
        if rejection:
            accepted, emitted_last, last_logprob = self._rejection(requests, rows, positions, drafts, targets,
                                                                   res.row_logprobs, torch.stack(draft_logq, 1), k,
                                                                   own_len, res.status == ROW_REJECTED)
            row_logprobs = res.row_logprobs.view(n, k + 1, -1)[:, :k]
            draft_logprobs = row_logprobs.gather(2, drafts.to(row_logprobs.device)[:, :, None])[..., 0].float().cpu()
        else:
            match = (drafts == targets[:, :k]).to(torch.int64)
            accepted = torch.minimum(match.cumprod(dim=1).sum(dim=1), own_len)      # leading matches
            emitted_last = targets.gather(1, accepted[:, None])[:, 0]
            last_logprob = target_logprobs.gather(1, accepted[:, None])[:, 0]

        # 4. rollback and results
        results = []
        for b, r in enumerate(requests):
            a = int(accepted[b])
            for m in range(len(self.runners)):
                r.tables[m].rollback(cached_before[b][m] + 1 + a)
            tokens = drafts[b, :a].tolist() + [int(emitted_last[b])]
            logprobs = [float(x) for x in draft_logprobs[b, :a]] + [float(last_logprob[b])]
            # a failed draft the request used, or a failed target row it emits from
            errors = [d.error(b) for d in draft_results[:own[b]]] + [res.error(b * (k + 1) + j) for j in range(a + 1)]
            error = next((e for e in errors if e is not None), None)
            r.proposed_tokens += own[b]
            r.accepted_tokens += a
            r.spec_rounds += 1
            self.proposed += own[b]
            self.accepted += a
            self.rounds += 1
            top = [res.top_at(b * (k + 1) + j) for j in range(a + 1)]   # the EFT distribution at each emitted position
            results.append(TokensOut(tokens, logprobs, error, top))
        return results

    def _rejection(self, requests, rows, positions, drafts, targets, z_logprobs, draft_logprobs, k, own_len,
                   rejected):
        """Leviathan acceptance over the batch, on the logits' device (one copy back at the end).
        Request b tests its first ``own_len[b]`` drafts; every random number is a function of
        its seed and position (streams 1 and 2), so the outcome does not depend on the batch.

        Rows the op rejected (``rejected`` [n (k + 1)]; their requests fail) are computed
        with default parameters, so that their values cannot break the batch.

        Returns (accepted [n], last emitted token [n], its EFT logprob [n]) on the CPU.
        """
        n, V, dev = len(requests), self.vocab_size, z_logprobs.device
        p = [_DEFAULT_PARAMS if bad else r.params for r, bad in zip(rows, rejected.tolist())]
        f64 = dict(dtype=torch.float64, device=dev)
        temperature = torch.tensor([x.temperature for x in p], **f64)
        top_k = torch.tensor([x.top_k for x in p], dtype=torch.int64, device=dev)
        top_p = torch.tensor([x.top_p for x in p], **f64)
        log_pi = sampling_log_probs(z_logprobs.double(), temperature, top_k, top_p).view(n, k + 1, V)
        is_draft_row = torch.arange(n * (k + 1), device=dev) % (k + 1) < k
        log_q = sampling_log_probs(draft_logprobs.double().flatten(0, 1), temperature[is_draft_row],
                                   top_k[is_draft_row], top_p[is_draft_row]).view(n, k, V)
        seeds = torch.tensor([r.seed for r in rows], dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        u = uniform(seeds, pos, STREAM_ACCEPT).view(n, k + 1)[:, :k]
        d = drafts.to(dev)[:, :, None]
        ratio_ok = torch.log(u) < log_pi[:, :k].gather(2, d)[..., 0] - log_q.gather(2, d)[..., 0]
        own_len = own_len.to(dev)
        accepted = torch.minimum(ratio_ok.to(torch.int64).cumprod(dim=1).sum(dim=1), own_len)   # [n]
        # residual max(pi - q, 0) at the first rejected position (pi itself where pi == q)
        at = accepted.clamp(max=k - 1)
        rows_idx = torch.arange(n, device=dev)
        pi = log_pi[rows_idx, at].exp()
        residual = (pi - log_q[rows_idx, at].exp()).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pi)
        flat = rows_idx * (k + 1) + at
        noise = gumbel_noise(seeds[flat], pos[flat], V, stream=STREAM_RESIDUAL)
        resampled = (residual.log() + noise).argmax(-1)
        bonus = targets.to(dev).gather(1, own_len[:, None])[:, 0]                 # y at the row after its drafts
        last = torch.where(accepted < own_len, resampled, bonus)
        last_logprob = z_logprobs.view(n, k + 1, V)[rows_idx, accepted, last]
        return accepted.cpu(), last.cpu(), last_logprob.float().cpu()
