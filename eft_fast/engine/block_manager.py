"""Block manager: fixed-size KV blocks of one model's pool, reference counted, with a prefix
cache.

A block holds ``block_size`` consecutive token positions of one sequence. Every sequence
(one request as seen by one model) owns a :class:`BlockTable`: the list of its blocks in
position order. Reference counts let several tables share a block; a block returns to the
free list when its count drops to zero.

Prefix caching: a full block of committed tokens is registered under a hash chained over its
tokens and every token before it (:func:`chain_hash`), so equal prefixes have equal hashes. A
new sequence takes every leading block whose hash is registered (:meth:`BlockManager.match`)
instead of computing it again. A registered block is never written again (only full blocks of
committed tokens are registered, and writes go past a table's ``num_tokens``), and when its
last reference goes it stays registered on the free list until it is reused for other tokens:
the free list is ordered least recently freed first, so the coldest cached block is evicted
first.

Running out of blocks is never an exception in the hot path: :meth:`BlockManager.ensure`
returns False and allocates nothing, and the scheduler decides what to preempt.
"""
from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass, field

ROOT_HASH = b""


def chain_hash(parent: bytes, tokens) -> bytes:
    """The hash of a full block: of its tokens and (through ``parent``, the previous block's
    hash, ROOT_HASH for the first) of every token before it. 128-bit BLAKE2b."""
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


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
    hashes: list[bytes] = field(default_factory=list)   # of the leading full blocks registered so far

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
    """Free list, reference counts and prefix cache of ``num_blocks`` blocks of ``block_size`` tokens.

    ``enable_caching``: register committed full blocks (:meth:`commit`) and let new sequences
    reuse them (:meth:`match`); off, hashes are ignored and freed blocks are simply free.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # least recently freed first
        self._block_hash: dict[int, bytes] = {}     # registered block -> its hash
        self._cached: dict[bytes, int] = {}         # hash -> the registered block

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (in use or free)."""
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (reference count 1), evicting the least recently freed cached
        blocks first; raises OutOfBlocks, taking none, if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} of {self.num_blocks} are free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._forget_hash(b)
            self._ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def _forget_hash(self, block: int) -> None:
        h = self._block_hash.pop(block, None)
        if h is not None and self._cached.get(h) == block:
            del self._cached[h]

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
            self._free[block] = None          # most recently freed: evicted last

    # ---- prefix cache ----------------------------------------------------------------------
    def match(self, table: BlockTable, hashes: list[bytes]) -> int:
        """Give an empty ``table`` the registered blocks of the longest prefix of ``hashes``
        (one reference each); returns how many. Its ``num_tokens`` covers them."""
        if table.blocks:
            raise ValueError("match needs an empty block table")
        if not self.enable_caching:
            return 0
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
            table.blocks.append(b)
            table.hashes.append(h)
        n = len(table.blocks)
        table.num_tokens = n * self.block_size
        return n

    def commit(self, table: BlockTable, tokens, num_committed: int) -> None:
        """Register the full blocks among the first ``num_committed`` positions of ``table``
        (their tokens: ``tokens[:num_committed]``, whose K/V the table holds) that are not yet
        registered. A block whose hash another block already holds stays unregistered."""
        if not self.enable_caching:
            return
        full = min(num_committed, table.num_tokens) // self.block_size
        bs = self.block_size
        for i in range(len(table.hashes), full):
            parent = table.hashes[-1] if table.hashes else ROOT_HASH
            h = chain_hash(parent, tokens[i * bs:(i + 1) * bs])
            table.hashes.append(h)
            b = table.blocks[i]
            if h not in self._cached and b not in self._block_hash:
                self._cached[h] = b
                self._block_hash[b] = h

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
            table.hashes = []
        self._ref_counts = counts
        self._free = OrderedDict.fromkeys(b for b, n in enumerate(counts) if n == 0)
        self._block_hash, self._cached = {}, {}      # an interrupted step may have left any block half written

    def release(self, table: BlockTable) -> None:
        """Drop every block of ``table`` and empty it. Its last blocks are freed first, so that
        a prefix outlives its continuations in the cache."""
        for b in reversed(table.blocks):
            self.free_block(b)
        table.blocks = []
        table.hashes = []
        table.num_tokens = 0
