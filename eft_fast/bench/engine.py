"""Engine benchmark: tokens/s of EFT decoding with eft_fast against the naive loop.

    eft-fast bench [--quick] [--knowledge K --tuned T --reference R] [--device D] [--dtype D]
                   [--threads N] [--out DIR]

Three workloads, each on the same prompts and seeds for every column, in one run:
  * batch 1: a few prompts, one request at a time;
  * 16 concurrent: 16 equal-length requests submitted together (aggregate tokens/s);
  * 64 mixed lengths: 64 requests submitted together whose max_tokens are log-uniform in
    [8, 256] (seeded), where continuous batching matters; columns eft_fast EFT, spec k=auto and
    the naive batched loop only.
Columns (temperature 1, weight_top_p 0.9, EOS ignored, so every column generates the same
number of tokens):
  tuned alone       the small tuned model sampled by itself (EFTEngine(tuned=...))
  knowledge alone   the knowledge model sampled by itself (EFTEngine(knowledge=...))
  naive EFT loop    eft_fast.naive_loop: three HF models with their own HF caches, one sequence
                    at a time, eft_fast.baselines' eager torch sampler (log_softmax x 3, sort-based
                    top-p of the up-scaling weights, Gumbel-max with a torch generator)
  naive batched     eft_fast.naive_loop.naive_batched_generate: the concurrent requests as one
                    static batch with left padding, HF caches, the same eager sampler over the
                    batch (what the batched peer implementations do); at batch 1 it is the
                    naive loop, so it runs for the concurrent workloads only
  eft_fast EFT      EFTEngine(knowledge, tuned, reference), no speculation
  spec k=2..16      speculative EFT, exact acceptance (checked token-identical to eft_fast EFT)
  spec k=auto       speculative_k="auto": each round's draft length from the measured costs and
                    acceptance (eft_fast.engine.adaptive_k), exact acceptance (checked identical)
  rejection         speculative EFT with rejection sampling at the workload's best exact k
Without --knowledge/--tuned/--reference the models are the synthetic family of
eft_fast.bench.synthetic, built from a seed (no downloads).

At batch 1 the columns take turns prompt by prompt, so that a change in the load of a shared
machine during the run falls on every column alike. Each engine column's wall time is split
into forward / step preparation / sampling / scheduling / other (eft_fast.bench.profile).
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch

from ..baselines import eager_eft_sample
from ..engine.engine import EFTEngine
from ..engine.sampling_params import SamplingParams
from ..naive_loop import naive_batched_generate, naive_generate
from .profile import BUCKETS, Profiler, breakdown, instrument_engine, profiled
from .workloads import SPEC_KS, BenchModels, BenchSettings, Workload, make_workloads, sampling_params


@dataclass
class Column:
    """One measured column of one workload (sums over the runs that make it up)."""

    key: str                      # "tuned", "knowledge", "naive", "eft", "spec_k2", ..., "rejection"
    label: str
    k: int = 0
    accept: str | None = None
    tokens: int = 0
    seconds: float = 0.0          # wall time
    cpu_seconds: float = 0.0      # this process's CPU time over the same spans (shows contention)
    bucket_seconds: dict = field(default_factory=lambda: dict.fromkeys(BUCKETS, 0.0))
    detail: dict = field(default_factory=dict)        # key -> {"seconds", "calls"} (Profiler.detail)
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    identical: bool | None = None         # exact speculation: same tokens as eft_fast EFT
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.proposed if self.proposed else None

    @property
    def breakdown(self) -> dict:
        return dict(breakdown(self.bucket_seconds, self.seconds), detail=self.detail)

    def add_time(self, seconds: float, cpu_seconds: float, profiler: Profiler) -> None:
        self.seconds += seconds
        self.cpu_seconds += cpu_seconds
        for bucket, value in profiler.seconds.items():
            self.bucket_seconds[bucket] += value
        for key, entry in profiler.detail.items():
            mine = self.detail.setdefault(key, {"seconds": 0.0, "calls": 0})
            mine["seconds"] += entry["seconds"]
            mine["calls"] += entry["calls"]


@dataclass
class WorkloadResult:
    workload: Workload
    columns: dict[str, Column] = field(default_factory=dict)

    def best_exact_k(self) -> int | None:
        """The fixed draft length of the fastest exact speculative column (not "auto")."""
        spec = [c for c in self.columns.values() if c.accept == "exact" and c.key.startswith("spec_k")]
        return max(spec, key=lambda c: c.tokens_per_s).k if spec else None


# ---- columns --------------------------------------------------------------------------------
ENGINE_COLUMNS = [("tuned", "tuned alone", {}), ("knowledge", "knowledge alone", {}),
                  ("eft", "eft_fast EFT", {})] + \
                 [(f"spec_k{k}", f"spec k={k}", {"speculative_k": k, "accept": "exact"}) for k in SPEC_KS] + \
                 [("spec_auto", "spec k=auto", {"speculative_k": "auto", "accept": "exact"})]
COLUMN_ORDER = ["tuned", "knowledge", "naive", "naive_batched", "eft"] + [f"spec_k{k}" for k in SPEC_KS] + \
               ["spec_auto", "rejection"]
MIXED_COLUMNS = ("eft", "spec_auto")   # engine columns of the mixed-lengths workload (besides naive batched)


def make_engine(models: BenchModels, key: str, workloads: list[Workload], **config) -> EFTEngine:
    roles = {"tuned": dict(tuned=models.tuned), "knowledge": dict(knowledge=models.knowledge)}.get(
        key, dict(knowledge=models.knowledge, tuned=models.tuned, reference=models.reference))
    longest = max(len(p) for w in workloads for p in w.prompts) + max(w.max_tokens for w in workloads)
    return EFTEngine(**roles, tokenizer=models.tokenizer, max_num_seqs=max(w.concurrency for w in workloads),
                     max_model_len=longest + max(SPEC_KS) + 2, **config)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class _Timed:
    """Wall and CPU time of a block, synchronising the device at both ends."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def run_engine(engine: EFTEngine, column: Column, prompts: list[list[int]], params: list[SamplingParams],
               together: bool, device) -> None:
    """Generate ``prompts`` (all at once if ``together``, else one request after another) and add
    the time, counts and outputs to ``column``."""
    profiler = Profiler()
    instrument_engine(profiler, engine)
    with profiled(profiler), _Timed(device) as timer:
        if together:
            outputs = engine.generate(prompts, params)
        else:
            outputs = [engine.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
    for out in outputs:
        if out.finish_reason == "error":
            raise RuntimeError(f"{column.label}: a request failed: {out.error}")
    column.add_time(timer.seconds, timer.cpu_seconds, profiler)
    column.tokens += sum(len(o.token_ids) for o in outputs)
    column.proposed += sum(o.metrics.proposed_tokens for o in outputs)
    column.accepted += sum(o.metrics.accepted_tokens for o in outputs)
    column.rounds += sum(o.metrics.rounds for o in outputs)
    column.outputs += [list(o.token_ids) for o in outputs]


def _profiled_trio(models: BenchModels) -> tuple[list, Profiler]:
    """The three models of a baseline loop, and a profiler that times their forwards."""
    trio = [models.knowledge, models.tuned, models.reference]
    profiler = Profiler()
    for model, role in zip(trio, ("knowledge", "tuned", "reference")):
        profiler.wrap(model, "forward", "forward",
                      detail=lambda *a, role=role, **kw: f"{role} forward, {kw['input_ids'].shape[-1]} tokens")
    return trio, profiler


def run_naive(models: BenchModels, column: Column, prompts: list[list[int]], params: list[SamplingParams],
              device) -> None:
    """eft_fast.naive_loop over the three models, one request after another, combined by the
    eager torch sampler (its own torch generator per request, seeded with the request's seed)."""
    trio, profiler = _profiled_trio(models)
    vocab = models.vocab_size
    outputs = []
    with profiled(profiler), _Timed(device) as timer:
        for prompt, sp in zip(prompts, params):
            gen = torch.Generator(device=device).manual_seed(sp.seed)

            def combine(logits, step, gen=gen, sp=sp):
                knowledge, tuned, reference = (x[None, :vocab] for x in logits)       # [1, V] each
                return eager_eft_sample(knowledge, tuned, reference, temperature=sp.temperature,
                                        weight_top_p=sp.weight_top_p, generator=gen)[0]

            outputs.append(naive_generate(trio, [prompt] * 3, profiler.timed(combine, "sampling"), sp.max_tokens))
    column.add_time(timer.seconds, timer.cpu_seconds, profiler)
    column.tokens += sum(len(o) for o in outputs)
    column.outputs += outputs


def run_naive_batched(models: BenchModels, column: Column, prompts: list[list[int]], params: list[SamplingParams],
                      device) -> None:
    """eft_fast.naive_loop.naive_batched_generate over the three models: every request in one
    static batch (left padding), combined by the eager torch sampler over the whole batch (one
    torch generator, seeded with the first request's seed)."""
    trio, profiler = _profiled_trio(models)
    vocab = models.vocab_size
    gen = torch.Generator(device=device).manual_seed(params[0].seed)

    def combine(logits, step):
        knowledge, tuned, reference = (x[:, :vocab] for x in logits)      # [B, V] each
        return eager_eft_sample(knowledge, tuned, reference, temperature=params[0].temperature,
                                weight_top_p=params[0].weight_top_p, generator=gen)

    with profiled(profiler), _Timed(device) as timer:
        outputs = naive_batched_generate(trio, prompts, profiler.timed(combine, "sampling"),
                                         [sp.max_tokens for sp in params])
    column.add_time(timer.seconds, timer.cpu_seconds, profiler)
    column.tokens += sum(len(o) for o in outputs)
    column.outputs += outputs


def warm_up(engine: EFTEngine, workload: Workload, settings: BenchSettings) -> None:
    """One short request, long enough for a full-length speculative round (which builds the
    verify step); with "auto" speculation, for every draft length's measurements."""
    prompts = workload.prompts[:1]
    # "auto" measures each draft length twice at a batch size before it chooses: long enough
    # for that at batch 1 (other batch sizes learn during their timed runs, as in production).
    max_tokens = 64 if engine.config.adaptive_speculation else engine.config.max_draft_len + 3
    engine.generate(prompts, sampling_params(Workload("", "", 1, prompts, 0), settings, max_tokens=max_tokens))


# ---- the whole benchmark --------------------------------------------------------------------
def run_engine_benchmark(models: BenchModels, settings: BenchSettings, device, progress: bool = True
                         ) -> list[WorkloadResult]:
    """Every column of both workloads.

    At batch 1 the columns take turns prompt by prompt (each prompt is generated by every
    column before the next prompt), so a change in machine load over the run hits all columns
    alike; the concurrent workload runs column after column. Exact speculative columns are
    checked token for token against eft_fast EFT.
    """
    workloads = make_workloads(models, settings)
    batch1 = workloads[0]
    results = [WorkloadResult(w) for w in workloads]
    engines = {}
    for key, label, config in ENGINE_COLUMNS:
        engines[key] = make_engine(models, key, workloads, **config)
        warm_up(engines[key], batch1, settings)
    runs = len(batch1.prompts) * (len(ENGINE_COLUMNS) + 1) + (len(ENGINE_COLUMNS) + 2) + (len(MIXED_COLUMNS) + 1) + 2
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=runs, unit="run", desc="engine benchmark")

    def column_of(result: WorkloadResult, key: str, label: str, **kw) -> Column:
        return result.columns.setdefault(key, Column(key, label, **kw))

    def advance(result: WorkloadResult, column: Column) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{result.workload.name}: {column.label} {column.tokens_per_s:.1f} tok/s")
            bar.update(1)

    def engine_column(result, key, label, engine, prompts, params, together):
        column = column_of(result, key, label, k=engine.config.speculative_k,
                           accept=engine.config.accept if engine.config.max_draft_len else None)
        run_engine(engine, column, prompts, params, together, device)
        advance(result, column)

    def naive_column(result, prompts, params):
        column = column_of(result, "naive", "naive EFT loop")
        run_naive(models, column, prompts, params, device)
        advance(result, column)

    def naive_batched_column(result, prompts, params):
        column = column_of(result, "naive_batched", "naive batched loop")
        run_naive_batched(models, column, prompts, params, device)
        advance(result, column)

    for result in results:
        w = result.workload
        params = sampling_params(w, settings)
        if w.concurrency == 1:
            for i, prompt in enumerate(w.prompts):
                for key, label, _ in ENGINE_COLUMNS:
                    engine_column(result, key, label, engines[key], [prompt], [params[i]], False)
                naive_column(result, [prompt], [params[i]])
        elif w.lengths is None:
            for key, label, _ in ENGINE_COLUMNS:
                engine_column(result, key, label, engines[key], w.prompts, params, True)
            naive_column(result, w.prompts, params)
            naive_batched_column(result, w.prompts, params)
        else:
            for key, label, _ in ENGINE_COLUMNS:
                if key in MIXED_COLUMNS:
                    engine_column(result, key, label, engines[key], w.prompts, params, True)
            naive_batched_column(result, w.prompts, params)
    engines.clear()
    gc.collect()
    for result in results:
        k = result.best_exact_k()
        if k is None:
            continue
        engine = make_engine(models, "rejection", workloads, speculative_k=k, accept="rejection")
        warm_up(engine, batch1, settings)
        engine_column(result, "rejection", "rejection, best k", engine, result.workload.prompts,
                      sampling_params(result.workload, settings), result.workload.concurrency > 1)
        del engine
        gc.collect()
    if bar is not None:
        bar.close()
    for result in results:
        reference = result.columns["eft"].outputs
        for column in result.columns.values():
            if column.accept == "exact":
                column.identical = column.outputs == reference
    return results
