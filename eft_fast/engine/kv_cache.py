"""The paged KV pool of one model: K and V for every layer, in fixed-size blocks."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVShape:
    """What one model's KV pool is made of (from its config)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config, tp_size: int | None = None) -> "KVShape":
        """The shape of one rank's pool: a model sharded over ``tp_size`` ranks (default: its
        ``config.distributed_config.tp_size``, else 1) holds its share of the KV heads."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        if tp_size is None:
            tp_size = getattr(getattr(config, "distributed_config", None), "tp_size", None) or 1
        if kv_heads % tp_size:
            raise ValueError(f"{kv_heads} KV heads cannot be split over tensor_parallel_size={tp_size} ranks")
        return cls(text.num_hidden_layers, kv_heads // tp_size, head_dim)

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


class PagedKVCache:
    """K and V pools ``[num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim]``.

    Block ``num_blocks`` (one past the last real block) is the dummy block: padding rows write
    to its first slot, ``dummy_slot`` = num_blocks * block_size, and padding rows of a static
    batch attend to it, so real blocks are never touched by padding.
    """

    def __init__(self, shape: KVShape, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.shape = shape
        self.num_blocks = num_blocks
        self.block_size = block_size
        size = (shape.num_layers, num_blocks + 1, block_size, shape.num_kv_heads, shape.head_dim)
        # Zeros, not empty: the dummy block is read by padding rows and must stay finite.
        self.key = torch.zeros(size, dtype=dtype, device=device)
        self.value = torch.zeros(size, dtype=dtype, device=device)

    @property
    def dummy_block(self) -> int:
        return self.num_blocks

    @property
    def dummy_slot(self) -> int:
        return self.num_blocks * self.block_size

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``[num_blocks + 1, block_size, num_kv_heads, head_dim]`` K and V of one layer."""
        return self.key[layer_idx], self.value[layer_idx]
