"""EFTEngine: continuous-batching EFT generation over several Hugging Face models.

    engine = EFTEngine(knowledge="large-base", tuned="small-chat", reference="small-base")
    outputs = engine.generate(["Why is the sky blue?"], SamplingParams(max_tokens=64, seed=0))

The roles alone decide what is sampled: knowledge + tuned + reference is EFT (up-scaling
when the knowledge model is the large one, down-scaling when it is the small one); several
tuned models are reward interpolation; a single model given alone is sampled by itself
(for comparison); tuned + reference without knowledge samples the small-scale policy.
"""
from __future__ import annotations

import logging
import secrets
import time
from typing import Iterable, Iterator, Sequence

import torch

from .block_manager import BlockTable
from .config import EngineConfig
from .decoding import Decoder
from .model_runner import ModelRunner, SequenceStep
from .models import EngineModels
from .outputs import RequestMetrics, RequestOutput, StreamDelta
from .request import Request, RequestStatus
from .sampler import sample
from .sampling_params import SamplingParams
from .scheduler import ScheduledStep, Scheduler
from .tokenization import IncrementalDetokenizer, encode_prompt, find_stop

logger = logging.getLogger(__name__)


class EFTEngine:
    """Generate from the EFT combination of several causal LMs that share a vocabulary.

    Args:
        knowledge: the pre-trained model whose knowledge is used (HF id, local path, ``.gguf``
            file or loaded ``PreTrainedModel``); None for a tuned-only engine.
        tuned: the fine-tuned model, or a list of them (reward interpolation).
        reference: the tuned model's pre-trained reference: one shared model or a list, one per
            tuned model.
        tokenizer: the shared tokenizer (default: each model's own, checked to agree by token id).
        dtype, device: where and in what precision the models run (default: as loaded / CPU).
        prompt_format: how text prompts are rendered, one spec for every model or a dict
            role -> spec ("auto" = chat template for models that have one, "plain", a string
            with "{prompt}", or a callable).
        speculative_k, accept, block_size, max_num_seqs, max_num_batched_tokens, num_blocks,
        kv_cache_bytes, max_model_len, use_cuda_graph, backend: see :class:`EngineConfig`.
    """

    def __init__(self, knowledge=None, tuned=None, reference=None, *, tokenizer=None, dtype=None, device=None,
                 prompt_format=None, speculative_k: int = 0, accept: str = "exact", block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 use_cuda_graph: bool | None = None, backend: str = "auto"):
        self.config = EngineConfig(speculative_k=speculative_k, accept=accept, block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   num_blocks=num_blocks, kv_cache_bytes=kv_cache_bytes,
                                   max_model_len=max_model_len, use_cuda_graph=use_cuda_graph, backend=backend)
        self.models = EngineModels.load(knowledge, tuned, reference, tokenizer=tokenizer, dtype=dtype, device=device,
                                        prompt_format=prompt_format)
        self.roles = self.models.roles
        self.runners = [ModelRunner(model, block_size=block_size, num_blocks=num_blocks,
                                    kv_cache_bytes=kv_cache_bytes, max_model_len=max_model_len,
                                    max_num_seqs=max_num_seqs, role=name)
                        for model, name in zip(self.models.models, self.models.names)]
        self.scheduler = Scheduler(self.runners, self.config)
        self.decoder = Decoder(self.runners, self.roles, self.config, self.models.vocab_size)
        self._next_id = 0
        self._requests: dict[int, Request] = {}
        self._failed: list[Request] = []   # finished outside a scheduled step, not reported yet

    # ---- requests --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.models.tokenizer

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue one prompt; returns its request id.

        Raises TypeError / ValueError for bad params or a prompt no model can encode. A prompt
        longer than a model's context does not raise: the request finishes at once with
        finish_reason "error" and the reason in ``RequestOutput.error``.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.reward_weights is not None and len(params.reward_weights) != len(self.roles.tuned):
            raise ValueError(f"params.reward_weights has {len(params.reward_weights)} weights but the engine has "
                             f"{len(self.roles.tuned)} tuned model(s)")
        prompt_ids = [encode_prompt(prompt if isinstance(prompt, str) else list(prompt), tok, fmt, role=name)
                      for tok, fmt, name in zip(self.models.tokenizers, self.models.formats, self.models.names)]
        for ids in prompt_ids:
            bad = [t for t in ids if not 0 <= t < self.models.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.models.vocab_size})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(self._next_id, prompt, params, seed, prompt_ids,
                          position_offset=len(prompt_ids[self.roles.tuned[0]]),
                          tables=[BlockTable() for _ in self.runners])
        self._next_id += 1
        self._requests[request.request_id] = request
        request.detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
        too_long = [(name, len(ids), r.max_model_len) for name, ids, r in zip(self.models.names, prompt_ids, self.runners)
                    if len(ids) >= r.max_model_len]
        if too_long:
            name, n, limit = too_long[0]
            self._fail(request, f"the prompt has {n} tokens for the {name} model, whose context holds {limit} "
                                f"(room for at least one generated token is needed)")
        elif not self.scheduler.fits_empty_pool(request):
            self._fail(request, "the prompt needs more KV blocks than a model's whole pool holds; "
                                "raise num_blocks or kv_cache_bytes")
        else:
            self.scheduler.add(request)
        return request.request_id

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        request.finish_reason = "error"
        request.finish_time = time.perf_counter()
        self.scheduler.finish(request)
        self._failed.append(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one engine step ---------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one scheduled step (a prefill or a decode round); returns what each touched
        request gained.

        A step that raises (a model forward, the sampler, CUDA out of memory, a bug) does not
        propagate: the exception is logged, the requests of the step end with finish_reason
        "error" and their blocks are freed (see :meth:`_abort_step`); the others go on.
        """
        touched, self._failed = self._failed, []
        scheduled = None
        try:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                if self.scheduler.waiting:   # the head cannot fit even an empty pool (it grew too long)
                    head = self.scheduler.waiting[0]
                    self._fail(head, "the request outgrew the KV pool (raise num_blocks or kv_cache_bytes)")
            else:
                if scheduled.kind == "prefill":
                    new_tokens = self._prefill(scheduled.requests)
                else:
                    new_tokens = self.decoder.decode_round(scheduled.requests)
                for request, (tokens, logprobs, status) in zip(scheduled.requests, new_tokens):
                    if status:
                        self._fail(request, "sampling failed: NaN or infinite logits" if status == 1
                                   else "sampling failed: every token was masked or filtered")
                    else:
                        self._append(request, tokens, logprobs)
        except Exception as exc:
            self._abort_step(scheduled, exc)
        stepped = scheduled.requests if scheduled is not None else []
        touched += self._failed + [r for r in stepped if r not in self._failed]
        self._failed = []
        return [self._delta(r) for r in touched]

    def _abort_step(self, scheduled: ScheduledStep | None, exc: Exception) -> None:
        """End the requests of a step that raised, freeing their blocks.

        Their K/V and block tables may be half advanced, so they cannot simply be retried.
        When scheduling itself raised there is no batch: the running requests (every one
        that holds blocks) end instead, or, with none running, the head of the waiting queue,
        so that a scheduler that keeps raising still lets ``generate`` finish. The scheduler
        keeps every request in exactly one of its queues, so the rest stay queued.
        """
        if scheduled is not None:
            victims = [r for r in scheduled.requests if not r.finished]
        else:
            victims = list(self.scheduler.running) or list(self.scheduler.waiting)[:1]
        where = f"{scheduled.kind} step" if scheduled is not None else "scheduler"
        logger.error("the engine's %s failed; %d request(s) end with an error: %s", where, len(victims),
                     [r.request_id for r in victims], exc_info=exc)
        for request in victims:
            self._fail(request, f"the engine's {where} failed: {type(exc).__name__}: {exc}")

    @torch.inference_mode()
    def _prefill(self, requests: list[Request]):
        """Every model reads each request's uncached tokens; one token is sampled per request."""
        logits = {}
        for m, runner in enumerate(self.runners):
            logits[m] = runner.forward([SequenceStep(r.tables[m], r.pending_tokens(m)) for r in requests])
        return sample(self.roles, logits, requests, [r.next_position for r in requests],
                      vocab_size=self.models.vocab_size, backend=self.config.backend).per_request()

    def _append(self, request: Request, tokens: list[int], logprobs: list[float]) -> None:
        """Add generated tokens, stopping at EOS, a stop token, a stop string, max_tokens or
        the context limit (tokens after the stop are dropped)."""
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        for token, logprob in zip(tokens, logprobs):
            request.output_ids.append(token)
            request.logprobs.append(logprob)
            if token in self.models.eos_token_ids and not params.ignore_eos:
                return self._finish(request, "eos")
            if self._push_text(request, token):
                return self._finish(request, "stop", flush=False)
            if token in params.stop_token_ids:
                return self._finish(request, "stop")
            if len(request.output_ids) >= params.max_tokens or \
                    any(request.num_tokens(m) >= r.max_model_len for m, r in enumerate(self.runners)):
                return self._finish(request, "length")

    def _push_text(self, request: Request, token: int) -> bool:
        """Extend the request's text by the token; True if a stop string completed (text cut before it)."""
        if request.detokenizer is None:
            return False
        checked = len(request.text)
        request.text += request.detokenizer.push(token)
        return self._cut_stop(request, checked)

    @staticmethod
    def _cut_stop(request: Request, checked: int) -> bool:
        cut = find_stop(request.text, request.params.stop, checked) if request.params.stop else None
        if cut is None:
            return False
        request.text = request.text[:cut]
        return True

    def _finish(self, request: Request, reason: str, flush: bool = True) -> None:
        if flush and request.detokenizer is not None:   # text held back for a possibly split character
            checked = len(request.text)
            request.text += request.detokenizer.flush()
            if self._cut_stop(request, checked):
                reason = "stop"
        request.finish_reason = reason
        request.finish_time = time.perf_counter()
        self.scheduler.finish(request)

    def _delta(self, request: Request) -> StreamDelta:
        """New tokens and text since the request's last delta. While a stop string could still
        be completing, its possible prefix is held back, so the pieces join to the final text."""
        reported = request.reported_tokens
        hold = 0 if request.finished or not request.params.stop else max(map(len, request.params.stop)) - 1
        end = max(request.streamed_chars, len(request.text) - hold)
        delta = StreamDelta(request.request_id, request.output_ids[reported:], request.text[request.streamed_chars:end],
                            finished=request.finished, finish_reason=request.finish_reason,
                            logprobs=request.logprobs[reported:])
        request.reported_tokens = len(request.output_ids)
        request.streamed_chars = end
        return delta

    # ---- user-facing loops ---------------------------------------------------------------------
    def _add_all(self, prompts, params) -> list[int]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
        prompts = list(prompts)
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
            per_prompt = list(params)
        else:
            per_prompt = [params] * len(prompts)
        return [self.add_request(p, sp) for p, sp in zip(prompts, per_prompt)]

    def stream(self, prompts: Iterable[str | Sequence[int]], params=None) -> Iterator[StreamDelta]:
        """Yield each request's new tokens and text as they are produced (continuous batching
        over every queued request; deltas of other requests already in the engine too)."""
        ids = set(self._add_all(prompts, params))
        while ids:
            for delta in self.step():
                yield delta
                if delta.finished:
                    ids.discard(delta.request_id)

    def generate(self, prompts: Iterable[str | Sequence[int]], params=None, *, progress: bool = False
                 ) -> list[RequestOutput]:
        """Generate every prompt to completion; one RequestOutput per prompt, in order."""
        ids = self._add_all(prompts, params)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="req")
        pending = set(ids)
        while pending:
            for delta in self.step():
                if delta.finished and delta.request_id in pending:
                    pending.discard(delta.request_id)
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [self.output(i, pop=True) for i in ids]

    def output(self, request_id: int, pop: bool = False) -> RequestOutput:
        """The RequestOutput of a request (finished or not)."""
        request = self._requests.pop(request_id) if pop else self._requests[request_id]
        return RequestOutput(request.request_id, request.prompt, list(request.output_ids), request.text,
                             list(request.logprobs), request.finish_reason, self._metrics(request),
                             error=request.error)

    def stats(self) -> dict:
        """Aggregate counters since the engine was built: preemptions and, with speculation,
        proposed / accepted draft tokens, acceptance rate and mean accepted drafts per round
        (a round is one request's draft-and-verify)."""
        out = {"num_preemptions": self.scheduler.num_preemptions}
        spec = self.decoder.speculative
        if spec is not None:
            out.update(proposed_tokens=spec.proposed, accepted_tokens=spec.accepted, rounds=spec.rounds,
                       acceptance_rate=spec.accepted / spec.proposed if spec.proposed else None,
                       mean_accepted_per_round=spec.accepted / spec.rounds if spec.rounds else None)
        return out

    def _metrics(self, request: Request) -> RequestMetrics:
        end = request.finish_time or time.perf_counter()
        ttft = None if request.first_token_time is None else request.first_token_time - request.arrival_time
        decode_time = end - (request.first_token_time or end)
        n = len(request.output_ids)
        return RequestMetrics(
            prompt_tokens={name: len(ids) for name, ids in zip(self.models.names, request.prompt_ids)},
            generated_tokens=n, time_to_first_token_s=ttft, total_time_s=end - request.arrival_time,
            tokens_per_s=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            proposed_tokens=request.proposed_tokens, accepted_tokens=request.accepted_tokens,
            rounds=request.spec_rounds)

