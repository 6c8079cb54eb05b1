"""A pure-Python model of PyTorch's CUDA caching allocator, to cap reserved memory on an emulated device.

It follows ``c10/cuda/CUDACachingAllocator.cpp`` in its default configuration (one device, one stream, no
``max_split_size_mb``, no expandable segments, no ``roundup_power2_divisions``, no garbage collection
threshold): requests are rounded to 512 bytes, served best-fit from a small (≤ 1 MiB) or a large pool,
and new segments are refused when reserved memory would pass the cap, as
``torch.cuda.set_per_process_memory_fraction`` does. It imports only the standard library.

Example:
    >>> a = CachingAllocator(cap=4 * 2**20)
    >>> h = a.malloc(1000)
    >>> a.allocated_bytes, a.reserved_bytes
    (1024, 2097152)
    >>> a.free(h)
    >>> a.empty_cache()
    >>> a.reserved_bytes
    0
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeGuard

__all__ = ["AllocatorOutOfMemory", "BlockInfo", "CachingAllocator", "ReplayResult", "SegmentInfo", "replay"]

_MIN_BLOCK = 512  # every block size is a multiple of this
_SMALL_SIZE = 1 << 20  # the largest request served by the small pool
_SMALL_SEGMENT = 2 << 20  # segment size of the small pool
_LARGE_SEGMENT = 20 << 20  # segment for large requests below _MIN_LARGE_ALLOC
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20  # larger requests get a segment of their own size, rounded to this
# Non-zero so that 0 stays the null handle of an empty allocation; 2 MiB-aligned like cudaMalloc.
_FIRST_ADDRESS = 1 << 32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _segment_size(size: int) -> int:
    if size <= _SMALL_SIZE:
        return _SMALL_SEGMENT
    return _LARGE_SEGMENT if size < _MIN_LARGE_ALLOC else _round_up(size, _ROUND_LARGE)


def _format_size(n: int) -> str:
    # The units and thresholds of the C++ allocator's own messages.
    if n <= 1024:
        return f"{n} bytes"
    for unit, scale in (("KiB", 1 << 10), ("MiB", 1 << 20)):
        if n <= scale << 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / (1 << 30):.2f} GiB"


def _is_bytes(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_bytes(name: str, value: object) -> int:
    if not _is_bytes(value):
        raise ValueError(f"Expected `{name}` to be a non-negative int of bytes, but got {value!r}.")
    return value


class AllocatorOutOfMemory(RuntimeError):
    """No free block fits and a new segment would take reserved memory past the cap.

    Attributes:
        requested: bytes asked for, before rounding.
        segment_size: bytes of the segment that was refused (what CUDA's message calls "Tried to allocate").
        allocated: bytes in allocated blocks when it failed.
        reserved: bytes in segments when it failed, after releasing the cached ones.
        cap: the cap on reserved bytes.
    """

    def __init__(self, requested: int, segment_size: int, allocated: int, reserved: int, cap: int) -> None:
        super().__init__(
            f"CUDA out of memory (emulated). Tried to allocate {_format_size(segment_size)}. "
            f"{_format_size(cap)} allowed; of the allocated memory {_format_size(allocated)} is allocated "
            f"by PyTorch, and {_format_size(reserved - allocated)} is reserved by PyTorch but unallocated. "
            "Free tensors or use a smaller batch."
        )
        self.requested, self.segment_size = requested, segment_size
        self.allocated, self.reserved, self.cap = allocated, reserved, cap

    def __reduce__(self) -> tuple[type, tuple[int, ...]]:
        return type(self), (self.requested, self.segment_size, self.allocated, self.reserved, self.cap)


@dataclass(frozen=True)
class BlockInfo:
    """One block of a segment: its offset from the segment start, its size, and whether it is in use."""

    offset: int
    size: int
    allocated: bool


@dataclass(frozen=True)
class SegmentInfo:
    """One segment (one cudaMalloc): its address, size, pool and blocks in address order."""

    address: int
    size: int
    small: bool
    blocks: tuple[BlockInfo, ...]


@dataclass(eq=False)
class _Block:
    address: int
    size: int
    small: bool
    allocated: bool = False
    requested: int = 0
    prev: _Block | None = None
    next: _Block | None = None


class CachingAllocator:
    """Allocate and free blocks the way PyTorch's CUDA caching allocator does, under a cap on reserved bytes.

    Handles are the blocks' addresses; ``malloc(0)`` returns the null handle 0 and takes no memory, as
    ``torch.empty(0, device="cuda")`` does. Segment addresses grow in creation order and are not reused,
    so ties between equal free blocks go to the older segment (cudaMalloc's own addresses are unknown).

    Args:
        cap: the most bytes the segments may total, or ``None`` for no cap.

    Attributes:
        allocated_bytes: bytes in allocated blocks, at their rounded (or unsplit) sizes.
        reserved_bytes: bytes in segments, allocated or cached.
        requested_bytes: bytes the live allocations asked for, before rounding.
        peak_allocated_bytes, peak_reserved_bytes, peak_requested_bytes: the most of each since creation
            or :meth:`reset_peaks`.
        num_segments: segments reserved now.
        num_ooms: out-of-memory errors raised so far.
        num_alloc_retries: times a new segment was refused and the cached segments released to retry.
        Read them; only the allocator's methods change them.
    """

    def __init__(self, cap: int | None) -> None:
        self.cap = None if cap is None else _check_bytes("cap", cap)
        self._blocks: dict[int, _Block] = {}  # every block, free or allocated, by address
        self._free: dict[bool, list[tuple[int, int]]] = {True: [], False: []}  # (size, address) per pool
        self._segments: dict[int, int] = {}  # size by address
        self._next_address = _FIRST_ADDRESS
        self.allocated_bytes = self.reserved_bytes = self.requested_bytes = 0
        self.peak_allocated_bytes = self.peak_reserved_bytes = self.peak_requested_bytes = 0
        self.num_segments = self.num_ooms = self.num_alloc_retries = 0

    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` and return the block's handle.

        Raises:
            AllocatorOutOfMemory: no free block fits, and a new segment passes the cap even after every
                entirely free segment was released.
            ValueError: ``nbytes`` is not a non-negative int.
        """
        if _check_bytes("nbytes", nbytes) == 0:
            return 0
        size = _round_up(nbytes, _MIN_BLOCK)
        small = size <= _SMALL_SIZE
        block = self._take_free_block(size, small)
        if block is None:
            segment = _segment_size(size)
            if self.cap is not None and self.reserved_bytes + segment > self.cap:
                self.num_alloc_retries += 1
                self.empty_cache()
                if self.reserved_bytes + segment > self.cap:
                    self.num_ooms += 1
                    raise AllocatorOutOfMemory(
                        nbytes, segment, self.allocated_bytes, self.reserved_bytes, self.cap
                    )
            block = self._new_segment(segment, small)
        remainder = block.size - size
        split = remainder >= _MIN_BLOCK if small else remainder > _SMALL_SIZE
        if split:
            rest = _Block(block.address + size, remainder, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next, block.size = rest, size
            self._blocks[rest.address] = rest
            bisect.insort(self._free[small], (rest.size, rest.address))
        block.allocated, block.requested = True, nbytes
        self.allocated_bytes += block.size
        self.requested_bytes += nbytes
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)
        return block.address

    def free(self, handle: int) -> None:
        """Free the block of ``handle`` and merge it with its free neighbours; the segment stays reserved.

        Raises:
            ValueError: ``handle`` is not a live allocation of this allocator.
        """
        if isinstance(handle, bool) or not isinstance(handle, int):
            block = None
        elif handle == 0:
            return  # the null handle of an empty allocation, like cudaFree(nullptr)
        else:
            block = self._blocks.get(handle)
        if block is None or not block.allocated:
            raise ValueError(
                f"Expected `handle` to be a live allocation of this allocator, but got {handle!r} "
                "(never returned by malloc, or already freed). Free each handle malloc returned once."
            )
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        for neighbour in (block.next, block.prev):
            if neighbour is not None and not neighbour.allocated:
                self._unlist(neighbour)
                left, right = (block, neighbour) if neighbour is block.next else (neighbour, block)
                left.size += right.size
                left.next = right.next
                if right.next is not None:
                    right.next.prev = left
                del self._blocks[right.address]
                block = left
        bisect.insort(self._free[block.small], (block.size, block.address))

    def block_size(self, handle: int) -> int:
        """The bytes the block of ``handle`` takes (its rounded, or unsplit, size); 0 for the null handle."""
        return 0 if handle == 0 else self._blocks[handle].size

    def empty_cache(self) -> None:
        """Release every segment that is entirely free, in both pools."""
        for block in self._cached_segments():
            self._unlist(block)
            del self._blocks[block.address], self._segments[block.address]
            self.reserved_bytes -= block.size
            self.num_segments -= 1

    def would_fit(self, nbytes: int) -> bool:
        """Tell whether ``malloc(nbytes)`` would succeed now, changing nothing."""
        if _check_bytes("nbytes", nbytes) == 0 or self.cap is None:
            return True
        size = _round_up(nbytes, _MIN_BLOCK)
        keys = self._free[size <= _SMALL_SIZE]
        if bisect.bisect_left(keys, (size, 0)) < len(keys):
            return True
        cached = sum(block.size for block in self._cached_segments())
        return self.reserved_bytes - cached + _segment_size(size) <= self.cap

    def reset_peaks(self) -> None:
        """Set every peak to its current value, as ``torch.cuda.reset_peak_memory_stats`` does."""
        self.peak_allocated_bytes, self.peak_reserved_bytes = self.allocated_bytes, self.reserved_bytes
        self.peak_requested_bytes = self.requested_bytes

    def snapshot(self) -> list[SegmentInfo]:
        """Describe every segment and its blocks, in address order."""
        result = []
        for address, size in sorted(self._segments.items()):
            blocks, block = [], self._blocks.get(address)
            while block is not None:
                blocks.append(BlockInfo(block.address - address, block.size, block.allocated))
                block = block.next
            result.append(SegmentInfo(address, size, self._blocks[address].small, tuple(blocks)))
        return result

    def _cached_segments(self) -> list[_Block]:
        free = (self._blocks[address] for keys in self._free.values() for _, address in keys)
        return [block for block in free if block.prev is None and block.next is None]

    def _take_free_block(self, size: int, small: bool) -> _Block | None:
        keys = self._free[small]
        i = bisect.bisect_left(keys, (size, 0))  # best fit: smallest size, then lowest address
        return self._blocks[keys.pop(i)[1]] if i < len(keys) else None

    def _unlist(self, block: _Block) -> None:
        keys = self._free[block.small]
        del keys[bisect.bisect_left(keys, (block.size, block.address))]

    def _new_segment(self, size: int, small: bool) -> _Block:
        address, self._next_address = self._next_address, self._next_address + size
        block = self._blocks[address] = _Block(address, size, small)
        self._segments[address] = size
        self.num_segments += 1
        self.reserved_bytes += size
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)
        return block


@dataclass(frozen=True)
class ReplayResult:
    """What a trace did to the allocator: its peaks, and where it first ran out of memory.

    Attributes:
        peak_allocated: most allocated bytes, over the events before the first out-of-memory.
        peak_reserved: most reserved bytes, over the same events.
        first_oom: index of the first ``alloc`` event that ran out of memory, or ``None``.
    """

    peak_allocated: int
    peak_reserved: int
    first_oom: int | None


def replay(events: Iterable[Sequence[object]], cap: int | None) -> ReplayResult:
    """Run a trace of ``("alloc", id, nbytes)`` and ``("free", id)`` events on a fresh allocator.

    The replay stops at the first allocation that runs out of memory (the step would have failed there);
    it never raises for one.

    Example:
        >>> replay([("alloc", "x", 3 << 20), ("free", "x"), ("alloc", "y", 1)], cap=None)
        ReplayResult(peak_allocated=3145728, peak_reserved=23068672, first_oom=None)

    Raises:
        ValueError: an event is malformed, allocates a live id, or frees an id that is not live.
    """
    allocator = CachingAllocator(cap)
    live: dict[object, int] = {}
    for i, event in enumerate(events):
        shape = (event[0], len(event)) if isinstance(event, tuple | list) and event else None
        if shape == ("alloc", 3) and event[1] not in live and _is_bytes(event[2]):
            try:
                live[event[1]] = allocator.malloc(event[2])
            except AllocatorOutOfMemory:
                return ReplayResult(allocator.peak_allocated_bytes, allocator.peak_reserved_bytes, i)
        elif shape == ("free", 2) and event[1] in live:
            allocator.free(live.pop(event[1]))
        else:
            raise ValueError(
                f"Expected `events[{i}]` to be ('alloc', new_id, nbytes >= 0) or ('free', live_id), but "
                f"got {event!r}. Allocate each id once while it is not live, and free it once."
            )
    return ReplayResult(allocator.peak_allocated_bytes, allocator.peak_reserved_bytes, None)
