"""EFTEngine: continuous-batching EFT generation over several Hugging Face models.

    engine = EFTEngine(knowledge="large-base", tuned="small-chat", reference="small-base")
    outputs = engine.generate(["Why is the sky blue?"], SamplingParams(max_tokens=64, seed=0))

The roles alone decide what is sampled: knowledge + tuned + reference is EFT (up-scaling
when the knowledge model is the large one, down-scaling when it is the small one); several
tuned models are reward interpolation; a single model given alone is sampled by itself
(for comparison); tuned + reference without knowledge samples the small-scale policy.
"""
from __future__ import annotations

import gc
import logging
import os
import secrets
import time
import traceback
import weakref
from typing import Iterable, Iterator, Sequence

import torch

from .block_manager import BlockTable
from .config import EngineConfig
from ..ops import resolve_backend
from .decoding import Decoder
from .loading import load_model, parse_device
from .parallel import TensorParallelGroup, TensorParallelRunner, check_tensor_parallel
from .parallel.group import ShardSpec, TensorParallelError, launched_rank
from .parallel.worker import run_launched_worker
from .model_runner import ModelRunner
from .models import EngineModels, _as_list, check_roles
from .outputs import RequestMetrics, RequestOutput, StreamDelta
from .request import Request
from .prompt_scoring import prefill_logits, score_prompt
from .sampler import TokensOut, sample
from .sampling_params import SamplingParams
from .scheduler import ScheduledStep, Scheduler
from .tokenization import IncrementalDetokenizer, check_prompt, encode_prompt, find_stop

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
        tensor_parallel_size: shard the knowledge model (a path or hub id) over N ranks; this
            process is rank 0 and spawns the others, or, under torchrun (WORLD_SIZE = N), every
            rank runs this constructor and ranks > 0 serve rank 0 until it closes, then exit.
        distributed_timeout_s: the timeout of every collective of the tensor-parallel group.
        enable_prefix_caching: reuse cached KV blocks of repeated prefixes (system prompts,
            few-shot examples, earlier turns), per model; on by default.
        enable_chunked_prefill: prefill long prompts in chunks of at most
            ``max_num_batched_tokens`` tokens, in the same steps as the running requests' decode
            tokens; on by default.

    Use ``with EFTEngine(...) as engine:`` (or ``close()``) to stop tensor-parallel workers.
    """

    def __init__(self, knowledge=None, tuned=None, reference=None, *, tokenizer=None, dtype=None, device=None,
                 prompt_format=None, speculative_k: int | str = 0, accept: str = "exact", block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 8192, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 use_cuda_graph: bool | None = None, backend: str = "auto", tensor_parallel_size: int = 1,
                 distributed_timeout_s: float = 300.0, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True):
        self.config = EngineConfig(speculative_k=speculative_k, accept=accept, block_size=block_size,
                                   max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                   num_blocks=num_blocks, kv_cache_bytes=kv_cache_bytes,
                                   max_model_len=max_model_len, use_cuda_graph=use_cuda_graph, backend=backend,
                                   tensor_parallel_size=tensor_parallel_size,
                                   distributed_timeout_s=distributed_timeout_s,
                                   enable_prefix_caching=enable_prefix_caching,
                                   enable_chunked_prefill=enable_chunked_prefill)
        parsed_device = parse_device(device)
        if parsed_device is not None:     # a backend that cannot run there fails before any model loads
            resolve_backend(backend, parsed_device)
        self._tp_group = None
        knowledge_kwargs = {}
        if tensor_parallel_size > 1:
            if not _as_list(tuned):
                raise ValueError(f"tensor_parallel_size={tensor_parallel_size} shards the knowledge model of an EFT "
                                 "engine (knowledge + tuned + reference); a model sampled alone is not sharded")
            check_roles(knowledge, tuned, reference, prompt_format)   # cheap user errors before any rank starts
            check_tensor_parallel(tensor_parallel_size, knowledge, device=parsed_device,
                                  other_specs=_as_list(tuned) + _as_list(reference))
            spec = self._shard_spec(knowledge, dtype, parsed_device)
            launched = launched_rank(tensor_parallel_size)
            if launched is None:
                self._tp_group = TensorParallelGroup.start(spec, tensor_parallel_size)
            elif launched[0] == 0:
                self._tp_group = TensorParallelGroup.join_launched(spec, tensor_parallel_size, launched[2])
            else:                 # a worker rank of torchrun: serve rank 0's steps, then exit
                run_launched_worker(*launched, spec)
                raise SystemExit(0)
            weakref.finalize(self, self._tp_group.close)   # interpreter exit, or the engine dropped
            knowledge_kwargs = self._tp_group.load_kwargs()
        try:
            self._build(knowledge, tuned, reference, tokenizer, dtype, device, prompt_format, knowledge_kwargs)
        except BaseException:
            self.close()
            raise

    def _shard_spec(self, knowledge, dtype, device) -> ShardSpec:
        c = self.config
        return ShardSpec(knowledge=os.fspath(knowledge), dtype=dtype,
                         device_type="cuda" if device is not None and device.type == "cuda" else "cpu",
                         block_size=c.block_size, num_blocks=c.num_blocks, kv_cache_bytes=c.kv_cache_bytes,
                         max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs,
                         num_threads=torch.get_num_threads(), timeout_s=c.distributed_timeout_s)

    def _build(self, knowledge, tuned, reference, tokenizer, dtype, device, prompt_format, knowledge_kwargs) -> None:
        c = self.config
        self.models = EngineModels.load(knowledge, tuned, reference, tokenizer=tokenizer, dtype=dtype, device=device,
                                        prompt_format=prompt_format, knowledge_kwargs=knowledge_kwargs)
        model_device = next(self.models.models[0].parameters()).device
        try:
            resolve_backend(c.backend, model_device)
        except ValueError as e:
            raise ValueError(f"backend={c.backend!r} cannot sample the models' logits on {model_device}: {e}") from None
        self.roles = self.models.roles
        self.runners = []
        for m, (model, name) in enumerate(zip(self.models.models, self.models.names)):
            kw = dict(block_size=c.block_size, num_blocks=c.num_blocks, kv_cache_bytes=c.kv_cache_bytes,
                      max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs, role=name)
            sharded = self._tp_group is not None and m == self.roles.knowledge
            self.runners.append(TensorParallelRunner(model, self._tp_group, **kw) if sharded else ModelRunner(model, **kw))
        self.scheduler = Scheduler(self.runners, self.config)
        self.decoder = Decoder(self.runners, self.roles, self.config, self.models.vocab_size)
        self._next_id = 0
        self._requests: dict[int, Request] = {}   # every request whose output was not taken yet
        self._ended: list[Request] = []           # finished outside a step's batch, not reported yet
        self._stepping = False                    # inside _step (aborts and forgets wait for its end)
        self._deferred: list[tuple[int, bool]] = []   # (request id, forget) asked for during a step

    # ---- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the tensor-parallel workers (if any) and leave their process group; a sharded
        engine cannot step afterwards (TensorParallelError). Safe to call twice; a
        single-process engine has nothing to stop."""
        if self._tp_group is not None:
            self._tp_group.close()

    def __enter__(self) -> "EFTEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- requests --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.models.tokenizer

    def add_request(self, prompt: str | Sequence[int] | list[dict], params: SamplingParams | None = None, *,
                    strict: bool = False) -> int:
        """Queue one prompt (text, token ids, or a conversation: a list of {"role", "content"}
        dicts); returns its request id.

        Raises TypeError / ValueError for bad params or a prompt no model can encode. A prompt
        longer than a model's context does not raise (unless ``strict``: then it is a
        ValueError naming the prompt): the request finishes at once with finish_reason
        "error" and the reason in ``RequestOutput.error``.
        """
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        if params.reward_weights is not None and len(params.reward_weights) != len(self.roles.tuned):
            raise ValueError(f"params.reward_weights has {len(params.reward_weights)} weights but the engine has "
                             f"{len(self.roles.tuned)} tuned model(s)")
        prompt = check_prompt(prompt)
        prompt_ids = [encode_prompt(prompt, tok, fmt, role=name)
                      for tok, fmt, name in zip(self.models.tokenizers, self.models.formats, self.models.names)]
        for ids in prompt_ids:
            bad = [t for t in ids if not 0 <= t < self.models.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.models.vocab_size})")
        if params.prompt_logprobs is not None and any(ids != prompt_ids[0] for ids in prompt_ids):
            raise ValueError("params.prompt_logprobs scores the prompt under the EFT distribution, so every model "
                             "must see the same prompt tokens; give token ids, or use one plain prompt_format")
        too_long = [(name, len(ids), r.max_model_len) for name, ids, r in zip(self.models.names, prompt_ids, self.runners)
                    if len(ids) >= r.max_model_len]
        if strict and too_long:
            name, n, limit = too_long[0]
            raise ValueError(f"prompt: it has {n} tokens for the {name} model, whose context holds {limit} "
                             f"(room for at least one generated token is needed)")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        request = Request(self._next_id, prompt, params, seed, prompt_ids,
                          position_offset=len(prompt_ids[self.roles.tuned[0]]),
                          tables=[BlockTable() for _ in self.runners])
        self._next_id += 1
        self._requests[request.request_id] = request
        request.detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
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

    def _fail(self, request: Request, message: str | None, reason: str = "error") -> None:
        """End ``request`` now (its blocks freed); the next step reports it."""
        self._end(request, reason, message)
        self._ended.append(request)

    def _end(self, request: Request, reason: str, error: str | None = None, *, free: bool = True) -> None:
        """Mark ``request`` finished; ``free``: release its blocks and queue entry through the
        scheduler (an interrupted step's victims are dropped by Scheduler.recover instead)."""
        request.error = error
        request.finish_reason, request.finish_time = reason, time.perf_counter()
        if free:
            self.scheduler.finish(request)

    def abort(self, request_id: int) -> bool:
        """Stop a request: it finishes with finish_reason "abort" and its KV blocks are freed
        at once; the next step reports its final delta. Returns False (and does nothing) for
        an unknown or already finished request."""
        request = self._requests.get(request_id)
        if request is None or request.finished:
            return False
        if self._stepping:          # called from inside a step (a finaliser): at the step's end
            self._deferred.append((request_id, False))
        else:
            self._fail(request, None, reason="abort")
        return True

    def _forget(self, request_ids: Iterable[int]) -> None:
        """Drop requests whose caller is gone (a closed stream, an interrupted generate):
        unfinished ones are aborted first, so nothing keeps their blocks or keeps decoding them.
        A stream collected by the garbage collector can land here in the middle of a step:
        then the requests are dropped when the step ends, never under its feet."""
        if self._stepping:
            self._deferred.extend((request_id, True) for request_id in request_ids)
            return
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            if request is not None and not request.finished:
                self._end(request, "abort")

    def _apply_deferred(self) -> None:
        deferred, self._deferred = self._deferred, []
        for request_id, forget in deferred:
            if forget:
                self._forget([request_id])
            else:
                self.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- one engine step ---------------------------------------------------------------------
    def step(self) -> list[StreamDelta]:
        """Run one scheduled step (a prefill or a decode round); returns what each touched
        request added with :meth:`add_request` gained (requests ended outside a step, by abort
        or at add_request, included). Requests of a ``stream`` or ``generate`` call decode too,
        but their deltas are that call's.

        A step that raises (a model forward, the sampler, CUDA out of memory, a bug) does not
        propagate: the exception is logged, the requests of the step end with finish_reason
        "error" and their blocks are freed (see :meth:`_abort_step`); the others go on. An
        interruption (KeyboardInterrupt, SystemExit) ends the step's requests with finish_reason
        "abort", recounts the KV blocks, and propagates; the engine stays usable.
        """
        return [self._delta(r) for r in self._step() if not r.owned]

    def _step(self) -> list[Request]:
        """One step; the requests it touched, each once, without taking their deltas."""
        self._stepping = True
        try:
            return self._run_step()
        finally:
            self._stepping = False
            self._apply_deferred()

    def _run_step(self) -> list[Request]:
        touched, self._ended = self._ended, []
        scheduled = None
        try:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                if self.scheduler.waiting:   # the head cannot fit even an empty pool (it grew too long)
                    head = self.scheduler.waiting[0]
                    self._fail(head, "the request outgrew the KV pool (raise num_blocks or kv_cache_bytes)")
            else:
                if scheduled.kind == "prefill":
                    new_tokens = self._prefill(scheduled.requests, scheduled.chunks)
                else:
                    new_tokens = self.decoder.decode_round(scheduled.requests)
                for request, out in zip(scheduled.requests, new_tokens):
                    if out is None:                   # a prompt chunk: no token yet
                        self.scheduler.commit(request)
                    elif out.error:
                        self._fail(request, out.error)
                    else:
                        self._append(request, out)
                        if not request.finished:
                            self.scheduler.commit(request)
        except TensorParallelError as exc:   # the step's requests end; the group restarts or the engine stops
            self._abort_step(scheduled, exc)
            if not (exc.recoverable and self._restart_tensor_parallel(exc)):
                self._ended = touched + self._ended
                self.close()
                raise
        except Exception as exc:
            self._abort_step(scheduled, exc)
        except BaseException as exc:
            self._interrupted(scheduled, exc)
            self._ended = touched + self._ended      # reported by the next step
            if self._tp_group is not None and self._tp_group.broken is not None:
                self.close()                         # interrupted mid-forward: the ranks are out of step
            raise
        stepped = scheduled.requests if scheduled is not None else []
        ended = set(self._ended)
        touched += self._ended + [r for r in stepped if r not in ended]
        self._ended = []
        return touched

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

    def _restart_tensor_parallel(self, exc: TensorParallelError) -> bool:
        """After a worker reported an exception in its forward (and exited): spawn new workers,
        reload rank 0's shard and recompute every request that held KV blocks (the workers'
        K/V is gone; the prefix caches are dropped). True if the engine can go on; False (the
        caller closes and raises) if the restart failed."""
        logger.warning("restarting the tensor-parallel workers after: %s", exc)
        _drop_frames(exc)      # the failed forward's frames hold the old shard's modules and activations
        for request in list(self.scheduler.running):
            self.scheduler.preempt(request)          # recomputed from its prompt and outputs
        self.scheduler.recover([])                   # every pool recounted, prefix caches dropped
        k = self.roles.knowledge
        group, runner = self._tp_group, self.runners[k]
        try:
            self.models.models[k] = runner.model = None   # free the old shard before loading the new one
            gc.collect()
            group.restart()
            model = load_model(group.spec.knowledge, role="knowledge", dtype=group.spec.dtype, **group.load_kwargs())
            runner.reload(model)
            self.models.models[k] = model
        except Exception as failure:   # noqa: BLE001 - reported, then the original error is raised
            logger.error("restarting the tensor-parallel workers failed; the engine stops", exc_info=failure)
            return False
        logger.warning("tensor-parallel workers restarted (%d restart(s) so far)", group.restarts)
        return True

    def _interrupted(self, scheduled: ScheduledStep | None, exc: BaseException) -> None:
        """Leave the engine consistent after an interruption part-way through a step.

        The step's requests (every running one, if scheduling was interrupted) may have half
        advanced tables, token lists or block counts: they end with finish_reason "abort", as
        does any unfinished request the interruption left in no queue. Then every pool's block
        counts are rebuilt from the queued requests' tables (see :meth:`Scheduler.recover`).
        """
        sched = self.scheduler
        victims = list(scheduled.requests) if scheduled is not None else list(sched.running)
        queued = set(sched.running) | set(sched.waiting)
        victims += [r for r in self._requests.values() if not r.finished and r not in queued and r not in victims]
        victims = [r for r in victims if not r.finished]
        sched.recover(victims)
        for request in victims:
            self._end(request, "abort", f"interrupted by {type(exc).__name__} during a step", free=False)
            self._ended.append(request)

    @torch.inference_mode()
    def _prefill(self, requests: list[Request], chunks: list[list[int]] | None = None) -> list[TokensOut | None]:
        """Every model reads each request's chunk of uncached tokens (all of them by default);
        one token is sampled per request whose chunk completes its pending tokens (None for
        the others, which go on in a later step). Requests that ask for prompt_logprobs have
        their prompt scored too (a request whose scoring fails ends with the error; its batch
        mates go on)."""
        logits, prompt_rows, complete = prefill_logits(self.runners, requests, chunks)
        outs: list[TokensOut | None] = [None] * len(requests)
        if complete:
            rows = [requests[i] for i in complete]
            sampled = sample(self.roles, logits, rows, [r.next_position for r in rows],
                             vocab_size=self.models.vocab_size, backend=self.config.backend).per_request()
            for i, out in zip(complete, sampled):
                outs[i] = out
        for i, rows in prompt_rows.items():
            try:
                requests[i].prompt_logprobs = score_prompt(self.roles, rows, requests[i],
                                                           vocab_size=self.models.vocab_size,
                                                           backend=self.config.backend)
            except ValueError as e:
                outs[i] = outs[i]._replace(error=str(e))
        return outs

    def _append(self, request: Request, out: TokensOut) -> None:
        """Add generated tokens, stopping at EOS, a stop token, a stop string, max_tokens or
        the context limit (tokens after the stop are dropped)."""
        params = request.params
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        for token, logprob, top in zip(out.tokens, out.logprobs, out.top):
            request.output_ids.append(token)
            request.logprobs.append(logprob)
            if params.logprobs is not None:
                request.top_logprobs.append(top)
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
        self.scheduler.finish(request, commit=True)

    def _delta(self, request: Request) -> StreamDelta:
        """New tokens and text since the request's last delta. While a stop string could still
        be completing, its possible prefix is held back, so the pieces join to the final text."""
        reported = request.reported_tokens
        hold = 0 if request.finished or not request.params.stop else max(map(len, request.params.stop)) - 1
        end = max(request.streamed_chars, len(request.text) - hold)
        delta = StreamDelta(request.request_id, request.output_ids[reported:], request.text[request.streamed_chars:end],
                            finished=request.finished, finish_reason=request.finish_reason,
                            logprobs=request.logprobs[reported:], top_logprobs=request.top_logprobs[reported:],
                            prompt_logprobs=request.prompt_logprobs if reported == 0 else None,
                            error=request.error if request.finished else None,
                            metrics=self._metrics(request) if request.finished else None)
        request.reported_tokens = len(request.output_ids)
        request.streamed_chars = end
        request.final_reported = request.finished
        return delta

    # ---- user-facing loops ---------------------------------------------------------------------
    def _check_progress(self, request_ids) -> None:
        """Called when a step brought a waiting loop nothing: unless some request can still
        run, the loop would spin forever, so this raises instead (an engine bug)."""
        if self.scheduler.has_work():
            return
        raise RuntimeError(f"eft_fast engine bug: requests {sorted(request_ids)} are awaited, but none can make "
                           "progress and there is nothing left to report")

    def _add_all(self, prompts, params) -> list[int]:
        """Add every prompt, or none: if one is rejected, those added before it are dropped."""
        if prompts is None or isinstance(prompts, (str, bytes, bytearray)) or not isinstance(prompts, Iterable):
            raise TypeError("prompts must be a list (or another iterable) of prompts, each a str or a list of "
                            f"token ids; got {type(prompts).__name__}")
        prompts = list(prompts)
        if prompts and all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            raise TypeError("prompts must be a list of prompts (strings or token-id lists), not a single prompt")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
            per_prompt = list(params)
        else:
            per_prompt = [params] * len(prompts)
        ids: list[int] = []
        try:
            for i, (prompt, sp) in enumerate(zip(prompts, per_prompt)):
                try:
                    ids.append(self.add_request(prompt, sp))
                    self._requests[ids[-1]].owned = True
                except (TypeError, ValueError) as e:
                    raise type(e)(f"prompts[{i}]: {e}") from e
        except BaseException:
            self._forget(ids)
            raise
        return ids

    def stream(self, prompts: Iterable[str | Sequence[int]], params=None) -> Iterator[StreamDelta]:
        """Queue the prompts now (a bad one raises here, and none is queued); return an
        iterator of their requests' new tokens and text as they are produced.

        Every queued request decodes (continuous batching); only this call's requests are
        yielded. A request is forgotten once its final delta (``finished=True``) is yielded.
        Closing the iterator early (``break``, an exception, garbage collection, even before
        its first item) aborts this call's unfinished requests and frees their KV blocks.
        """
        ids = self._add_all(prompts, params)
        deltas = self._stream(ids)
        weakref.finalize(deltas, self._forget, ids)   # also when dropped before its first next()
        return deltas

    def _stream(self, ids: list[int]) -> Iterator[StreamDelta]:
        try:
            streaming = list(ids)
            while streaming:
                self._step()
                news = [i for i in streaming if self._requests[i].has_news()]
                if not news:
                    self._check_progress(streaming)
                for request_id in news:
                    delta = self._delta(self._requests[request_id])
                    if delta.finished:
                        streaming.remove(request_id)
                        del self._requests[request_id]
                    yield delta
        finally:
            self._forget(ids)

    def generate(self, prompts: Iterable[str | Sequence[int]], params=None, *, progress: bool = False
                 ) -> list[RequestOutput]:
        """Generate every prompt to completion; one RequestOutput per prompt, in order.

        An exception or interruption (KeyboardInterrupt) part-way aborts this call's
        unfinished requests and frees their blocks before it propagates."""
        ids = self._add_all(prompts, params)
        bar = None
        try:
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(ids), unit="req")
            pending = set(ids)
            while pending:
                touched = self._step()
                if not touched:
                    self._check_progress(pending)
                for request in touched:
                    if request.finished and request.request_id in pending:
                        pending.discard(request.request_id)
                        if bar is not None:
                            bar.update(1)
            return [self.output(i, pop=True) for i in ids]
        finally:
            if bar is not None:
                bar.close()
            self._forget(ids)

    def output(self, request_id: int, pop: bool = False) -> RequestOutput:
        """The RequestOutput of a request (finished or not)."""
        request = self._requests.pop(request_id) if pop else self._requests[request_id]
        return RequestOutput(request.request_id, request.prompt, list(request.output_ids), request.text,
                             list(request.logprobs), request.finish_reason, self._metrics(request),
                             error=request.error, top_logprobs=list(request.top_logprobs),
                             prompt_logprobs=request.prompt_logprobs)

    def stats(self) -> dict:
        """What the engine holds now, and counters since it was built.

        num_requests_running / num_requests_waiting: the scheduler's queues.
        num_requests_unclaimed: finished requests whose output was not taken yet
        (``output(request_id, pop=True)``; ``generate`` and ``stream`` take their own).
        kv_blocks_used / kv_blocks_total: per model role.
        prefix_cache_hit_rate: per model role, over requests' first admissions, the fraction of
        prompt tokens in full blocks that came from the cache (None before any lookup);
        kv_blocks_cached: blocks registered in the prefix cache (in use or free);
        prefill_tokens_computed: per model role, tokens its prefill steps computed.
        num_preemptions; with speculation, proposed / accepted draft tokens, rounds (a round is
        one request's draft-and-verify), acceptance rate and mean accepted drafts per round;
        with speculative_k="auto", adaptive_speculation: the acceptance estimate and the rounds
        run at each draft length (0 = a plain step).
        """
        sched = self.scheduler
        out = {"num_requests_running": len(sched.running), "num_requests_waiting": len(sched.waiting),
               "num_requests_unclaimed": sum(r.finished for r in self._requests.values()),
               "kv_blocks_used": {n: r.blocks.num_used_blocks for n, r in zip(self.models.names, self.runners)},
               "kv_blocks_total": {n: r.blocks.num_blocks for n, r in zip(self.models.names, self.runners)},
               "num_preemptions": sched.num_preemptions,
               "prefix_cache_hit_rate": {n: hit / queried if queried else None for n, hit, queried in
                                         zip(self.models.names, sched.prefix_hit_tokens, sched.prefix_queried_tokens)},
               "kv_blocks_cached": {n: r.blocks.num_cached_blocks for n, r in zip(self.models.names, self.runners)},
               "prefill_tokens_computed": dict(zip(self.models.names, sched.prefill_tokens_computed))}
        spec = self.decoder.speculative
        if spec is not None:
            out.update(proposed_tokens=spec.proposed, accepted_tokens=spec.accepted, rounds=spec.rounds,
                       acceptance_rate=spec.accepted / spec.proposed if spec.proposed else None,
                       mean_accepted_per_round=spec.accepted / spec.rounds if spec.rounds else None)
        if self.decoder.draft_control is not None:     # speculative_k="auto"
            out["adaptive_speculation"] = self.decoder.draft_control.stats()
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
            rounds=request.spec_rounds,
            num_cached_tokens={name: n for name, n in
                               zip(self.models.names, request.cached_tokens or [0] * len(self.runners))})


def _drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in ``exc``'s tracebacks (and its causes'), so
    that what they referenced can be freed while the exception object is still alive."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc = exc.__cause__ or exc.__context__
