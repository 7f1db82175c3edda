"""The step message: what a knowledge-model forward needs, broadcast from rank 0 as tensors.

Two broadcasts per forward: a fixed header ``[8] int64`` (op and sizes), then one int64
payload that packs the step's tensors end to end. No pickling on the hot path.

    header  = [op, T, S, W, max_query_len, max_kv_len (-1: None), K (-1: every row), 0]
    payload = input_ids [T] | positions [T] | write_slots [T] | block_tables [S * W]
              | seq_lens [S] | query_start_loc [S + 1] | logits_to_keep [K]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

OP_STOP, OP_FORWARD = 0, 1
HEADER_LEN = 8


@dataclass
class Step:
    """One forward's inputs (host ints and [..] tensors, see the module docstring)."""

    input_ids: torch.Tensor         # [T] int64
    positions: torch.Tensor         # [T] int64
    write_slots: torch.Tensor       # [T] int64
    block_tables: torch.Tensor      # [S, W] int32
    seq_lens: torch.Tensor          # [S] int32
    query_start_loc: torch.Tensor   # [S + 1] int32
    max_query_len: int
    max_kv_len: int | None
    logits_to_keep: torch.Tensor | int   # [K] int64 row indices, or 0 = every row


def broadcast_step(step: Step) -> None:
    """Rank 0: send ``step`` to every rank."""
    t, (s, w) = step.input_ids.numel(), step.block_tables.shape
    keep = step.logits_to_keep
    if isinstance(keep, int) and keep != 0:
        raise ValueError(f"logits_to_keep must be 0 (every row) or a tensor of row indices, got {keep}")
    keep_len = -1 if isinstance(keep, int) else keep.numel()
    device = step.input_ids.device
    header = torch.tensor([OP_FORWARD, t, s, w, step.max_query_len,
                           -1 if step.max_kv_len is None else step.max_kv_len, keep_len, 0],
                          dtype=torch.int64, device=device)
    parts = [step.input_ids, step.positions, step.write_slots, step.block_tables.flatten(), step.seq_lens,
             step.query_start_loc] + ([] if keep_len < 0 else [keep])
    payload = torch.cat([p.to(torch.int64) for p in parts])
    dist.broadcast(header, src=0)
    dist.broadcast(payload, src=0)


def broadcast_stop(device: torch.device) -> None:
    """Rank 0: end every worker's loop."""
    header = torch.zeros(HEADER_LEN, dtype=torch.int64, device=device)
    header[0] = OP_STOP
    dist.broadcast(header, src=0)


def receive_step(device: torch.device) -> Step | None:
    """Ranks > 0: the next step, or None when rank 0 sent stop."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    op, t, s, w, max_q, max_kv, keep_len, _ = header.tolist()
    if op == OP_STOP:
        return None
    if op != OP_FORWARD:
        raise RuntimeError(f"unknown step message op {op}")
    sizes = [t, t, t, s * w, s, s + 1, max(keep_len, 0)]
    payload = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(payload, src=0)
    ids, pos, slots, tables, seq_lens, qsl, keep = torch.split(payload, sizes)
    i32 = torch.int32
    return Step(ids, pos, slots, tables.view(s, w).to(i32), seq_lens.to(i32), qsl.to(i32), max_q,
                None if max_kv < 0 else max_kv, 0 if keep_len < 0 else keep)
