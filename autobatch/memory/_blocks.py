"""The blocks of a caching allocator's segments, and its free blocks kept in best-fit order per pool.

Shared by :mod:`autobatch.memory.allocator` (whole ``cudaMalloc`` segments) and
:mod:`autobatch.memory.expandable` (segments that map pages as they grow). It imports only the standard
library.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["Block", "Blocks"]


@dataclass(eq=False)
class Block:
    """A run of bytes of one segment: allocated, free, or (in an expandable segment) not backed by pages.

    Blocks of a segment tile it in address order through ``prev`` and ``next``.
    """

    address: int
    size: int
    small: bool
    allocated: bool = False
    mapped: bool = True
    requested: int = 0
    prev: Block | None = None
    next: Block | None = None


class Blocks:
    """Every block by address, and the free mapped blocks of each pool, sorted by (size, address).

    The sort order is ``BlockComparatorSize`` of ``CUDACachingAllocator.cpp`` on one stream: best fit is
    the first key not below ``(size, 0)``, and ties go to the lower address.
    """

    def __init__(self) -> None:
        self.by_address: dict[int, Block] = {}
        self.free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}

    def add(self, block: Block) -> Block:
        self.by_address[block.address] = block
        return block

    def list_free(self, block: Block) -> None:
        bisect.insort(self.free[block.small], (block.size, block.address))

    def unlist_free(self, block: Block) -> None:
        keys = self.free[block.small]
        del keys[bisect.bisect_left(keys, (block.size, block.address))]

    def first_fit_index(self, size: int, small: bool) -> int:
        """Index in ``free[small]`` of the smallest free block of at least ``size`` bytes (len if none)."""
        return bisect.bisect_left(self.free[small], (size, 0))

    def split(self, block: Block, size: int) -> Block:
        """Keep the first ``size`` bytes in ``block``; return the rest as a new free block, not listed."""
        rest = Block(block.address + size, block.size - size, block.small, mapped=block.mapped)
        rest.prev, rest.next = block, block.next
        if block.next is not None:
            block.next.prev = rest
        block.next, block.size = rest, size
        return self.add(rest)

    def merge(self, left: Block, right: Block) -> Block:
        """Absorb ``right`` (which follows ``left``) into ``left``; neither may be in a free list."""
        left.size += right.size
        left.next = right.next
        if right.next is not None:
            right.next.prev = left
        del self.by_address[right.address]
        return left

    def copy(self) -> Blocks:
        """An independent copy: new blocks, linked as these are."""
        twin = Blocks()
        for address, b in self.by_address.items():
            twin.by_address[address] = Block(b.address, b.size, b.small, b.allocated, b.mapped, b.requested)
        for address, b in self.by_address.items():
            t = twin.by_address[address]
            t.prev = None if b.prev is None else twin.by_address[b.prev.address]
            t.next = None if b.next is None else twin.by_address[b.next.address]
        twin.free = {small: list(keys) for small, keys in self.free.items()}
        return twin
