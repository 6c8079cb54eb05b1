"""A pure-Python model of PyTorch's CUDA caching allocator, to cap reserved memory on an emulated device.

It follows ``c10/cuda/CUDACachingAllocator.cpp`` on one device and one stream: requests are rounded to
512 bytes, served best-fit from a small (≤ 1 MiB) or a large pool, and new memory is refused when reserved
memory would pass the cap, as ``torch.cuda.set_per_process_memory_fraction`` does. Of the settings of
``PYTORCH_CUDA_ALLOC_CONF`` (:class:`~autobatch.memory.alloc_conf.AllocatorConfig`) it models
``expandable_segments`` (in :mod:`autobatch.memory.expandable`) and ``max_split_size_mb``; the default
configuration is PyTorch's default. It imports only the standard library.

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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeGuard

from autobatch.memory._blocks import Block, Blocks
from autobatch.memory.alloc_conf import AllocatorConfig
from autobatch.memory.expandable import ExpandableSegments

__all__ = [
    "AllocatorOutOfMemory",
    "BlockInfo",
    "CachingAllocator",
    "ReplayResult",
    "SegmentInfo",
    "SegmentLayout",
    "replay",
]

_MIN_BLOCK = 512  # every block size is a multiple of this
_SMALL_SIZE = 1 << 20  # the largest request served by the small pool
_SMALL_SEGMENT = 2 << 20  # segment size of the small pool
_LARGE_SEGMENT = 20 << 20  # segment for large requests below _MIN_LARGE_ALLOC
_MIN_LARGE_ALLOC = 10 << 20
_ROUND_LARGE = 2 << 20  # larger requests get a segment of their own size, rounded to this
_MIB = 1 << 20
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
    """No free block fits and new memory would take reserved memory past the cap.

    Attributes:
        requested: bytes asked for, before rounding.
        segment_size: bytes of the segment that was refused (what CUDA's message calls "Tried to allocate";
            with expandable segments, the segment the request would get without them, as PyTorch says).
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
    """One segment (one cudaMalloc, or one mapped range of an expandable segment): address, size, pool,
    blocks in address order, and whether it is part of an expandable segment."""

    address: int
    size: int
    small: bool
    blocks: tuple[BlockInfo, ...]
    expandable: bool = False


@dataclass(frozen=True)
class SegmentLayout:
    """One segment in :meth:`CachingAllocator.layout`, without its address.

    Attributes:
        small: its pool.
        size: its bytes; for an expandable segment, up to the end of its last mapped page.
        blocks: its mapped blocks, offsets from the segment's start.
        unmapped: ``(offset, size)`` of the unmapped pages below ``size`` (expandable segments only).
    """

    small: bool
    size: int
    blocks: tuple[BlockInfo, ...]
    unmapped: tuple[tuple[int, int], ...] = ()


_DEFAULT_CONFIG = AllocatorConfig()


class CachingAllocator:
    """Allocate and free blocks the way PyTorch's CUDA caching allocator does, under a cap on reserved bytes.

    Handles are the blocks' addresses; ``malloc(0)`` returns the null handle 0 and takes no memory, as
    ``torch.empty(0, device="cuda")`` does. Segment addresses grow in creation order and are not reused,
    so ties between equal free blocks go to the older segment (cudaMalloc's own addresses are unknown).

    With expandable segments the cap is both the process's memory fraction (PyTorch's ``alloc_block``
    refuses to grow when reserved bytes plus the segment the request would get *without* expandable
    segments would pass it) and the device's memory (a page that would take mapped bytes past the cap
    fails to map, as ``cuMemCreate`` would on a device of that size), so reserved bytes never pass it.

    Args:
        cap: the most bytes the segments may total, or ``None`` for no cap.
        config: the allocator's settings (:func:`~autobatch.memory.alloc_conf.parse_alloc_conf` reads them
        from
            ``PYTORCH_CUDA_ALLOC_CONF``); PyTorch's defaults if omitted.

    Attributes:
        allocated_bytes: bytes in allocated blocks, at their rounded (or unsplit) sizes.
        reserved_bytes: bytes in segments (mapped pages of expandable ones), allocated or cached.
        requested_bytes: bytes the live allocations asked for, before rounding.
        peak_allocated_bytes, peak_reserved_bytes, peak_requested_bytes: the most of each since creation
            or :meth:`reset_peaks`.
        num_ooms: out-of-memory errors raised so far.
        num_alloc_retries: times new memory was refused and the cached memory released to retry.
        Read them; only the allocator's methods change them.
    """

    def __init__(self, cap: int | None, config: AllocatorConfig = _DEFAULT_CONFIG) -> None:
        self.cap = None if cap is None else _check_bytes("cap", cap)
        if not isinstance(config, AllocatorConfig):
            raise TypeError(
                f"Expected `config` to be an AllocatorConfig (see parse_alloc_conf), but got {config!r}."
            )
        self.config = config
        self._mss = None if config.max_split_size_mb is None else config.max_split_size_mb * _MIB
        self._blocks = Blocks()  # every block, free or allocated, and the free ones by pool
        self._segments: dict[int, int] = {}  # size by address, of whole (not expandable) segments
        self._next_address = _FIRST_ADDRESS
        self._expandable = (
            ExpandableSegments(self._blocks, _FIRST_ADDRESS) if config.expandable_segments else None
        )
        self.allocated_bytes = self.reserved_bytes = self.requested_bytes = 0
        self.peak_allocated_bytes = self.peak_reserved_bytes = self.peak_requested_bytes = 0
        self.num_ooms = self.num_alloc_retries = 0

    @property
    def num_segments(self) -> int:
        """Segments now: as :meth:`snapshot` lists them (each mapped range of an expandable segment)."""
        return len(self._segments) if self._expandable is None else len(self.snapshot())

    def malloc(self, nbytes: int) -> int:
        """Allocate ``nbytes`` and return the block's handle.

        Raises:
            AllocatorOutOfMemory: no free block fits, and new memory passes the cap even after all cached
                memory was released.
            ValueError: ``nbytes`` is not a non-negative int.
        """
        if _check_bytes("nbytes", nbytes) == 0:
            return 0
        size = _round_up(nbytes, _MIN_BLOCK)
        small = size <= _SMALL_SIZE
        if self._expandable is not None:
            block = self._expandable.best_fit(size, small) or self._grow(nbytes, size, small)
            split = block.size - size >= _MIN_BLOCK  # should_split: any 512 bytes, in both pools
        else:
            block = self._take_free_block(size, small) or self._new_segment_for(nbytes, size, small)
            remainder = block.size - size
            split = remainder >= _MIN_BLOCK if small else remainder > _SMALL_SIZE and not self._oversize(size)
        if split:
            self._blocks.list_free(self._blocks.split(block, size))
        block.allocated, block.requested = True, nbytes
        self.allocated_bytes += block.size
        self.requested_bytes += nbytes
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, self.allocated_bytes)
        self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)
        return block.address

    def free(self, handle: int) -> None:
        """Free the block of ``handle`` and merge it with its free neighbours; the memory stays reserved.

        Raises:
            ValueError: ``handle`` is not a live allocation of this allocator.
        """
        if isinstance(handle, bool) or not isinstance(handle, int):
            block = None
        elif handle == 0:
            return  # the null handle of an empty allocation, like cudaFree(nullptr)
        else:
            block = self._blocks.by_address.get(handle)
        if block is None or not block.allocated:
            raise ValueError(
                f"Expected `handle` to be a live allocation of this allocator, but got {handle!r} "
                "(never returned by malloc, or already freed). Free each handle malloc returned once."
            )
        block.allocated = False
        self.allocated_bytes -= block.size
        self.requested_bytes -= block.requested
        for neighbour in (block.next, block.prev):  # free_block: a free neighbour on mapped pages merges
            if neighbour is not None and not neighbour.allocated and neighbour.mapped:
                self._blocks.unlist_free(neighbour)
                left, right = (block, neighbour) if neighbour is block.next else (neighbour, block)
                block = self._blocks.merge(left, right)
        self._blocks.list_free(block)

    def block_size(self, handle: int) -> int:
        """The bytes the block of ``handle`` takes (its rounded, or unsplit, size); 0 for the null handle."""
        return 0 if handle == 0 else self._blocks.by_address[handle].size

    def empty_cache(self) -> None:
        """Release cached memory in both pools: every entirely free segment, or with expandable segments
        every whole page inside a free block (``release_cached_blocks``)."""
        if self._expandable is not None:
            self.reserved_bytes -= self._expandable.release()
            return
        for block in self._cached_segments():
            self._release_segment(block)

    def would_fit(self, nbytes: int) -> bool:
        """Tell whether ``malloc(nbytes)`` would succeed now, changing nothing."""
        if _check_bytes("nbytes", nbytes) == 0 or self.cap is None:
            return True
        if self._expandable is not None or self._mss is not None:
            try:
                self._copy().malloc(nbytes)
            except AllocatorOutOfMemory:
                return False
            return True
        size = _round_up(nbytes, _MIN_BLOCK)
        if self._blocks.first_fit_index(size, size <= _SMALL_SIZE) < len(
            self._blocks.free[size <= _SMALL_SIZE]
        ):
            return True
        cached = sum(block.size for block in self._cached_segments())
        return self.reserved_bytes - cached + _segment_size(size) <= self.cap

    def reset_peaks(self) -> None:
        """Set every peak to its current value, as ``torch.cuda.reset_peak_memory_stats`` does."""
        self.peak_allocated_bytes, self.peak_reserved_bytes = self.allocated_bytes, self.reserved_bytes
        self.peak_requested_bytes = self.requested_bytes

    def snapshot(self) -> list[SegmentInfo]:
        """Describe every segment and its blocks, in address order; an expandable segment as one
        :class:`SegmentInfo` per range of mapped pages, as ``torch.cuda.memory_snapshot`` does."""
        if self._expandable is None:
            result = []
            for address, size in sorted(self._segments.items()):
                blocks = self._chain(address)
                infos = tuple(BlockInfo(b.address - address, b.size, b.allocated) for b in blocks)
                result.append(SegmentInfo(address, size, blocks[0].small, infos))
            return result
        runs: list[SegmentInfo] = []
        for _, small, blocks in self._expandable.segments():
            run: list[Block] = []
            for block in [*blocks, None]:
                if block is not None and block.mapped:
                    run.append(block)
                elif run:
                    start = run[0].address
                    infos = tuple(BlockInfo(b.address - start, b.size, b.allocated) for b in run)
                    runs.append(SegmentInfo(start, sum(b.size for b in run), small, infos, expandable=True))
                    run = []
        return runs

    def layout(self) -> tuple[SegmentLayout, ...]:
        """The state that decides where future requests go, without addresses, and hashable.

        Two allocators of the same cap and configuration whose layouts are equal place any sequence of
        future requests, and frees of the blocks at the same offsets, alike: equal layouts after two
        consecutive training steps mean the allocator has reached its fixed point. The large pool's
        segments come first, then the small pool's, each pool's in address order (the order that breaks
        ties between equal free blocks; the pools never serve each other).
        """
        segments: list[SegmentLayout] = []
        if self._expandable is None:
            for address, size in sorted(self._segments.items()):
                blocks = self._chain(address)
                infos = tuple(BlockInfo(b.address - address, b.size, b.allocated) for b in blocks)
                segments.append(SegmentLayout(blocks[0].small, size, infos))
        else:
            for base, small, blocks in self._expandable.segments():
                mapped = tuple(BlockInfo(b.address - base, b.size, b.allocated) for b in blocks if b.mapped)
                holes = tuple((b.address - base, b.size) for b in blocks if not b.mapped)
                segments.append(SegmentLayout(small, sum(b.size for b in blocks), mapped, holes))
        return tuple(sorted(segments, key=lambda s: s.small))

    def _chain(self, address: int) -> list[Block]:
        blocks, block = [], self._blocks.by_address.get(address)
        while block is not None:
            blocks.append(block)
            block = block.next
        return blocks

    def _cached_segments(self) -> list[Block]:
        free = (
            self._blocks.by_address[address] for keys in self._blocks.free.values() for _, address in keys
        )
        return [block for block in free if block.prev is None and block.next is None]

    def _oversize(self, size: int) -> bool:
        return self._mss is not None and size >= self._mss

    def _take_free_block(self, size: int, small: bool) -> Block | None:
        keys = self._blocks.free[small]
        i = self._blocks.first_fit_index(size, small)  # best fit: smallest size, then lowest address
        if i == len(keys):
            return None
        # get_free_block: an oversize block serves only oversize requests, and only within 20 MiB of it.
        if self._mss is not None and (
            self._oversize(keys[i][0]) if size < self._mss else keys[i][0] >= size + _LARGE_SEGMENT
        ):
            return None
        return self._blocks.by_address[keys.pop(i)[1]]

    def _new_segment_for(self, nbytes: int, size: int, small: bool) -> Block:
        """``alloc_block``, and the releases and retries before an out-of-memory, for a whole segment."""
        segment = _segment_size(size)
        if not self._room_for(segment) and not (
            self._release_oversize(size, small) and self._room_for(segment)
        ):
            self.num_alloc_retries += 1
            self.empty_cache()
            if not self._room_for(segment):
                self._out_of_memory(nbytes, segment)
        address, self._next_address = self._next_address, self._next_address + segment
        block = self._blocks.add(Block(address, segment, small))
        self._segments[address] = segment
        self._add_reserved(segment)
        return block

    def _room_for(self, nbytes: int) -> bool:
        return self.cap is None or self.reserved_bytes + nbytes <= self.cap

    def _release_oversize(self, size: int, small: bool) -> bool:
        """``release_available_cached_blocks``: with max_split_size, free the smallest cached oversize
        segment that covers the request, or else the largest ones until they do."""
        if self._mss is None:
            return False
        target, keys = max(size, self._mss), self._blocks.free[small]
        i = self._blocks.first_fit_index(target, small)
        if i < len(keys):
            self._release_segment(self._blocks.by_address[keys[i][1]])
            return True
        released = 0
        while released < target and keys and self._oversize(keys[-1][0]):
            released += keys[-1][0]
            self._release_segment(self._blocks.by_address[keys[-1][1]])
        return released >= target

    def _release_segment(self, block: Block) -> None:
        self._blocks.unlist_free(block)
        del self._blocks.by_address[block.address], self._segments[block.address]
        self.reserved_bytes -= block.size

    def _grow(self, nbytes: int, size: int, small: bool) -> Block:
        """``alloc_block`` with expandable segments, and the release and retry before an out-of-memory."""
        block = self._map(size, small)
        if block is None:
            self.num_alloc_retries += 1
            self.empty_cache()
            block = self._map(size, small)
            if block is None:
                self._out_of_memory(nbytes, _segment_size(size))
        return block

    def _map(self, size: int, small: bool) -> Block | None:
        assert self._expandable is not None
        # The fraction is checked against the segment the request would get without expandable segments.
        if not self._room_for(_segment_size(size)):
            return None
        headroom = None if self.cap is None else self.cap - self.reserved_bytes
        block, mapped = self._expandable.grow(size, small, headroom)
        self._add_reserved(mapped)
        return block

    def _add_reserved(self, nbytes: int) -> None:
        self.reserved_bytes += nbytes
        self.peak_reserved_bytes = max(self.peak_reserved_bytes, self.reserved_bytes)

    def _out_of_memory(self, nbytes: int, segment: int) -> NoReturn:
        assert self.cap is not None  # only a cap refuses memory
        self.num_ooms += 1
        raise AllocatorOutOfMemory(nbytes, segment, self.allocated_bytes, self.reserved_bytes, self.cap)

    def _copy(self) -> CachingAllocator:
        twin = CachingAllocator(self.cap, self.config)
        twin._blocks = self._blocks.copy()
        twin._segments, twin._next_address = dict(self._segments), self._next_address
        if self._expandable is not None:
            twin._expandable = self._expandable.copy(twin._blocks)
        twin.allocated_bytes, twin.reserved_bytes = self.allocated_bytes, self.reserved_bytes
        twin.requested_bytes = self.requested_bytes
        return twin


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


def replay(
    events: Iterable[Sequence[object]], cap: int | None, config: AllocatorConfig = _DEFAULT_CONFIG
) -> ReplayResult:
    """Run a trace of ``("alloc", id, nbytes)`` and ``("free", id)`` events on a fresh allocator.

    The replay stops at the first allocation that runs out of memory (the step would have failed there);
    it never raises for one.

    Example:
        >>> replay([("alloc", "x", 3 << 20), ("free", "x"), ("alloc", "y", 1)], cap=None)
        ReplayResult(peak_allocated=3145728, peak_reserved=23068672, first_oom=None)

    Raises:
        ValueError: an event is malformed, allocates a live id, or frees an id that is not live.
    """
    allocator = CachingAllocator(cap, config)
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
