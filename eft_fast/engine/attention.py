"""Paged attention behind transformers' AttentionInterface.

Models run with ``config._attn_implementation = "eft_paged"`` and get the per-step
:class:`PagedAttentionMetadata` as the keyword argument ``eft_metadata`` of
``model.forward``, which transformers passes down to every attention layer. There is no
``past_key_values`` and no global context: each layer writes the step's new K/V into its
pool slots, then attends over the sequence's blocks.

The name is not registered as a mask function, so transformers builds no dense causal
mask (and makes no host sync for it); causality comes from the metadata.

Token layout: the step's T new tokens of S sequences are packed back to back
(``input_ids [1, T]``); sequence s owns rows ``query_start_loc[s]:query_start_loc[s+1]``,
and those are its last ``q_len`` positions, so one path serves packed prefill, 1-token
decode and (k+1)-token verify.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv_cache import PagedKVCache

ATTENTION_NAME = "eft_paged"


@dataclass
class TorchPathIndices:
    """Gather indices of the CPU (torch) path, built once per step and shared by all layers.

    query_index [S, Qmax] int64: packed row of each (sequence, query column); padding -> 0.
    key_slots   [S, Kmax] int64: pool slot of each (sequence, key position); padding -> dummy.
    mask        [S, 1, Qmax, Kmax] bool: causal and length mask (padding rows see key 0).
    token_seq, token_col [T] int64: where each packed row sits in the [S, Qmax] layout.
    rows [Tg] int64 or None: for a group of the step's sequences (see
        :func:`build_torch_path_indices`), the packed rows its outputs go to; None: all T rows.
    """

    query_index: torch.Tensor
    key_slots: torch.Tensor
    mask: torch.Tensor
    token_seq: torch.Tensor
    token_col: torch.Tensor
    rows: torch.Tensor | None = None


@dataclass
class PagedAttentionMetadata:
    """Everything attention needs for one forward of one model.

    kv_cache: the model's pools.
    write_slots [T] int64: pool slot of each new token; padding rows point at the dummy slot.
    block_tables [S, M] int32: blocks of each sequence (unused entries: the dummy block).
    seq_lens [S] int32: context length of each sequence including the new tokens.
    query_start_loc [S + 1] int32: packed row offsets of the sequences.
    max_query_len: host int >= every sequence's number of new tokens (a launch constant).
    torch_path: gather indices for the CPU path, one per group of sequences (None on GPU,
        where the Triton kernel reads the block tables directly).
    max_kv_len: host int bound on every context length the torch path was built for, or None.
    max_context: the runner's context limit (max_model_len): a sliding window at least this
        wide is plain causal attention.
    """

    kv_cache: PagedKVCache
    write_slots: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    max_query_len: int
    torch_path: list[TorchPathIndices] | None = None
    max_kv_len: int | None = None
    max_context: int | None = None


def build_torch_path_indices(block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                             num_tokens: int, max_query_len: int, max_kv_len: int, block_size: int,
                             dummy_slot: int) -> list[TorchPathIndices]:
    """Gather indices for :func:`torch_paged_attention` from the step's tensors.

    ``num_tokens`` (T), ``max_query_len`` and ``max_kv_len`` are host ints: the packed row
    count, and bounds on every sequence's new-token count and context length. The torch path
    pads every sequence of a group to [Qmax, Kmax]; on the CPU a step that mixes one-token
    (decode) sequences with longer ones (prompt chunks) is split into those two groups, so the
    decode sequences do not pay for the longest chunk's query length. Elsewhere (a captured
    step must not read the device) the step is one group.
    """
    starts = query_start_loc[:-1].to(torch.int64)
    if max_query_len == 1 and num_tokens == starts.shape[0]:     # a decode step: one token per sequence
        return [_decode_indices(block_tables, seq_lens, starts, max_kv_len, block_size, dummy_slot)]
    q_lens = query_start_loc[1:].to(torch.int64) - starts                               # [S]
    if block_tables.device.type == "cpu" and q_lens.numel() > 1:
        q_host, kv_host = q_lens.tolist(), seq_lens.tolist()
        decode = [i for i, q in enumerate(q_host) if q == 1]
        longer = [i for i, q in enumerate(q_host) if q != 1]
        if decode and longer:
            groups = []
            for members in (decode, longer):
                sel = torch.tensor(members, dtype=torch.int64)
                rows = torch.cat([torch.arange(int(starts[i]), int(starts[i]) + q_host[i]) for i in members])
                groups.append(_group_indices(block_tables[sel], seq_lens[sel], starts[sel], q_lens[sel],
                                             max(q_host[i] for i in members), max(kv_host[i] for i in members),
                                             block_size, dummy_slot, rows))
            return groups
    return [_group_indices(block_tables, seq_lens, starts, q_lens, max_query_len, max_kv_len, block_size, dummy_slot,
                           None, num_tokens)]


def _key_slots(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_kv_len: int, block_size: int,
               dummy_slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key positions [Kmax], valid [S, Kmax] bool, pool slot of each (sequence, key position)
    [S, Kmax] int64, the dummy slot past a sequence's length); seq_lens int64."""
    key_pos = torch.arange(max_kv_len, device=block_tables.device)                      # [Kmax]
    block_idx = (key_pos // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables.to(torch.int64)[:, block_idx] * block_size + key_pos % block_size  # [S, Kmax]
    valid_k = key_pos[None, :] < seq_lens[:, None]                                       # [S, Kmax]
    return key_pos, valid_k, torch.where(valid_k, slots, torch.full_like(slots, dummy_slot))


def _decode_indices(block_tables: torch.Tensor, seq_lens: torch.Tensor, starts: torch.Tensor, max_kv_len: int,
                    block_size: int, dummy_slot: int) -> TorchPathIndices:
    """:func:`_group_indices` for a step whose every sequence brings exactly one token (the
    query sits at position seq_len - 1 and sees every key before it): the same indices from
    fewer ops, since decode steps are the engine's most frequent ones."""
    device = block_tables.device
    _, valid_k, key_slots = _key_slots(block_tables, seq_lens.to(torch.int64), max_kv_len, block_size, dummy_slot)
    num_seqs = starts.shape[0]
    return TorchPathIndices(starts[:, None], key_slots, valid_k[:, None, None, :],
                            torch.arange(num_seqs, device=device), torch.zeros(num_seqs, dtype=torch.int64, device=device),
                            None)


def _group_indices(block_tables: torch.Tensor, seq_lens: torch.Tensor, starts: torch.Tensor, q_lens: torch.Tensor,
                   max_query_len: int, max_kv_len: int, block_size: int, dummy_slot: int,
                   rows: torch.Tensor | None, num_tokens: int | None = None) -> TorchPathIndices:
    """The indices of one group: sequences with packed row offsets ``starts`` and ``q_lens``
    new tokens each (torch ops only)."""
    device = block_tables.device
    seq_lens = seq_lens.to(torch.int64)
    cols = torch.arange(max_query_len, device=device)                                   # [Qmax]
    valid_q = cols[None, :] < q_lens[:, None]                                           # [S, Qmax]
    query_index = torch.where(valid_q, starts[:, None] + cols[None, :], torch.zeros_like(valid_q, dtype=torch.int64))

    key_pos, valid_k, key_slots = _key_slots(block_tables, seq_lens, max_kv_len, block_size, dummy_slot)

    # query column c of sequence s is at position seq_len - q_len + c
    q_pos = seq_lens[:, None] - q_lens[:, None] + cols[None, :]                          # [S, Qmax]
    mask = (key_pos[None, None, :] <= q_pos[:, :, None]) & valid_k[:, None, :]          # [S, Qmax, Kmax]
    # padding query columns attend to key 0 only, so their softmax stays finite
    mask = mask | (~valid_q[:, :, None] & (key_pos == 0)[None, None, :])

    count = rows.shape[0] if rows is not None else num_tokens
    token_seq = torch.repeat_interleave(torch.arange(q_lens.shape[0], device=device), q_lens, output_size=count)
    group_starts = torch.cumsum(q_lens, 0) - q_lens                                     # the group's own packing
    token_col = torch.arange(token_seq.shape[0], device=device) - group_starts[token_seq]
    return TorchPathIndices(query_index, key_slots, mask[:, None], token_seq, token_col, rows)


def torch_paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          groups: list[TorchPathIndices], scale: float) -> torch.Tensor:
    """query [T, Hq, D]; key/value_cache [num_blocks + 1, block_size, Hkv, D] -> [T, Hq, D]."""
    num_kv_heads, head_dim = key_cache.shape[-2:]
    out = None if groups[0].rows is None else torch.empty_like(query)
    for indices in groups:
        q = query[indices.query_index].transpose(1, 2)                                  # [S, Hq, Qmax, D]
        k = key_cache.view(-1, num_kv_heads, head_dim)[indices.key_slots].transpose(1, 2)   # [S, Hkv, Kmax, D]
        v = value_cache.view(-1, num_kv_heads, head_dim)[indices.key_slots].transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=indices.mask, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])       # [S, Hq, Qmax, D]
        rows = attn.transpose(1, 2)[indices.token_seq, indices.token_col]               # [Tg, Hq, D]
        if indices.rows is None:
            return rows
        out[indices.rows] = rows
    return out


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, eft_metadata: PagedAttentionMetadata | None = None, **kwargs):
    """The "eft_paged" attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D]
    -> ([1, T, Hq, D], None)."""
    meta = eft_metadata
    if meta is None:
        raise ValueError("attention 'eft_paged' needs the keyword argument eft_metadata "
                         "(run the model through eft_fast's ModelRunner)")
    # Not implemented, so never ignored silently: logit soft-capping, and a sliding window
    # narrower than the context (a window that covers the whole context is causal attention).
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") is not None or (window is not None and
                                             (meta.max_context is None or window < meta.max_context)):
        raise ValueError(f"attention 'eft_paged' implements neither logit soft-capping nor a sliding window "
                         f"narrower than the context (softcap={kwargs.get('softcap')!r}, sliding_window={window!r}, "
                         f"context={meta.max_context})")
    if query.shape[0] != 1:
        raise ValueError(f"attention 'eft_paged' takes packed tokens in a batch of 1, got batch {query.shape[0]}")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = query[0].transpose(0, 1)                                                        # [T, Hq, D]
    k = key[0].transpose(0, 1).to(meta.kv_cache.key.dtype)                              # [T, Hkv, D]
    v = value[0].transpose(0, 1).to(meta.kv_cache.key.dtype)
    key_cache, value_cache = meta.kv_cache.layer(module.layer_idx)
    num_kv_heads, head_dim = key_cache.shape[-2:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.write_slots, k)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, meta.write_slots, v)
    if meta.torch_path is not None:
        out = torch_paged_attention(q, key_cache, value_cache, meta.torch_path, scaling)
    else:
        from ..kernels.paged_attention import paged_attention_triton

        out = paged_attention_triton(q, key_cache, value_cache, meta.block_tables, meta.seq_lens,
                                     meta.query_start_loc, meta.max_query_len, scaling)
    return out.to(query.dtype).unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
