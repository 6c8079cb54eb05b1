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
* **allocator**: every storage is a block of a :class:`~autobatch.memory.allocator.CachingAllocator`, which
  follows PyTorch's CUDA caching allocator (small and large pools, segments, best fit, splitting and
  merging, cached segments released before an out-of-memory), and the limit caps *reserved* memory, as
  ``torch.cuda.set_per_process_memory_fraction`` does on a GPU.

A device can be entered again and again: what it counts (its :class:`~autobatch.memory.ledger.Ledger`) carries
from one region to the next, as a process's memory does from one training step to the next. A storage
made in one step and kept (a tensor a model holds on to) keeps counting in the next; a freshly made device
holds the resident tensors packed, as after ``model.to(device)``. :meth:`EmulatedDevice.replay` puts
synthetic blocks in place of earlier training steps, and :meth:`EmulatedDevice.adopt` hands them to the
real tensors they stand for, so that one real step runs exactly where a replay of the steps before it left
the allocator (:mod:`autobatch.memory.survival`).

With ``trace=True`` the device also records each region's allocations and frees in order (see
:attr:`EmulatedDevice.trace`), which :mod:`autobatch.memory.timeline` turns into a memory model. With
``limit=None`` it only observes: it counts and traces and never raises (the probe's observer on CUDA).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autobatch._tree import map_tensors
from autobatch.memory.alloc_conf import AllocatorConfig
from autobatch.memory.ledger import BLOCK_BYTES, Ledger

__all__ = ["BLOCK_BYTES", "EmulatedDevice", "flat_tensors"]


def flat_tensors(obj: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors of an op's arguments or outputs (tensors, and lists, tuples and dicts of them).

    A plain recursion: torch's generic pytree walk cost a third of an emulated step's time.
    """
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            flat_tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            flat_tensors(item, out)
    return out


class EmulatedDevice(TorchDispatchMode):
    """Count live tensor bytes on ``device`` and raise ``torch.OutOfMemoryError`` past ``limit``.

    Args:
        limit: device capacity in bytes, or ``None`` to observe without a limit.
        resident: tensors that already live on the device when it is entered (parameters, buffers,
            gradients, optimizer state); their storages count from the start.
        device: the device whose tensors are counted (tensors elsewhere are ignored).
        block_bytes: allocation granularity in ideal mode; each storage is rounded up to a multiple of it.
        allocator: cap reserved memory through a model of CUDA's caching allocator instead.
        trace: record each region's allocations and frees (:attr:`trace`, :attr:`resident_sizes`).
        config: the configuration of the allocator model (expandable segments, ...).

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
        config: AllocatorConfig | None = None,
    ) -> None:
        super().__init__()
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
            raise ValueError(f"Expected `limit` to be a positive int of bytes or None, but got {limit!r}.")
        self.limit = limit
        self.device = torch.device(device)
        self.ledger = Ledger(limit, allocator=allocator, block_bytes=block_bytes, config=config)
        self.allocator = self.ledger.allocator
        self.tracing = trace
        self._resident = list(resident)
        self.trace: list[tuple[Any, ...]] | None = None
        """The last region's events in order (see :mod:`autobatch.memory.ledger`); ``None`` unless
        ``trace=True``."""
        self.resident_sizes: list[int] = []
        """The sizes (before rounding) of the storages live when the last traced region began, in the
        order they were allocated."""

    # -- what it holds ----------------------------------------------------------------------------
    @property
    def allocated_bytes(self) -> int:
        """Bytes of the live blocks (rounded, or as the allocator holds them)."""
        return self.ledger.allocated_bytes

    @property
    def peak_bytes(self) -> int:
        """The most live bytes since the region began."""
        return self.ledger.peak_bytes

    @property
    def resident_bytes(self) -> int:
        """The live bytes when the region began."""
        return self.ledger.resident_bytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes in the allocator's segments (allocator mode), else the live bytes."""
        return self.ledger.reserved_bytes

    @property
    def peak_reserved_bytes(self) -> int:
        """The most reserved bytes in the region (allocator mode), else the live peak."""
        return self.ledger.peak_reserved_bytes

    def _counts(self, t: object) -> bool:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return False
        device = t.device
        # "cpu:0" is the CPU (torchrun's device for a CPU rank); other devices by type and index.
        return device.type == self.device.type and (
            device.type == "cpu" or (device.index or 0) == (self.device.index or 0)
        )

    def register(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count ``tensors`` as device memory from now on (views of counted storages add nothing).

        Raises:
            torch.OutOfMemoryError: the tensors do not fit under the limit.
        """
        for t in tensors:
            if self._counts(t):
                st = t.untyped_storage()
                if not self.ledger.holds(st._cdata):
                    self.ledger.take([st])

    def replay(self, events: Iterable[Sequence[Any]]) -> None:
        """Apply synthetic allocations and frees that stand for earlier steps (see :meth:`Ledger.replay`).

        Raises:
            torch.OutOfMemoryError: they do not fit.
        """
        self.ledger.replay(events)

    def adopt(self, tensors: Iterable[torch.Tensor]) -> bool:
        """Let the storages of ``tensors`` not yet counted take over the synthetic blocks of their size;
        ``False`` (nothing changed) unless they match one to one."""
        storages: dict[int, torch.UntypedStorage] = {}
        for t in tensors:
            if self._counts(t):
                storages.setdefault(t.untyped_storage()._cdata, t.untyped_storage())
        return self.ledger.adopt(list(storages.values()))

    def mark(self, label: str) -> None:
        """Record a phase of the step (``"micro"``, ``"optimizer"``) in the trace."""
        self.ledger.mark(label)

    def _allocations(
        self, out: object, arguments: object
    ) -> tuple[list[torch.UntypedStorage], dict[int, torch.UntypedStorage]]:
        """Storages ``out`` holds that the op allocated, and counted storages it grew (by key)."""
        new: dict[int, torch.UntypedStorage] = {}
        grown: dict[int, torch.UntypedStorage] = {}
        inputs: set[int] | None = None  # the arguments' storages, gathered only when needed
        for t in flat_tensors(out, []):
            if not self._counts(t):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if self.ledger.holds(key):
                if _rounded_size(st, self.ledger.block_bytes) > self.ledger.size_of(key):
                    grown[key] = st  # resized in place (an `out=` argument)
                continue
            if inputs is None:
                inputs = {a.untyped_storage()._cdata for a in flat_tensors(arguments, []) if not a.is_meta}
            if key not in inputs:  # inputs never counted are host memory, e.g. a dataset
                new[key] = st
        return list(new.values()), grown

    def transfer(self, batch: Any) -> Any:
        """Copy every tensor of ``batch`` onto the emulated device, as a host-to-device copy would."""
        return map_tensors(torch.clone, batch)

    # -- TorchDispatchMode -----------------------------------------------------------------------
    def __enter__(self) -> EmulatedDevice:
        self.register(self._resident)
        self._resident = []
        self.ledger.open_region(self.tracing)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        traced = self.ledger.close_region()  # frees after the region are not part of its trace
        if traced is not None:
            self.resident_sizes, self.trace = list(traced[0]), list(traced[1])
        super().__exit__(*exc)

    def enter_with(self, resident: Iterable[torch.Tensor]) -> EmulatedDevice:
        """This device, to be entered again with ``resident`` registered first (those not yet counted)."""
        self._resident = list(resident)
        return self

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
        try:
            if new:
                self.ledger.take(new)
            for key, storage in grown.items():
                self.ledger.grow(key, storage)
        except torch.OutOfMemoryError:
            out = None  # drop the outputs: the failed allocation must not stay alive in the traceback
            new.clear()
            grown.clear()
            raise
        return out


def _rounded_size(storage: torch.UntypedStorage, block: int) -> int:
    return -(-storage.nbytes() // block) * block
