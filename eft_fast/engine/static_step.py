"""Fixed-shape steps over static buffers, captured as CUDA graphs on GPU.

Decode (1 token per sequence) and verify (k+1 tokens per sequence) steps have a fixed
number of new tokens per sequence, so their inputs fit static buffers sized for the
largest batch bucket. On CUDA, one graph per batch-size bucket is captured (largest
first) and replayed after the buffers are refilled; every static step of the engine on a
device captures into one memory pool (GraphPools). A graph writes its logits into the step's
one static logits buffer (a copy inside the graph): handing out each bucket's own output
instead would keep a logits tensor per bucket alive, about 8.6x the largest bucket's at
max_num_seqs = 256 (times the verify steps of "auto" speculation). On CPU the very same
buffer code runs eagerly (returning the forward's logits, no copy), so its logic is tested
without a GPU.

Padding rows (a batch of n < bucket sequences) write to the dummy slot and attend to the
dummy block; their logits are never read. No host sync happens inside a captured region.
"""
from __future__ import annotations

import torch

from .model_runner import ModelRunner, SequenceStep


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to ``max_batch`` (always included)."""
    out = [b for b in (1, 2, 4, 8) if b < max_batch]
    out.extend(range(16, max_batch, 16))
    out.append(max_batch)
    return sorted(set(out))


def bucket_for(buckets: list[int], n: int) -> int | None:
    """The smallest of the sorted ``buckets`` that holds ``n`` sequences (None: none does)."""
    return next((b for b in buckets if b >= n), None)


class GraphPools:
    """One CUDA-graph memory pool per device, shared by every static step of an engine. Every
    graph's inputs and output buffer live outside the pool, so the graphs share only their
    intermediates, which no graph reads across replays: any replay order is safe."""

    def __init__(self):
        self._pools: dict[torch.device, tuple] = {}

    def get(self, device: torch.device):
        """The pool handle of ``device`` (None off CUDA)."""
        if device.type != "cuda":
            return None
        if device not in self._pools:
            with torch.cuda.device(device):
                self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]


class StaticStep:
    """Runs steps where every sequence brings exactly ``query_len`` new tokens.

    Args:
        runner: the model's runner (its pool, block size and model).
        query_len: new tokens per sequence (1 = decode, k + 1 = verify).
        max_batch: the largest number of sequences per step.
        use_cuda_graph: capture graphs (default: on when the model is on CUDA).
        pad_to_bucket: run the bucket's padded batch, as a graph replay does (default: with
            graphs). Eager runs without it compute only the real rows.
        graph_pools: the engine's per-device pools to capture into (default: this step's own).
    """

    def __init__(self, runner: ModelRunner, query_len: int, max_batch: int, use_cuda_graph: bool | None = None,
                 pad_to_bucket: bool | None = None, graph_pools: GraphPools | None = None):
        if query_len < 1 or max_batch < 1:
            raise ValueError(f"query_len and max_batch must be >= 1, got {query_len}, {max_batch}")
        self.runner = runner
        self.query_len = query_len
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        # A sharded runner broadcasts each step from the host first: it runs eagerly.
        self.use_cuda_graph = runner.supports_cuda_graph and \
            (runner.device.type == "cuda" if use_cuda_graph is None else use_cuda_graph)
        self.pad_to_bucket = self.use_cuda_graph if pad_to_bucket is None else pad_to_bucket
        dev, q, b = runner.device, query_len, self.max_batch
        i64, i32 = dict(dtype=torch.int64, device=dev), dict(dtype=torch.int32, device=dev)
        # Static inputs: [max_batch * query_len] per token, [max_batch, ...] per sequence.
        self.input_ids = torch.zeros(b * q, **i64)
        self.positions = torch.zeros(b * q, **i64)
        self.write_slots = torch.full((b * q,), runner.kv_cache.dummy_slot, **i64)
        self.block_tables = torch.full((b, runner.max_blocks_per_seq), runner.kv_cache.dummy_block, **i32)
        self.seq_lens = torch.full((b,), q, **i32)
        self.query_start_loc = torch.arange(b + 1, **i32) * q   # constant: q tokens per sequence
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # The graphs' output: logits [max_batch * q, V], rewritten by every replay.
        self.logits = torch.zeros(b * q, runner.vocab_width, dtype=runner.dtype, device=dev) \
            if self.use_cuda_graph else None
        if self.use_cuda_graph:
            self._capture(graph_pools.get(dev) if graph_pools is not None else None)

    def bucket_for(self, n: int) -> int:
        bucket = bucket_for(self.buckets, n)
        if bucket is None:
            raise ValueError(f"a static step holds at most {self.max_batch} sequences, got {n}")
        return bucket

    def _forward(self, bucket: int, max_kv_len: int | None) -> torch.Tensor:
        """The model on the first ``bucket`` rows of the buffers; logits [bucket * q, V]."""
        n_tok = bucket * self.query_len
        meta = self.runner.metadata(self.write_slots[:n_tok], self.block_tables[:bucket], self.seq_lens[:bucket],
                                    self.query_start_loc[:bucket + 1], n_tok, self.query_len, max_kv_len)
        return self.runner.run_model(self.input_ids[:n_tok], self.positions[:n_tok], meta)

    def _capture(self, pool) -> None:
        """Capture one graph per bucket on the model's device (made current for the capture, so
        that the warm-up and capture streams belong to it even when another device is current),
        into ``pool`` (None: a pool of this step's own, made by its first capture)."""
        with torch.cuda.device(self.runner.device):
            for bucket in reversed(self.buckets):           # largest first: later graphs reuse its pool
                stream = torch.cuda.Stream(device=self.runner.device)
                stream.wait_stream(torch.cuda.current_stream(self.runner.device))
                with torch.cuda.stream(stream), torch.inference_mode():
                    for _ in range(2):                       # warm up (Triton autotune / lazy init)
                        self._forward(bucket, None)
                torch.cuda.current_stream(self.runner.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool), torch.inference_mode():
                    self.logits[:bucket * self.query_len].copy_(self._forward(bucket, None))
                pool = graph.pool() if pool is None else pool
                self.graphs[bucket] = graph
        self._reset_padding(self.max_batch)

    def _reset_padding(self, n: int) -> None:
        """Point token rows ``n * q`` onwards and sequence rows ``n`` onwards at the dummy block."""
        q, kv = self.query_len, self.runner.kv_cache
        self.input_ids[n * q:].zero_()
        self.positions[n * q:].copy_(torch.arange(q, device=self.positions.device).repeat(self.max_batch - n))
        self.write_slots[n * q:].fill_(kv.dummy_slot)
        self.block_tables[n:].fill_(kv.dummy_block)
        self.seq_lens[n:].fill_(q)

    @torch.inference_mode()
    def forward(self, steps: list[SequenceStep]) -> torch.Tensor:
        """Run ``steps`` (each with exactly ``query_len`` tokens).

        Returns logits [len(steps) * query_len, vocab_width], packed in step order: with a
        graph, a view of the static logits buffer, which the next call overwrites. Advances
        each table's ``num_tokens``.
        """
        n = len(steps)
        if n == 0:
            raise ValueError("forward needs at least one sequence")
        for i, step in enumerate(steps):
            if len(step.token_ids) != self.query_len:
                raise ValueError(f"sequence {i} brings {len(step.token_ids)} tokens; this static step takes "
                                 f"exactly {self.query_len}")
        bucket = self.bucket_for(n)            # also checks n <= max_batch
        if not self.pad_to_bucket:
            bucket = n
        lay = self.runner.layout(steps)
        q = self.query_len
        n_tok = n * q
        self.input_ids[:n_tok].copy_(torch.tensor(lay.input_ids, dtype=torch.int64), non_blocking=True)
        self.positions[:n_tok].copy_(torch.tensor(lay.positions, dtype=torch.int64), non_blocking=True)
        self.write_slots[:n_tok].copy_(torch.tensor(lay.slots, dtype=torch.int64), non_blocking=True)
        self.block_tables[:n].copy_(torch.tensor(self.runner.padded_tables(lay.block_tables, n),
                                                 dtype=torch.int32), non_blocking=True)
        self.seq_lens[:n].copy_(torch.tensor(lay.seq_lens, dtype=torch.int32), non_blocking=True)
        self._reset_padding(n)
        if bucket in self.graphs:
            with torch.cuda.device(self.runner.device):     # the graph's device, whichever is current
                self.graphs[bucket].replay()
            logits = self.logits[:n_tok]
        else:
            logits = self._forward(bucket, max(lay.seq_lens))[:n_tok]
        for step in steps:
            step.table.num_tokens += q
        return logits
