"""A worker rank (1..N-1): load this rank's shard, then run the forwards rank 0 broadcasts."""
from __future__ import annotations

import logging
import os
import sys

import torch

from .group import ShardSpec, agree_min, init_rank, rank_device
from .protocol import receive_step

logger = logging.getLogger(__name__)


def run_worker(rank: int, world_size: int, port: int, spec: ShardSpec, errors=None) -> None:
    """Process entry point of a self-spawned worker; ``errors`` (a queue) gets its failure."""
    torch.set_num_threads(spec.num_threads)
    init_rank(rank, world_size, f"tcp://127.0.0.1:{port}", spec)
    serve_until_stopped(rank, world_size, spec, rank=rank, errors=errors)


def run_launched_worker(rank: int, world_size: int, local_rank: int, spec: ShardSpec) -> None:
    """A rank > 0 that an external launcher (torchrun) started: serve, then leave the group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        init_rank(rank, world_size, "env://", spec, local_rank)
    serve_until_stopped(local_rank, world_size, spec, rank=rank)


def serve_until_stopped(local_rank: int, world_size: int, spec: ShardSpec, *, rank: int, errors=None) -> None:
    """Serve until rank 0 sends stop, then leave the group.

    An exception (a failed forward, CUDA out of memory) leaves this rank's collectives out of
    step with the others, so the group cannot go on: the rank reports it (log, and ``errors``)
    and exits at once. Its closed connection makes rank 0's pending collective fail within
    seconds instead of at the timeout, and rank 0 raises TensorParallelError naming it.
    """
    import torch.distributed as dist

    try:
        serve(build_shard_runner(local_rank, world_size, spec))
    except BaseException as exc:   # noqa: BLE001 - any failure ends this rank
        message = f"tensor-parallel rank {rank} failed: {type(exc).__name__}: {exc}"
        logger.error(message, exc_info=exc)
        if errors is not None:
            errors.put(message)
        sys.stderr.flush()
        os._exit(1)                # no cleanup: a collective with the other ranks could hang
    dist.destroy_process_group()


def build_shard_runner(local_rank: int, world_size: int, spec: ShardSpec):
    """This rank's shard of the knowledge model and its KV pool (the same calls, in the same
    order, as the driver makes: loading and pool sizing run collectives)."""
    from transformers import DistributedConfig

    from ..loading import load_model
    from ..model_runner import ModelRunner

    device = rank_device(spec.device_type, local_rank)
    model = load_model(spec.knowledge, role="knowledge", dtype=spec.dtype,
                       distributed_config=DistributedConfig(tp_size=world_size))
    return ModelRunner(model, block_size=spec.block_size, num_blocks=spec.num_blocks,
                       kv_cache_bytes=spec.kv_cache_bytes, max_model_len=spec.max_model_len,
                       max_num_seqs=spec.max_num_seqs, role="knowledge",
                       agree_num_blocks=lambda n: agree_min(n, device))


@torch.inference_mode()
def serve(runner) -> None:
    """Run every broadcast step on this rank's shard until rank 0 sends stop."""
    while (step := receive_step(runner.device)) is not None:
        meta = runner.metadata(step.write_slots, step.block_tables, step.seq_lens, step.query_start_loc,
                               step.input_ids.numel(), step.max_query_len, step.max_kv_len)
        runner.run_model(step.input_ids, step.positions, meta, step.logits_to_keep)
