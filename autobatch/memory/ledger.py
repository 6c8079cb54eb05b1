"""What an emulated device holds: every live block, the limit, and the trace of a measured region.

A :class:`Ledger` is the book-keeping of one :class:`~autobatch.memory.emulate.EmulatedDevice`. It counts real
storages (held through weak references, so a storage freed anywhere, inside a measured region or not,
leaves the count) and *synthetic* blocks (the replayed prefix of a training run, :meth:`Ledger.replay`),
each as a block of a :class:`~autobatch.memory.allocator.CachingAllocator` (``allocator=True``: the limit caps
reserved memory) or rounded to 512 bytes (the limit caps live bytes). It lives as long as its device: the
allocator's cache carries from one measured region to the next, as a process's does from one training step
to the next.

While a region is traced, every allocation and free is recorded in order, with ids local to the region:
``("alloc", i, nbytes)`` for the region's i-th allocation (its size before rounding), ``("free", i)``,
``("free", ("resident", j))`` for the j-th block that was live when the region began (in allocation
order), and ``("mark", label)`` where the training step marks a phase (a micro-step, the optimizer step).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import torch

from autobatch.memory.alloc_conf import AllocatorConfig
from autobatch.memory.allocator import AllocatorOutOfMemory, CachingAllocator
from autobatch.units import format_bytes

__all__ = ["BLOCK_BYTES", "Ledger"]

BLOCK_BYTES = 512
"""Every storage is rounded up to this many bytes, the block size of PyTorch's CUDA caching allocator."""


def _rounded(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


class _Entry:
    """One live block: its counted size, allocator handle, allocation index and requested bytes."""

    __slots__ = ("handle", "index", "nbytes", "ref", "size")

    def __init__(self, size: int, handle: int, index: int, nbytes: int, ref: Any = None) -> None:
        self.size, self.handle, self.index, self.nbytes, self.ref = size, handle, index, nbytes, ref


class Ledger:
    """Live blocks of one emulated device under one limit (``None``: count, never refuse).

    Args:
        limit: the device capacity in bytes, or ``None``.
        allocator: cap reserved memory through a model of CUDA's caching allocator.
        block_bytes: the rounding of live bytes where there is no allocator model.
        config: the allocator's configuration (expandable segments, ...).
    """

    def __init__(
        self,
        limit: int | None,
        *,
        allocator: bool = False,
        block_bytes: int = BLOCK_BYTES,
        config: AllocatorConfig | None = None,
    ) -> None:
        self.limit = limit
        self.block_bytes = block_bytes
        self.allocator = CachingAllocator(limit, config or AllocatorConfig()) if allocator else None
        self._live: dict[Hashable, _Entry] = {}  # a storage's key, or ("synthetic", id)
        self._lock = threading.RLock()
        self._next_index = 0
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.resident_bytes = 0
        self._trace: list[tuple[Any, ...]] | None = None
        self._region: dict[int, int] = {}  # allocation index -> the region's id
        self._residents: dict[int, int] = {}  # allocation index -> position among the region's residents
        self.resident_sizes: list[int] = []

    # -- totals -------------------------------------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        """Bytes in the allocator's segments (allocator mode), else the live bytes."""
        return self.allocator.reserved_bytes if self.allocator is not None else self.allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        """The most reserved bytes in the region (allocator mode), else the live peak."""
        return self.allocator.peak_reserved_bytes if self.allocator is not None else self.peak_bytes

    def holds(self, key: Hashable) -> bool:
        """Whether the storage with this key (``storage._cdata``) is counted."""
        return key in self._live

    def size_of(self, key: Hashable) -> int:
        """The bytes a counted storage takes."""
        return self._live[key].size

    # -- allocation ---------------------------------------------------------------------------------
    def take(self, storages: Sequence[torch.UntypedStorage]) -> None:
        """Count new storages, all or none.

        Raises:
            torch.OutOfMemoryError: they do not fit under the limit; nothing was counted.
        """
        sizes = [st.nbytes() for st in storages]
        with self._lock:
            handles = self._malloc(sizes)
            for st, nbytes, handle in zip(storages, sizes, handles, strict=True):
                self._add(st._cdata, nbytes, handle, self._watch(st))

    def grow(self, key: int, storage: torch.UntypedStorage) -> None:
        """A counted storage that an op resized in place: a block for its new size, the old one freed."""
        entry = self._live[key]
        (handle,) = self._malloc([storage.nbytes()], replacing=entry.size)
        if self.allocator is None:  # live bytes: the difference, never both at once
            self._remove(key)
            self._add(key, storage.nbytes(), handle, entry.ref)
            return
        # The allocator holds both blocks while the data is copied: the new one, then the old one freed.
        self._add(("growing", key), storage.nbytes(), handle, entry.ref)
        self._remove(key)
        self._live[key] = self._live.pop(("growing", key))

    def _malloc(self, sizes: Sequence[int], replacing: int = 0) -> list[int]:
        if self.allocator is None:
            request = sum(_rounded(n, self.block_bytes) for n in sizes) - replacing
            if self.limit is not None and self.allocated_bytes + request > self.limit:
                error = torch.OutOfMemoryError(self._oom_message(request))
                error.demand_bytes = self.allocated_bytes + request  # type: ignore[attr-defined]
                raise error
            return [0] * len(sizes)
        handles: list[int] = []
        try:
            for nbytes in sizes:
                handles.append(self.allocator.malloc(nbytes))
        except AllocatorOutOfMemory as exc:
            for handle in handles:
                self.allocator.free(handle)
            error = torch.OutOfMemoryError(f"Emulated device out of memory. {exc}")
            error.demand_bytes = exc.reserved + exc.segment_size  # type: ignore[attr-defined]
            raise error from None
        return handles

    def _add(self, key: Hashable, nbytes: int, handle: int, ref: Any) -> None:
        size = self.allocator.block_size(handle) if self.allocator is not None and handle else 0
        size = size or _rounded(nbytes, self.block_bytes)
        index, self._next_index = self._next_index, self._next_index + 1
        self._live[key] = _Entry(size, handle, index, nbytes, ref)
        self.allocated_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
        if self._trace is not None:
            self._region[index] = len(self._region)
            self._trace.append(("alloc", self._region[index], nbytes))

    def _remove(self, key: Hashable) -> None:
        entry = self._live.pop(key)
        self.allocated_bytes -= entry.size
        if self.allocator is not None:
            self.allocator.free(entry.handle)
        if self._trace is not None:
            if entry.index in self._region:
                self._trace.append(("free", self._region[entry.index]))
            elif entry.index in self._residents:
                self._trace.append(("free", ("resident", self._residents[entry.index])))

    def _watch(self, storage: torch.UntypedStorage) -> Any:
        """A weak reference that removes the storage from the count when it is freed, wherever."""
        key, ledger = storage._cdata, weakref.ref(self)

        def freed(ref: Any) -> None:
            owner = ledger()
            if owner is not None:
                with owner._lock:  # another thread (a loader's, a backend's) may drop the last reference
                    entry = owner._live.get(key)
                    if entry is not None and entry.ref is ref:
                        owner._remove(key)

        return weakref.ref(storage, freed)

    # -- regions ------------------------------------------------------------------------------------
    def open_region(self, trace: bool) -> None:
        """Start a measured region: peaks from now on; with ``trace``, record its events."""
        self.resident_bytes = self.peak_bytes = self.allocated_bytes
        if self.allocator is not None:
            self.allocator.reset_peaks()
        self._trace, self._region = ([] if trace else None), {}
        with self._lock:
            live = sorted(self._live.values(), key=lambda e: e.index)
        self._residents = {e.index: j for j, e in enumerate(live)} if trace else {}
        self.resident_sizes = [e.nbytes for e in live] if trace else []

    def close_region(self) -> tuple[tuple[int, ...], tuple[tuple[Any, ...], ...]] | None:
        """End the region; its ``(resident sizes, events)`` where it was traced."""
        trace, self._trace = self._trace, None
        return None if trace is None else (tuple(self.resident_sizes), _settled(trace))

    def mark(self, label: str) -> None:
        """Record a phase boundary of the step in the trace (nothing when not tracing)."""
        if self._trace is not None:
            self._trace.append(("mark", label))

    # -- synthetic blocks ---------------------------------------------------------------------------
    def replay(self, events: Iterable[Sequence[Any]]) -> None:
        """Apply synthetic ``("alloc", id, nbytes)``/``("free", id)`` events: blocks that no tensor holds,
        standing for earlier training steps (``"mark"`` events are skipped).

        Raises:
            torch.OutOfMemoryError: an allocation does not fit.
        """
        for event in events:
            if event[0] == "alloc":
                (handle,) = self._malloc([int(event[2])])
                self._add(("synthetic", event[1]), int(event[2]), handle, None)
            elif event[0] == "free":
                self._remove(("synthetic", event[1]))

    def adopt(self, storages: Sequence[torch.UntypedStorage]) -> bool:
        """Let real storages take over the live synthetic blocks of their size, in allocation order.

        Returns ``False`` and changes nothing unless every storage finds a block and no synthetic block
        is left over: the prefix then does not describe these tensors.
        """
        synthetic = sorted(
            ((key, e) for key, e in self._live.items() if isinstance(key, tuple) and key[0] == "synthetic"),
            key=lambda item: item[1].index,
        )
        pending = [st for st in storages if st._cdata not in self._live]
        if len(pending) != len(synthetic):
            return False
        taken: dict[int, Hashable] = {}
        free = list(synthetic)
        for st in pending:
            match = next((i for i, (_, e) in enumerate(free) if e.nbytes == st.nbytes()), None)
            if match is None:
                return False
            taken[id(st)] = free.pop(match)[0]
        for st in pending:
            entry = self._live.pop(taken[id(st)])
            entry.ref = self._watch(st)
            self._live[st._cdata] = entry
        return True

    def _oom_message(self, request: int) -> str:
        assert self.limit is not None
        free = max(0, self.limit - self.allocated_bytes)
        return (
            f"Emulated device out of memory. Tried to allocate {format_bytes(request)} "
            f"(device capacity {format_bytes(self.limit)}; {format_bytes(self.allocated_bytes)} "
            f"already allocated, of which {format_bytes(self.resident_bytes)} resident when the step "
            f"started; {format_bytes(free)} free). Use a smaller batch or a larger memory_limit."
        )


def _settled(events: list[tuple[Any, ...]]) -> tuple[tuple[Any, ...], ...]:
    """The events, each run of frees with nothing between them in one order (by id). Their order is the
    order a hash map held them in (autocast's cache of cast weights), which varies with addresses from run
    to run; a caching allocator ends in the same state whatever the order of frees in a row."""
    out: list[tuple[Any, ...]] = []
    run: list[tuple[Any, ...]] = []
    for event in [*events, ("end",)]:
        if event[0] == "free":
            run.append(event)
            continue
        out += sorted(run, key=lambda e: (isinstance(e[1], tuple), e[1]))
        run = []
        if event[0] != "end":
            out.append(event)
    return tuple(out)
