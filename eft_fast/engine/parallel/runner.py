"""Rank 0's runner of the sharded knowledge model."""
from __future__ import annotations

import torch

from ..attention import PagedAttentionMetadata
from ..model_runner import ModelRunner
from .group import TensorParallelError, TensorParallelGroup
from .protocol import Step, broadcast_step


class TensorParallelRunner(ModelRunner):
    """A :class:`ModelRunner` whose every forward is first broadcast to the other ranks,
    which run their shards alongside (each forward's collectives pair up across ranks).
    Its KV pool holds this rank's KV heads, in as many blocks as every rank has. The step
    broadcast starts on the host, so its steps run eagerly (no CUDA graphs yet)."""

    supports_cuda_graph = False

    def __init__(self, model, group: TensorParallelGroup, **kwargs):
        super().__init__(model, agree_num_blocks=group.agree_num_blocks, **kwargs)
        self.group = group

    def reload(self, model) -> None:
        """Take rank 0's freshly loaded shard after :meth:`TensorParallelGroup.restart`, and
        agree the pool size with the new workers (the same number of blocks as before, or
        TensorParallelError). The pool's contents are stale: the caller recomputes every
        request that held blocks."""
        self._use_model(model)
        agreed = self.group.agree_num_blocks(self.blocks.num_blocks)
        if agreed != self.blocks.num_blocks:
            raise self.group.fail(TensorParallelError(
                f"the restarted workers hold {agreed} KV blocks, rank 0 holds {self.blocks.num_blocks}"))

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: PagedAttentionMetadata,
                  logits_to_keep: torch.Tensor | int = 0) -> torch.Tensor:
        self.group.check()
        step = Step(input_ids, positions, metadata.write_slots, metadata.block_tables, metadata.seq_lens,
                    metadata.query_start_loc, metadata.max_query_len, metadata.max_kv_len, logits_to_keep)
        try:
            broadcast_step(step)
            return super().run_model(input_ids, positions, metadata, logits_to_keep)
        except Exception as e:   # after the broadcast the ranks' collectives no longer pair up
            raise self.group.fail(e) from e
        except BaseException as e:   # interrupted mid-forward: the group is just as unusable
            self.group.fail(e)
            raise
