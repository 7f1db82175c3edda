"""Start and stop the ranks of a tensor-parallel knowledge model.

Rank 0 is the driver (the process that runs the engine). Two ways to get the other ranks:

- self-spawned (``TensorParallelGroup.start``): the driver spawns ranks 1..N-1 as worker
  processes (the "spawn" start method, as vLLM does: a script that builds an engine needs the
  ``if __name__ == "__main__":`` guard) and joins them in one process group on 127.0.0.1;
- an external launcher (``TensorParallelGroup.join_launched``): under ``torchrun`` every rank
  runs the same program and the group comes from its environment (RANK, WORLD_SIZE,
  MASTER_ADDR, ...), on one node or several.

gloo for CPU models, NCCL with ``cuda:local_rank`` for CUDA ones; every collective has the
group's timeout. ``close()`` stops the workers (a stop message, then, for spawned ones,
terminate if they do not exit) and destroys the group; a worker also exits on its own when the
driver's connection closes, so none survives the driver.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .protocol import broadcast_stop

_JOIN_TIMEOUT_S = 10.0
MAX_RESTARTS = 3        # restarts of one engine's workers before a failure stops the engine


class TensorParallelError(RuntimeError):
    """The tensor-parallel group failed (a worker died or a collective timed out).

    ``recoverable``: a worker reported an exception in its forward (a bug, out of memory)
    before it exited, the group was self-spawned on CPU (gloo, where rank 0's pending
    collective fails as soon as the worker's connection closes), and it has not been
    restarted MAX_RESTARTS times yet: the engine can restart the workers and go on. Otherwise
    (a worker killed without a word, a collective timeout, torchrun's ranks, NCCL, whose
    failure handling has not been tried on GPUs yet) the engine stops its workers."""

    def __init__(self, message: str, *, recoverable: bool = False):
        super().__init__(message)
        self.recoverable = recoverable


@dataclass(frozen=True)
class ShardSpec:
    """What every rank needs to load its shard and build its KV pool (picklable)."""

    knowledge: str
    dtype: object
    device_type: str               # "cpu" or "cuda"
    block_size: int
    num_blocks: int | None
    kv_cache_bytes: int | None
    max_model_len: int | None
    max_num_seqs: int
    num_threads: int
    timeout_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device_type: str, local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")


def init_rank(rank: int, world_size: int, init_method: str, spec: ShardSpec, local_rank: int | None = None) -> None:
    """Join the group as ``rank`` (every rank, the driver included, calls this)."""
    local_rank = rank if local_rank is None else local_rank
    if spec.device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if spec.device_type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=spec.timeout_s))


def launched_rank(tp_size: int) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when an external launcher (torchrun) started this process
    as one of several ranks, else None. The launch must have exactly ``tp_size`` ranks."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if world != tp_size:
        raise ValueError(f"this process was launched as one of WORLD_SIZE={world} ranks, but "
                         f"tensor_parallel_size={tp_size}; launch exactly tensor_parallel_size ranks")
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def agree_min(value: int, device: torch.device) -> int:
    """The smallest ``value`` over every rank (the KV pool size all ranks use)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


class TensorParallelGroup:
    """The driver's handle on the group: its workers, its device, and how to stop them."""

    def __init__(self, spec: ShardSpec, world_size: int, workers: list, errors=None):
        self.spec = spec
        self.world_size = world_size
        self.workers = workers
        self.errors = errors                 # the spawned workers' failure messages
        self.device = rank_device(spec.device_type, 0)
        self.broken: BaseException | None = None
        self.serving = False     # every rank built its pool and waits for steps: stop is a message
        self.closed = False
        self.spawned = False     # ranks 1..N-1 are this process's children (restartable)
        self.restarts = 0

    @classmethod
    def start(cls, spec: ShardSpec, world_size: int) -> "TensorParallelGroup":
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1 starts its own process group, but this process is already "
                             "in one; close the other engine (or destroy the group) first")
        group = cls(spec, world_size, [], None)
        group.spawned = True
        try:
            group._spawn_and_join()
        except BaseException:
            group.close()
            raise
        return group

    def _spawn_and_join(self) -> None:
        """Start ranks 1..N-1 as worker processes and form the group with them on a free port."""
        port = _free_port()
        ctx = mp.get_context("spawn")
        self.errors = ctx.SimpleQueue()
        target = self.worker_entry()
        self.workers = [ctx.Process(target=target, args=(rank, self.world_size, port, self.spec, self.errors),
                                    daemon=True, name=f"eft_fast-tp-worker-{rank}") for rank in range(1, self.world_size)]
        for w in self.workers:
            w.start()
        self._join_watching_workers(port)

    @staticmethod
    def worker_entry():
        """The function a spawned worker runs (importable by name in the child)."""
        from .worker import run_worker

        return run_worker

    def restart(self) -> None:
        """After a recoverable failure: stop what is left of the workers, leave the broken
        group, spawn new workers and form a new group with them. They load their shards and
        wait to agree on the KV pool size (the caller reloads rank 0's shard, then calls
        :meth:`agree_num_blocks`). Raises TensorParallelError if the group cannot be rebuilt."""
        if not self.spawned or self.closed:
            raise TensorParallelError("only a self-spawned, open tensor-parallel group can be restarted")
        self._stop_workers(orderly=False)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:   # noqa: BLE001 - the group is broken anyway; a new one replaces it
                pass
        self.broken, self.serving = None, False
        self.restarts += 1
        if self.errors is not None:
            self.errors.close()
        try:
            self._spawn_and_join()
        except BaseException as e:
            self.broken = TensorParallelError(f"restarting the tensor-parallel workers failed: {type(e).__name__}: {e}")
            raise self.broken from e

    def _join_watching_workers(self, port: int) -> None:
        """init_process_group as rank 0, in a thread, while watching the workers: one that dies
        before it joins (e.g. a script without the ``if __name__ == "__main__":`` guard) is an
        error at once instead of a wait for the whole timeout."""
        failure: list[BaseException] = []

        def join() -> None:
            try:
                init_rank(0, self.world_size, f"tcp://127.0.0.1:{port}", self.spec)
            except BaseException as e:   # noqa: BLE001 - handed to the caller
                failure.append(e)

        thread = threading.Thread(target=join, daemon=True, name="eft_fast-tp-rendezvous")
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            dead = [(w.name, w.exitcode) for w in self.workers if w.exitcode is not None]
            if dead and thread.is_alive():
                raise TensorParallelError(
                    f"tensor-parallel worker(s) {dead} exited before joining the group (a script that builds a "
                    "tensor-parallel engine needs the `if __name__ == \"__main__\":` guard: workers are spawned)")
        if failure:
            raise failure[0]

    @classmethod
    def join_launched(cls, spec: ShardSpec, world_size: int, local_rank: int) -> "TensorParallelGroup":
        """Rank 0 of a group an external launcher started (its workers are not ours to join)."""
        if not dist.is_initialized():
            init_rank(0, world_size, "env://", spec, local_rank)
        group = cls(spec, world_size, [])
        group.device = rank_device(spec.device_type, local_rank)
        return group

    def load_kwargs(self) -> dict:
        """from_pretrained arguments that load this rank's shard of the knowledge model."""
        from transformers import DistributedConfig

        return {"distributed_config": DistributedConfig(tp_size=self.world_size)}

    def agree_num_blocks(self, num_blocks: int) -> int:
        """The pool size every rank uses; from here on every rank serves steps."""
        try:
            agreed = agree_min(num_blocks, self.device)
        except Exception as e:   # a worker failed while loading: its report says why
            raise self.fail(e) from e
        self.serving = True
        return agreed

    def check(self) -> None:
        """Raise TensorParallelError if the group can no longer run a step."""
        if self.closed:
            raise TensorParallelError("the engine is closed: its tensor-parallel workers are stopped")
        if self.broken is not None:
            raise TensorParallelError(f"the tensor-parallel group failed earlier: {self.broken}")
        dead = [(w.name, w.exitcode) for w in self.workers if not w.is_alive()]
        if dead:     # between two steps; fail() reads what the worker reported before it exited
            raise self.fail(TensorParallelError(f"worker(s) exited: {dead}"))

    def fail(self, exc: BaseException) -> TensorParallelError:
        """Record that a collective failed; the error to raise (the group is unusable), with
        what the workers that failed reported."""
        reports = []
        while self.errors is not None and not self.errors.empty():
            reports.append(self.errors.get())
        dead = [(w.name, w.exitcode) for w in self.workers if not w.is_alive()]
        detail = "".join(f"; {r}" for r in reports) + (f"; exited: {dead}" if dead else "")
        # A worker that reported its exception exited on purpose; a silent death or a timeout
        # (a hung rank) is not worth a restart loop.
        recoverable = self.spawned and bool(reports) and self.spec.device_type == "cpu" and \
            self.restarts < MAX_RESTARTS
        self.broken = TensorParallelError(f"the tensor-parallel group failed: {type(exc).__name__}: {exc}{detail}",
                                          recoverable=recoverable)
        return self.broken

    def close(self) -> None:
        """Stop the workers and leave the group; safe to call twice, and after a failure.

        Workers that serve get the stop message; workers that cannot take it (still loading,
        or stuck in a collective of a failed step) are terminated at once."""
        if self.closed:
            return
        self.closed = True
        orderly = self.serving and self.broken is None and all(w.is_alive() for w in self.workers)
        if orderly:
            try:
                broadcast_stop(self.device)
            except Exception:   # a worker died meanwhile: terminate below
                orderly = False
        self._stop_workers(orderly)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _stop_workers(self, orderly: bool) -> None:
        """Wait for workers that were told to stop (``orderly``); terminate, then kill, the rest."""
        for w in self.workers:
            if orderly:
                w.join(_JOIN_TIMEOUT_S)
            if w.is_alive():
                w.terminate()
                w.join(_JOIN_TIMEOUT_S)
            if w.is_alive():
                w.kill()
                w.join()
