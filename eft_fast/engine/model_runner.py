"""Run one Hugging Face causal LM over a paged KV pool.

A step is a list of :class:`SequenceStep`: for each sequence, the new tokens and its block
table. The runner packs them into one ``[1, T]`` forward (varlen prefill, decode and
(k+1)-token verify are the same code), writes their K/V into the pool, advances each
table's ``num_tokens``, and returns logits only where they are asked for.

Rollback is bookkeeping: ``table.rollback(n)`` makes later steps ignore, then overwrite,
positions n and beyond.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .attention import ATTENTION_NAME, PagedAttentionMetadata, build_torch_path_indices
from .block_manager import BlockManager, BlockTable, blocks_needed
from .kv_cache import KVShape, PagedKVCache

DEFAULT_KV_CACHE_BYTES = 1 << 30


@dataclass
class SequenceStep:
    """One sequence's part of a step: ``token_ids`` go to positions ``table.num_tokens`` onwards."""

    table: BlockTable
    token_ids: list[int]


@dataclass
class StepLayout:
    """The host-side (python lists) form of a step, packed in sequence order."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    seq_lens: list[int]
    query_lens: list[int]

    @property
    def query_start_loc(self) -> list[int]:
        out = [0]
        for n in self.query_lens:
            out.append(out[-1] + n)
        return out


def check_model_supported(model, role: str = "model") -> None:
    """Raise ValueError if the paged attention path cannot serve ``model`` exactly."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    name = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{role}: {name} does not route attention through transformers' AttentionInterface, "
                         "so eft_fast's paged attention cannot serve it")
    if getattr(text, "is_encoder_decoder", False) or not getattr(text, "is_causal", True):
        raise ValueError(f"{role}: {name} is not a decoder-only causal LM")
    for attr in ("attn_logit_softcapping",):
        if getattr(text, attr, None):
            raise ValueError(f"{role}: {name} uses {attr}, which eft_fast's paged attention does not implement")
    layer_types = getattr(text, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{role}: {name} has non-full attention layers ({sorted(set(layer_types))}), which "
                         "eft_fast's paged attention does not implement")


def max_model_len_of(model, requested: int | None) -> int:
    """The context limit: the model's position limit, its sliding window (a window that
    covers the whole context is plain causal attention), and the requested cap."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(text, "max_position_embeddings", None) or 1 << 20
    if getattr(text, "use_sliding_window", True) and getattr(text, "sliding_window", None):
        limit = min(limit, int(text.sliding_window))
    if requested is not None:
        if requested < 1:
            raise ValueError(f"max_model_len must be >= 1, got {requested}")
        limit = min(limit, requested)
    return int(limit)


class ModelRunner:
    """One model, its KV pool and block manager.

    Args:
        model: a loaded causal LM (``PreTrainedModel``); its forwards through the runner use
            "eft_paged" attention, other forwards keep the model's own.
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool; default: as many as ``kv_cache_bytes`` allows,
            at most enough for ``max_num_seqs`` full-length sequences.
        max_model_len: context cap (default: the model's own limit).
        attention_backend: "torch" (gathers, SDPA), "triton" (the paged kernel; under
            TRITON_INTERPRET=1 also on CPU), or "auto": triton on CUDA, torch elsewhere.
        role: name used in error messages ("knowledge", "tuned", ...).
        agree_num_blocks: for a model sharded over ranks: maps this rank's pool size to the
            one every rank uses (the minimum), so block tables mean the same everywhere.
    """

    supports_cuda_graph = True    # its forward can be captured (no host work inside run_model)

    def __init__(self, model, *, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None, max_num_seqs: int = 64,
                 attention_backend: str = "auto", role: str = "model",
                 agree_num_blocks: Callable[[int], int] | None = None):
        check_model_supported(model, role)
        if attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {attention_backend!r}")
        self.role = role
        self._use_model(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if attention_backend == "auto":
            attention_backend = "triton" if self.device.type == "cuda" else "torch"
        self.attention_backend = attention_backend
        self.vocab_width = model.config.get_text_config().vocab_size
        self.max_model_len = max_model_len_of(model, max_model_len)
        self.block_size = block_size
        self.max_blocks_per_seq = blocks_needed(self.max_model_len, block_size)
        shape = KVShape.from_config(model.config)
        if num_blocks is None:
            budget = kv_cache_bytes if kv_cache_bytes is not None else DEFAULT_KV_CACHE_BYTES
            num_blocks = min(budget // shape.bytes_per_block(block_size, self.dtype),
                             max_num_seqs * self.max_blocks_per_seq)
            if num_blocks < 1:
                raise ValueError(f"{role}: kv_cache_bytes={budget} holds no {block_size}-token KV block")
        if agree_num_blocks is not None:
            num_blocks = agree_num_blocks(num_blocks)
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv_cache = PagedKVCache(shape, num_blocks, block_size, self.dtype, self.device)

    def _use_model(self, model) -> None:
        self.model = model.eval()
        # The configs whose attention implementation a paged forward switches to "eft_paged"
        # (and back afterwards, so the caller's model keeps working with HF's own forward).
        configs = {id(model.config): model.config}
        for sub in model.modules():
            cfg = getattr(sub, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                configs.setdefault(id(cfg), cfg)
        self._configs = list(configs.values())

    # ---- host-side packing -------------------------------------------------------------
    def layout(self, steps: list[SequenceStep]) -> StepLayout:
        """Pack ``steps`` (checks that every table holds its new positions)."""
        bs = self.block_size
        out = StepLayout([], [], [], [], [], [])
        for i, step in enumerate(steps):
            start, n = step.table.num_tokens, len(step.token_ids)
            end = start + n
            if n == 0:
                raise ValueError(f"{self.role}: sequence {i} of the step has no new tokens")
            if end > self.max_model_len:
                raise ValueError(f"{self.role}: sequence {i} would reach {end} tokens, beyond max_model_len="
                                 f"{self.max_model_len}")
            if blocks_needed(end, bs) > len(step.table.blocks):
                raise ValueError(f"{self.role}: sequence {i} needs {blocks_needed(end, bs)} KV blocks for {end} "
                                 f"tokens but its table holds {len(step.table.blocks)}")
            out.input_ids.extend(step.token_ids)
            out.positions.extend(range(start, end))
            out.slots.extend(step.table.slot(p, bs) for p in range(start, end))
            out.block_tables.append(step.table.blocks)
            out.seq_lens.append(end)
            out.query_lens.append(n)
        return out

    def padded_tables(self, block_tables: list[list[int]], rows: int) -> list[list[int]]:
        """``rows`` block-table rows of width ``max_blocks_per_seq``; missing entries and
        missing rows point at the dummy block."""
        width, dummy = self.max_blocks_per_seq, self.kv_cache.dummy_block
        out = [blocks[:width] + [dummy] * (width - len(blocks)) for blocks in block_tables]
        out.extend([[dummy] * width for _ in range(rows - len(out))])
        return out

    def metadata(self, write_slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 query_start_loc: torch.Tensor, num_tokens: int, max_query_len: int,
                 max_kv_len: int | None) -> PagedAttentionMetadata:
        """Metadata of one forward; the torch path also gets its gather indices (``max_kv_len``
        bounds the context; the Triton kernel does not need it)."""
        torch_path = None
        if self.attention_backend == "torch":
            torch_path = build_torch_path_indices(block_tables, seq_lens, query_start_loc, num_tokens, max_query_len,
                                                  max_kv_len, self.block_size, self.kv_cache.dummy_slot)
        return PagedAttentionMetadata(self.kv_cache, write_slots, block_tables, seq_lens, query_start_loc,
                                      max_query_len, torch_path, max_kv_len, self.max_model_len)

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: PagedAttentionMetadata,
                  logits_to_keep: torch.Tensor | int = 0) -> torch.Tensor:
        """input_ids, positions [T] int64 -> logits [N, vocab_width] at ``logits_to_keep`` rows (0 = all)."""
        saved = [cfg._attn_implementation for cfg in self._configs]
        try:
            for cfg in self._configs:
                cfg._attn_implementation = ATTENTION_NAME
            out = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False,
                             logits_to_keep=logits_to_keep, eft_metadata=metadata)
        finally:
            for cfg, name in zip(self._configs, saved):
                cfg._attn_implementation = name
        return out.logits[0]

    # ---- the dynamic (unpadded) path ------------------------------------------------------
    @torch.inference_mode()
    def forward(self, steps: list[SequenceStep], all_logits: bool = False) -> torch.Tensor:
        """Run one packed step.

        Returns logits [S, vocab_width] at each sequence's last new token, or with
        ``all_logits`` [T, vocab_width] at every new token (packed order). Advances
        each table's ``num_tokens`` by its new tokens.
        """
        if not steps:
            raise ValueError("forward needs at least one sequence")
        lay = self.layout(steps)
        dev = self.device
        i32 = dict(dtype=torch.int32, device=dev)
        tables = torch.tensor(self.padded_tables(lay.block_tables, len(steps)), **i32)
        qsl = lay.query_start_loc
        meta = self.metadata(torch.tensor(lay.slots, dtype=torch.int64, device=dev), tables,
                             torch.tensor(lay.seq_lens, **i32), torch.tensor(qsl, **i32), len(lay.input_ids),
                             max(lay.query_lens), max(lay.seq_lens))
        keep = 0 if all_logits else torch.tensor([e - 1 for e in qsl[1:]], dtype=torch.int64, device=dev)
        logits = self.run_model(torch.tensor(lay.input_ids, dtype=torch.int64, device=dev),
                                torch.tensor(lay.positions, dtype=torch.int64, device=dev), meta, keep)
        for step in steps:
            step.table.num_tokens += len(step.token_ids)
        return logits
