"""Expandable segments: PyTorch's ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``, on the CPU.

With the option set, ``c10/cuda/CUDACachingAllocator.cpp`` reserves, per pool, one range of virtual
addresses and backs it with physical pages only as requests need them (Note [Expandable Segments] there):

* **Pages**: 2 MiB in the small pool, 20 MiB in the large one (``ExpandableSegment``'s ``segment_size_``).
* **Growing** (``try_allocate_expandable_block``): when no free block fits, ``find_expandable_block``
  takes the lowest unmapped range, starting at the free block just before it if there is one, that has
  room through free and unmapped blocks; ``map_block`` maps just enough whole pages there and merges
  them with the free blocks around them. A step's requests therefore extend the end of one segment
  instead of opening a segment each.
* **Best fit** (``get_free_block``): among the free blocks that fit, a block followed by unmapped pages
  counts as large as it could grow, so the end of a segment is taken last.
* **Releasing** (``release_blocks``/``unmap_block``, run by ``empty_cache`` and before an out-of-memory):
  every whole page inside a free block is unmapped, in the middle of a segment too; a segment left
  without a mapped page is given up (``release_expandable_segment``).

PyTorch reserves address space for 9/8 of the device's memory per segment; this model reserves
:data:`ADDRESS_SPACE` (2**48 bytes), so one segment per pool always has room. It imports only the standard
library.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from autobatch.memory._blocks import Block, Blocks

__all__ = ["ADDRESS_SPACE", "LARGE_PAGE", "SMALL_PAGE", "ExpandableSegments", "page_size"]

SMALL_PAGE = 2 << 20  # kSmallBuffer: the small pool maps 2 MiB pages
LARGE_PAGE = 20 << 20  # kLargeBuffer: the large pool maps 20 MiB pages, to keep mapping calls few
ADDRESS_SPACE = 1 << 48
"""Bytes of address space one segment reserves, rounded down to its pages."""


def page_size(small: bool) -> int:
    """Bytes of the pages a segment of the small (or large) pool maps at a time."""
    return SMALL_PAGE if small else LARGE_PAGE


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _room(start: Block, size: int) -> int:
    """Bytes of free and unmapped blocks from ``start`` on, counted until they reach ``size``."""
    room = 0
    block: Block | None = start
    while room < size and block is not None and not block.allocated:
        room, block = room + block.size, block.next
    return room


class ExpandableSegments:
    """The expandable segments of both pools, over the blocks in ``blocks``.

    Each segment's blocks tile its whole address range: allocated and free blocks on mapped pages, and
    unmapped blocks (free, page-aligned) between and after them. Segment bases are aligned to their pages,
    so a page boundary is any multiple of the page size.

    Args:
        blocks: the allocator's blocks and free lists, shared with it.
        first_address: where the first segment's address range may start.
    """

    def __init__(self, blocks: Blocks, first_address: int) -> None:
        self.blocks = blocks
        self.next_address = first_address
        self.bases: dict[bool, list[int]] = {True: [], False: []}  # segment starts per pool, ascending
        self.unmapped: dict[bool, list[int]] = {True: [], False: []}  # unmapped block addresses, ascending

    def copy(self, blocks: Blocks) -> ExpandableSegments:
        """The same segments over ``blocks``, a copy of this one's blocks."""
        twin = ExpandableSegments(blocks, self.next_address)
        twin.bases = {small: list(v) for small, v in self.bases.items()}
        twin.unmapped = {small: list(v) for small, v in self.unmapped.items()}
        return twin

    def best_fit(self, size: int, small: bool) -> Block | None:
        """Take the free block ``get_free_block`` picks for ``size`` bytes out of its free list, if any."""
        keys = self.blocks.free[small]
        i = self.blocks.first_fit_index(size, small)
        if i == len(keys):
            return None
        # Walk on to larger blocks while each can grow to less than the one before: a block at the end
        # of the mapped pages is only taken when nothing else fits.
        reach = self._reach(keys[i][1])
        while i + 1 < len(keys) and (following := self._reach(keys[i + 1][1])) < reach:
            i, reach = i + 1, following
        return self.blocks.by_address[keys.pop(i)[1]]

    def grow(self, size: int, small: bool, headroom: int | None) -> tuple[Block | None, int]:
        """Map pages so that a free block of at least ``size`` bytes exists, and take it out of its list.

        Args:
            size: the rounded request.
            small: its pool.
            headroom: the most bytes the device can still map, or ``None`` for no limit. Pages that do
                not fit fail the request as ``cuMemCreate`` does, but pages already mapped by this call
                stay mapped, as in ``try_allocate_expandable_block``.

        Returns:
            The block (``None`` if pages could not be mapped) and the bytes newly mapped.
        """
        candidate = self._find(size, small)
        mapped = 0
        while candidate.size < size or not candidate.mapped:
            to_map = candidate if not candidate.mapped else candidate.next
            assert to_map is not None and not to_map.mapped  # free blocks and unmapped ranges alternate
            need = size if to_map is candidate else size - candidate.size
            grown = self._map(to_map, min(need, to_map.size), None if headroom is None else headroom - mapped)
            if grown is None:
                self._drop_if_empty(candidate)
                return None, mapped
            candidate, mapped = grown[0], mapped + grown[1]
        self.blocks.unlist_free(candidate)
        return candidate, mapped

    def release(self) -> int:
        """Unmap every whole page inside a free block, in both pools; return the bytes unmapped."""
        released = 0
        for small in (False, True):  # release_cached_blocks: the large pool, then the small one
            for _, address in list(self.blocks.free[small]):
                released += self._unmap(self.blocks.by_address[address])
        return released

    def segments(self) -> Iterator[tuple[int, bool, list[Block]]]:
        """Each segment's base, pool and blocks up to its trailing unmapped range, in address order."""
        for base in sorted(self.bases[True] + self.bases[False]):
            blocks: list[Block] = []
            block: Block | None = self.blocks.by_address[base]
            while block is not None and not (block.next is None and not block.mapped):
                blocks.append(block)
                block = block.next
            yield base, self.blocks.by_address[base].small, blocks

    def _reach(self, address: int) -> int:
        block = self.blocks.by_address[address]
        after = block.next
        return block.size + (after.size if after is not None and not after.mapped else 0)

    def _find(self, size: int, small: bool) -> Block:
        """``find_expandable_block``: where a request that needs new pages goes (a new segment if nowhere)."""
        for address in self.unmapped[small]:
            start = self.blocks.by_address[address]
            if start.prev is not None and not start.prev.allocated:
                start = start.prev  # the free block before the unmapped range grows into it
            if _room(start, size) >= size:
                return start
        page = page_size(small)
        base = _round_up(self.next_address, page)
        reserved = max(ADDRESS_SPACE // page * page, _round_up(size, page))
        self.next_address = base + reserved
        self.bases[small].append(base)
        bisect.insort(self.unmapped[small], base)
        return self.blocks.add(Block(base, reserved, small, mapped=False))

    def _map(self, block: Block, nbytes: int, headroom: int | None) -> tuple[Block, int] | None:
        """``map_block``: back the first ``nbytes`` of unmapped ``block`` with whole pages and merge them."""
        size = min(_round_up(nbytes, page_size(block.small)), block.size)
        if headroom is not None and size > headroom:
            return None
        unmapped = self.unmapped[block.small]
        del unmapped[bisect.bisect_left(unmapped, block.address)]
        if size < block.size:
            bisect.insort(unmapped, self.blocks.split(block, size).address)
        block.mapped = True
        block = self._merge_free(block)
        self.blocks.list_free(block)
        return block, size

    def _merge_free(self, block: Block) -> Block:
        """Merge ``block`` with the free neighbours that share its mapping (``try_merge_blocks``)."""
        for neighbour in (block.prev, block.next):
            if neighbour is not None and not neighbour.allocated and neighbour.mapped == block.mapped:
                if neighbour.mapped:
                    self.blocks.unlist_free(neighbour)
                else:
                    unmapped = self.unmapped[block.small]
                    del unmapped[bisect.bisect_left(unmapped, neighbour.address)]
                left, right = (neighbour, block) if neighbour is block.prev else (block, neighbour)
                block = self.blocks.merge(left, right)
        return block

    def _unmap(self, block: Block) -> int:
        """``unmap_block``: unmap the whole pages inside free ``block``; its partial pages stay free."""
        page = page_size(block.small)
        start = _round_up(block.address, page)
        end = (block.address + block.size) // page * page
        if start >= end:
            return 0
        self.blocks.unlist_free(block)
        if start > block.address:
            before, block = block, self.blocks.split(block, start - block.address)
            self.blocks.list_free(before)
        if end < block.address + block.size:
            self.blocks.list_free(self.blocks.split(block, end - block.address))
        block.mapped = False
        block = self._merge_free(block)
        if block.prev is None and block.next is None:  # release_expandable_segment
            del self.blocks.by_address[block.address]
            self.bases[block.small].remove(block.address)
        else:
            bisect.insort(self.unmapped[block.small], block.address)
        return end - start

    def _drop_if_empty(self, block: Block) -> None:
        # A segment made for a request whose first pages failed to map holds nothing: give it up, as a
        # later request would use it exactly as a new one.
        if block.prev is None and block.next is None and not block.mapped:
            del self.blocks.by_address[block.address]
            self.bases[block.small].remove(block.address)
            self.unmapped[block.small].remove(block.address)
