"""An emulated accelerator: counts the bytes of live tensor storages and runs out of memory at a limit.

No development or CI machine has a GPU, yet out-of-memory behaviour must be tested exactly. While an
:class:`EmulatedDevice` is active, every ATen operation goes through it (a ``TorchDispatchMode``): each
output storage that the operation allocated (not a view of an input, not an in-place result) is counted
until the storage is freed, rounded up to the allocator's block size like CUDA's caching allocator.
Tensors that already hold device memory when the device is entered (parameters, buffers, gradients,
optimizer state) are registered as resident. Host-side tensors that never went through the device (a
dataset that batches are sliced from) are not device memory and are never counted.

When an operation would push the live total past the limit, its outputs are dropped before
``torch.OutOfMemoryError`` is raised: the failed allocation is not held, as with a real allocator. The
count is deterministic: the same model, batch and limit give the same peak on every run.

Two ways to apply the limit:

* **ideal** (the default): the limit caps the live bytes, each storage rounded to 512 bytes;
* **allocator**: every storage is a block of a :class:`~autobatch.allocator.CachingAllocator`, which
  follows PyTorch's CUDA caching allocator (small and large pools, segments, best fit, splitting and
  merging, cached segments released before an out-of-memory), and the limit caps *reserved* memory, as
  ``torch.cuda.set_per_process_memory_fraction`` does on a GPU. Each measured region starts from a fresh
  allocator that holds the resident tensors, packed.

With ``trace=True`` the device also records the region's allocations and frees in order (see
:attr:`EmulatedDevice.trace`), which :mod:`autobatch.timeline` turns into a memory model. With ``limit=None``
it only observes: it counts and traces and never raises (the probe's observer on CUDA).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch._tree import map_tensors
from autobatch.allocator import AllocatorOutOfMemory, CachingAllocator
from autobatch.units import format_bytes

__all__ = ["BLOCK_BYTES", "EmulatedDevice"]

BLOCK_BYTES = 512
"""Every storage is rounded up to this many bytes, the block size of PyTorch's CUDA caching allocator."""


def _flat(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of an op's arguments or outputs (tensors, and lists, tuples and dicts of them).

    A plain recursion: torch's generic pytree walk cost a third of an emulated step's time.
    """
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _flat(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _flat(item, out)
    return out


def _rounded(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


class EmulatedDevice(TorchDispatchMode):
    """Count live tensor bytes on ``device`` and raise ``torch.OutOfMemoryError`` past ``limit``.

    Args:
        limit: device capacity in bytes, or ``None`` to observe without a limit.
        resident: tensors that already live on the device when it is entered (parameters, buffers,
            gradients, optimizer state); their storages count from the start.
        device: the device whose tensors are counted (tensors elsewhere are ignored).
        block_bytes: allocation granularity in ideal mode; each storage is rounded up to a multiple of it.
        allocator: cap reserved memory through a model of CUDA's caching allocator instead.
        trace: record the region's allocations and frees (:attr:`trace`, :attr:`resident_sizes`).

    Example:
        >>> import torch
        >>> with EmulatedDevice(limit=1 << 20) as dev:
        ...     x = torch.ones(1000)          # 4000 bytes, one 4096-byte block after rounding
        ...     del x
        >>> dev.peak_bytes, dev.allocated_bytes
        (4096, 0)
    """

    def __init__(
        self,
        limit: int | None,
        resident: Iterable[torch.Tensor] = (),
        *,
        device: torch.device | str = "cpu",
        block_bytes: int = BLOCK_BYTES,
        allocator: bool = False,
        trace: bool = False,
    ) -> None:
        super().__init__()
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise ValueError(f"Expected `limit` to be a positive int of bytes or None, but got {limit!r}.")
        self.limit = limit
        self.device = torch.device(device)
        self.block_bytes = block_bytes
        self.allocator = CachingAllocator(limit) if allocator else None
        self._resident = list(resident)
        # storage key -> (counted bytes, weakref, allocator handle, trace index)
        self._live: dict[int, tuple[int, weakref.ref[Any], int, int]] = {}
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.resident_bytes = 0
        self.trace: list[tuple[Any, ...]] | None = [] if trace else None
        """The region's events in order: ``("alloc", i, nbytes)`` (the i-th storage allocated, its size before
        rounding) and ``("free", i)``; ``None`` unless ``trace=True``."""
        self.resident_sizes: list[int] = []
        """The sizes (before rounding) of the resident storages, in the order they were registered."""
        self._tracing = False
        self._next_index = 0

    @property
    def reserved_bytes(self) -> int:
        """Bytes in the allocator's segments (allocator mode), else the live bytes."""
        return self.allocator.reserved_bytes if self.allocator is not None else self.allocated_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        """The most reserved bytes in the region (allocator mode), else the live peak."""
        return self.allocator.peak_reserved_bytes if self.allocator is not None else self.peak_bytes

    # -- bookkeeping -----------------------------------------------------------------------------
    def _counts(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.device == self.device and not t.is_meta

    def _size(self, storage: torch.UntypedStorage) -> int:
        return _rounded(storage.nbytes(), self.block_bytes)

    def _track(self, storage: torch.UntypedStorage, handle: int = 0) -> None:
        # Keyed by the storage itself (its StorageImpl), which survives a resize that moves the data.
        key = storage._cdata
        size = self._counted(storage, handle)
        index = self._record("alloc", storage.nbytes())
        self_ref = weakref.ref(self)

        def free(ref: weakref.ref[Any], key: int = key) -> None:
            dev = self_ref()
            if dev is not None:
                entry = dev._live.get(key)
                if entry is not None and entry[1] is ref:
                    dev._release(key)

        self._live[key] = (size, weakref.ref(storage, free), handle, index)
        self.allocated_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def _counted(self, storage: torch.UntypedStorage, handle: int) -> int:
        """The bytes a storage counts for: its allocator block, or its size rounded to a block."""
        if self.allocator is not None and handle:
            return self.allocator.block_size(handle)
        return self._size(storage)

    def _release(self, key: int) -> None:
        size, _, handle, index = self._live.pop(key)
        self.allocated_bytes -= size
        if self.allocator is not None:
            self.allocator.free(handle)
        self._record("free", index)

    def _record(self, kind: str, value: int) -> int:
        """Append an event while the region is open; returns an alloc's index."""
        if kind == "alloc":
            index, self._next_index = self._next_index, self._next_index + 1
            if self.trace is not None and self._tracing:
                self.trace.append(("alloc", index, value))
            return index
        if self.trace is not None and self._tracing and value >= 0:
            self.trace.append(("free", value))
        return value

    def _grow(self, key: int, storage: torch.UntypedStorage, handle: int) -> None:
        """A storage an op resized in place: a new block for its new size, then the old one freed."""
        old_size, ref, old_handle, old_index = self._live[key]
        size = self._counted(storage, handle)
        index = self._record("alloc", storage.nbytes())
        if self.allocator is not None:
            self.allocator.free(old_handle)
        self._record("free", old_index)
        self._live[key] = (size, ref, handle, index)
        self.allocated_bytes += size - old_size
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def _allocations(
        self, out: object, arguments: object
    ) -> tuple[list[torch.UntypedStorage], dict[int, int]]:
        """Storages ``out`` holds that the op allocated, and counted storages it grew (key → size)."""
        new: dict[int, torch.UntypedStorage] = {}
        grown: dict[int, int] = {}
        inputs: set[int] | None = None  # the arguments' storages, gathered only when needed
        for t in _flat(out, []):
            if not self._counts(t):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._live:
                if self._size(st) > self._live[key][0]:  # resized in place (an `out=` argument)
                    grown[key] = self._size(st)
                continue
            if inputs is None:
                inputs = {a.untyped_storage()._cdata for a in _flat(arguments, []) if not a.is_meta}
            if key not in inputs:  # inputs never counted are host memory, e.g. a dataset
                new[key] = st
        return list(new.values()), grown

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` as device memory from now on (views of counted storages add nothing).

        Raises:
            torch.OutOfMemoryError: in allocator mode, the tensors do not fit under the limit.
        """
        for t in tensors:
            if self._counts(t):
                st = t.untyped_storage()
                if st._cdata not in self._live:
                    handle = self._malloc([st])[0] if self.allocator is not None else 0
                    self.resident_sizes.append(st.nbytes())
                    self._track(st, handle)

    def _malloc(self, storages: list[torch.UntypedStorage]) -> list[int]:
        """Allocator blocks for ``storages``, all or none; raises torch.OutOfMemoryError."""
        assert self.allocator is not None
        handles: list[int] = []
        try:
            for st in storages:
                handles.append(self.allocator.malloc(st.nbytes()))
        except AllocatorOutOfMemory as exc:
            for handle in handles:
                self.allocator.free(handle)
            error = torch.OutOfMemoryError(f"Emulated device out of memory. {exc}")
            error.demand_bytes = exc.reserved + exc.segment_size  # type: ignore[attr-defined]
            raise error from None
        return handles

    def transfer(self, batch: Any) -> Any:
        """Copy every tensor of ``batch`` onto the emulated device, as a host-to-device copy would."""
        return map_tensors(torch.clone, batch)

    # -- TorchDispatchMode -----------------------------------------------------------------------
    def __enter__(self) -> EmulatedDevice:
        self.register(self._resident)
        self._resident = []
        self.resident_bytes = self.allocated_bytes
        if self.allocator is not None:
            self.allocator.reset_peaks()
        self._tracing = True
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tracing = False  # frees after the region are not part of its trace
        super().__exit__(*exc)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        new, grown = self._allocations(out, (args, kwargs))
        if not new and not grown:
            return out
        if self.allocator is not None:
            storages = {**{st._cdata: st for st in new}, **self._grown_storages(out, grown)}
            try:
                handles = dict(zip(storages, self._malloc(list(storages.values())), strict=True))
            except torch.OutOfMemoryError:
                out = None  # drop the outputs: the failed allocation must not stay alive in the traceback
                new.clear()
                raise
            for st in new:
                self._track(st, handles[st._cdata])
            for key in grown:
                self._grow(key, storages[key], handles[key])
            return out
        request = sum(self._size(st) for st in new) + sum(
            size - self._live[key][0] for key, size in grown.items()
        )
        if self.limit is not None and self.allocated_bytes + request > self.limit:
            # Drop the outputs before raising: the failed allocation must not stay alive in the
            # traceback's frame.
            out = None
            new.clear()
            error = torch.OutOfMemoryError(self._oom_message(request))
            error.demand_bytes = self.allocated_bytes + request  # type: ignore[attr-defined]
            raise error
        for st in new:
            self._track(st)
        for key in grown:
            self._grow(key, self._storage_of(out, key), 0)
        return out

    def _storage_of(self, out: object, key: int) -> torch.UntypedStorage:
        for t in _flat(out, []):
            if t.untyped_storage()._cdata == key:
                return t.untyped_storage()
        raise AssertionError("a grown storage is among the outputs")  # pragma: no cover

    def _grown_storages(self, out: object, grown: dict[int, int]) -> dict[int, torch.UntypedStorage]:
        return {key: self._storage_of(out, key) for key in grown}

    def _oom_message(self, request: int) -> str:
        assert self.limit is not None
        free = max(0, self.limit - self.allocated_bytes)
        return (
            f"Emulated device out of memory. Tried to allocate {format_bytes(request)} "
            f"(device capacity {format_bytes(self.limit)}; {format_bytes(self.allocated_bytes)} "
            f"already allocated, of which {format_bytes(self.resident_bytes)} resident when the step "
            f"started; {format_bytes(free)} free). Use a smaller batch or a larger memory_limit."
        )
