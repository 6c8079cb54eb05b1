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
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from autobatch._tree import map_tensors
from autobatch.units import format_bytes

__all__ = ["BLOCK_BYTES", "EmulatedDevice"]

BLOCK_BYTES = 512
"""Every storage is rounded up to this many bytes, the block size of PyTorch's CUDA caching allocator."""


def _rounded(nbytes: int, block: int) -> int:
    return -(-nbytes // block) * block


class EmulatedDevice(TorchDispatchMode):
    """Count live tensor bytes on ``device`` and raise ``torch.OutOfMemoryError`` past ``limit``.

    Args:
        limit: device capacity in bytes.
        resident: tensors that already live on the device when it is entered (parameters, buffers,
            gradients, optimizer state); their storages count from the start.
        device: the device whose tensors are counted (tensors elsewhere are ignored).
        block_bytes: allocation granularity; each storage is rounded up to a multiple of it.

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
        limit: int,
        resident: Iterable[torch.Tensor] = (),
        *,
        device: torch.device | str = "cpu",
        block_bytes: int = BLOCK_BYTES,
    ) -> None:
        super().__init__()
        if not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0:
            raise ValueError(f"Expected `limit` to be a positive int of bytes, but got {limit!r}.")
        self.limit = limit
        self.device = torch.device(device)
        self.block_bytes = block_bytes
        self._resident = list(resident)
        self._live: dict[int, tuple[int, weakref.ref[Any]]] = {}
        self.allocated_bytes = 0
        self.peak_bytes = 0
        self.resident_bytes = 0

    # -- bookkeeping -----------------------------------------------------------------------------
    def _counts(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t.device == self.device and not t.is_meta

    def _size(self, storage: torch.UntypedStorage) -> int:
        return _rounded(storage.nbytes(), self.block_bytes)

    def _track(self, storage: torch.UntypedStorage) -> None:
        # Keyed by the storage itself (its StorageImpl), which survives a resize that moves the data.
        key = storage._cdata
        size = self._size(storage)
        self_ref = weakref.ref(self)

        def free(ref: weakref.ref[Any], key: int = key) -> None:
            dev = self_ref()
            if dev is not None:
                entry = dev._live.get(key)
                if entry is not None and entry[1] is ref:
                    del dev._live[key]
                    dev.allocated_bytes -= entry[0]

        self._live[key] = (size, weakref.ref(storage, free))
        self.allocated_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def _grow(self, key: int, size: int) -> None:
        old, ref = self._live[key]
        self._live[key] = (size, ref)
        self.allocated_bytes += size - old
        self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)

    def _allocations(
        self, out: object, inputs: set[int]
    ) -> tuple[list[torch.UntypedStorage], dict[int, int]]:
        """Storages ``out`` holds that the op allocated, and counted storages it grew (key → size)."""
        new: dict[int, torch.UntypedStorage] = {}
        grown: dict[int, int] = {}
        for t in tree_flatten(out)[0]:
            if not self._counts(t):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._live:
                if self._size(st) > self._live[key][0]:  # resized in place (an `out=` argument)
                    grown[key] = self._size(st)
            elif key not in inputs:  # inputs never counted are host memory, e.g. a dataset
                new[key] = st
        return list(new.values()), grown

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` as device memory from now on (views of counted storages add nothing)."""
        for t in tensors:
            if self._counts(t):
                st = t.untyped_storage()
                if st._cdata not in self._live:
                    self._track(st)

    def transfer(self, batch: Any) -> Any:
        """Copy every tensor of ``batch`` onto the emulated device, as a host-to-device copy would."""
        return map_tensors(torch.clone, batch)

    # -- TorchDispatchMode -----------------------------------------------------------------------
    def __enter__(self) -> EmulatedDevice:
        self.register(self._resident)
        self._resident = []
        self.resident_bytes = self.allocated_bytes
        super().__enter__()
        return self

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and not t.is_meta
        }
        new, grown = self._allocations(out, inputs)
        if not new and not grown:
            return out
        request = sum(self._size(st) for st in new) + sum(
            size - self._live[key][0] for key, size in grown.items()
        )
        if self.allocated_bytes + request > self.limit:
            # Drop the outputs before raising: the failed allocation must not stay alive in the
            # traceback's frame.
            out = None
            new.clear()
            raise torch.OutOfMemoryError(self._oom_message(request))
        for st in new:
            self._track(st)
        for key, size in grown.items():
            self._grow(key, size)
        return out

    def _oom_message(self, request: int) -> str:
        free = max(0, self.limit - self.allocated_bytes)
        return (
            f"Emulated device out of memory. Tried to allocate {format_bytes(request)} "
            f"(device capacity {format_bytes(self.limit)}; {format_bytes(self.allocated_bytes)} "
            f"already allocated, of which {format_bytes(self.resident_bytes)} resident when the step "
            f"started; {format_bytes(free)} free). Use a smaller batch or a larger memory_limit."
        )
