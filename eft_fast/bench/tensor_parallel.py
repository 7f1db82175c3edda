"""`eft-fast bench --tensor-parallel-size N`: the knowledge model sharded over N ranks against one.

eft_fast EFT (no speculation) on the concurrent workload, at tensor_parallel_size 1 and N, on the
same models and requests: tokens/s, rank 0's time in the step broadcast per knowledge forward,
and whether the tokens agree. Tensor parallelism loads the knowledge model from a path, so it is
saved to a temporary directory first (with a word-level tokenizer when the models have none).
"""
from __future__ import annotations

import tempfile
import time

from ..engine.engine import EFTEngine
from ..engine.parallel import runner as tp_runner
from .workloads import BenchModels, BenchSettings, make_workloads, sampling_params


def word_level_tokenizer(vocab_size: int):
    """A tokenizer with ids 0..vocab_size-1 ("w0", "w1", ...): the engine checks vocabularies by id."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")))


class _TimedBroadcast:
    """Stands in for the runner's step broadcast and adds up rank 0's time in it."""

    def __init__(self, broadcast):
        self.broadcast, self.calls, self.seconds = broadcast, 0, 0.0

    def __call__(self, step) -> None:
        start = time.perf_counter()
        self.broadcast(step)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def run_tensor_parallel_benchmark(models: BenchModels, settings: BenchSettings, device, tp_size: int) -> dict:
    """{"rows": [{tensor_parallel_size, tokens, seconds, tokens_per_s, broadcast_ms}], "identical": bool}."""
    workload = max(make_workloads(models, settings), key=lambda w: w.concurrency)
    params = sampling_params(workload, settings)
    tokenizer = models.tokenizer if models.tokenizer is not None else word_level_tokenizer(models.vocab_size)
    timer = _TimedBroadcast(tp_runner.broadcast_step)
    rows, outputs = [], []
    saved, tp_runner.broadcast_step = tp_runner.broadcast_step, timer
    try:
        with tempfile.TemporaryDirectory() as path:
            models.knowledge.save_pretrained(path)
            for tp in (1, tp_size):
                with EFTEngine(knowledge=path, tuned=models.tuned, reference=models.reference, tokenizer=tokenizer,
                               device=device, max_num_seqs=workload.concurrency, tensor_parallel_size=tp) as engine:
                    engine.generate(workload.prompts[:1], params[0])          # warm up
                    timer.calls, timer.seconds = 0, 0.0
                    start = time.perf_counter()
                    outs = engine.generate(workload.prompts, params)
                    seconds = time.perf_counter() - start
                tokens = sum(len(o.token_ids) for o in outs)
                outputs.append([o.token_ids for o in outs])
                rows.append({"tensor_parallel_size": tp, "tokens": tokens, "seconds": seconds,
                             "tokens_per_s": tokens / seconds,
                             "broadcast_ms": 1e3 * timer.seconds / timer.calls if timer.calls else None,
                             "knowledge_forwards": timer.calls or None})
    finally:
        tp_runner.broadcast_step = saved
    return {"workload": workload.name, "rows": rows, "identical": outputs[0] == outputs[1]}


def format_table(result: dict) -> str:
    lines = [f"{result['workload']}: eft_fast EFT, no speculation",
             "tensor_parallel_size  tokens/s  vs 1  step broadcast (ms/forward)"]
    base = result["rows"][0]["tokens_per_s"]
    for row in result["rows"]:
        ms = "-" if row["broadcast_ms"] is None else f"{row['broadcast_ms']:.2f}"
        lines.append(f"{row['tensor_parallel_size']:>20}  {row['tokens_per_s']:8.1f}  "
                     f"{row['tokens_per_s'] / base:4.2f}  {ms:>27}")
    lines.append(f"tokens identical: {result['identical']}")
    return "\n".join(lines)
