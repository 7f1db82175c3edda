"""Block manager: fixed-size KV blocks of one model's pool, reference counted.

A block holds ``block_size`` consecutive token positions of one sequence. Every sequence
(one request as seen by one model) owns a :class:`BlockTable`: the list of its blocks in
position order. Reference counts let several tables share a block (prefix sharing); a block
returns to the free list when its count drops to zero.

Running out of blocks is never an exception in the hot path: :meth:`BlockManager.ensure`
returns False and allocates nothing, and the scheduler decides what to preempt.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` positions."""
    return -(-num_tokens // block_size)


@dataclass
class BlockTable:
    """The blocks of one sequence in one model's pool, in position order.

    ``num_tokens`` is the number of positions whose K/V are valid in the cache. Positions
    at or beyond it may hold stale K/V (after a rollback) that the next write overwrites.
    """

    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0

    def slot(self, position: int, block_size: int) -> int:
        """The flat pool slot of ``position``."""
        return self.blocks[position // block_size] * block_size + position % block_size

    def rollback(self, num_tokens: int) -> None:
        """Forget every position at or beyond ``num_tokens`` (the blocks stay reserved)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"rollback to {num_tokens} tokens, but the sequence holds {self.num_tokens}")
        self.num_tokens = num_tokens


class OutOfBlocks(RuntimeError):
    """Raised only by :meth:`BlockManager.allocate`; :meth:`BlockManager.ensure` reports False instead."""


class BlockManager:
    """Free list and reference counts of ``num_blocks`` blocks of ``block_size`` tokens."""

    def __init__(self, num_blocks: int, block_size: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1); raises OutOfBlocks, taking none, if there are fewer free."""
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, block: int) -> None:
        """Add a reference to an allocated block."""
        if self._ref_counts[block] <= 0:
            raise ValueError(f"block {block} is not allocated")
        self._ref_counts[block] += 1

    def free_block(self, block: int) -> None:
        if self._ref_counts[block] <= 0:
            raise ValueError(f"double free of block {block}")
        self._ref_counts[block] -= 1
        if self._ref_counts[block] == 0:
            self._free.append(block)

    def can_hold(self, table: BlockTable, num_tokens: int) -> bool:
        """Whether ``table`` could grow to ``num_tokens`` positions with the free blocks."""
        return blocks_needed(num_tokens, self.block_size) - len(table.blocks) <= len(self._free)

    def ensure(self, table: BlockTable, num_tokens: int) -> bool:
        """Grow ``table`` to hold ``num_tokens`` positions. False (and nothing allocated) if
        there are not enough free blocks."""
        missing = blocks_needed(num_tokens, self.block_size) - len(table.blocks)
        if missing <= 0:
            return True
        if missing > len(self._free):
            return False
        table.blocks.extend(self.allocate(missing))
        return True

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def rebuild(self, tables: list[BlockTable]) -> None:
        """Recount every block from the tables that own blocks (the live requests' tables).

        The normal paths keep the counts exact. This is the repair after a step was
        interrupted part-way (KeyboardInterrupt between an allocation and its table update):
        afterwards a block is free exactly when no table holds it.
        """
        counts = [0] * self.num_blocks
        for table in tables:
            for b in table.blocks:
                counts[b] += 1
        self._ref_counts = counts
        self._free = deque(b for b, n in enumerate(counts) if n == 0)

    def release(self, table: BlockTable) -> None:
        """Drop every block of ``table`` and empty it."""
        for b in table.blocks:
            self.free_block(b)
        table.blocks = []
        table.num_tokens = 0
