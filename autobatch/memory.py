"""Device memory: one policy for enforcing a limit and measuring a step, for the probe and training alike.

:class:`DeviceMemory` decides, from the device and the limit alone:

* **CUDA**: a limit caps PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``)
  inside :meth:`DeviceMemory.capped`; peaks come from ``max_memory_allocated``/``max_memory_reserved``.
* **Any other device with a limit**: an :class:`~autobatch.emulate.EmulatedDevice` raises
  ``torch.OutOfMemoryError`` at the limit, deterministically. ``emulation`` says how it counts: ``"ideal"``
  live tensor bytes, ``"allocator"`` reserved memory through a model of CUDA's caching allocator (closer to
  what a GPU of that size holds), and ``"auto"`` the allocator from :data:`ALLOCATOR_FROM` up, where a
  GPU's segments are small next to the limit, and live bytes below (a 640 KiB device has no 20 MiB
  segment to hold).
* **No limit**: nothing is enforced (a real allocator failure is still an out-of-memory). The one
  exception is :meth:`DeviceMemory.guarded`, which the probe uses: where device memory is host RAM (the
  CPU, Apple's MPS), a probe without a limit emulates a device of half the RAM available, so that its
  growing batches can never wake the Linux OOM killer, which cannot be caught.

Callers never ask which regime they run in: :meth:`DeviceMemory.measure` is a no-op where nothing can be
measured, and :meth:`DeviceMemory.transfer` always moves a batch onto the device (on an emulated device
that is a counted copy, as a host-to-device copy is).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from autobatch._tree import map_tensors
from autobatch.emulate import EmulatedDevice
from autobatch.errors import UsageTypeError
from autobatch.units import format_bytes, parse_memory_limit

__all__ = [
    "DeviceMemory",
    "Measurement",
    "default_cpu_limit",
    "memory_limit_scope",
    "resolve_memory_limit",
    "tensor_bytes",
]

ALLOCATOR_FROM = 64 * 2**20
"""``emulation="auto"`` models CUDA's caching allocator for limits of at least this many bytes."""

DEFAULT_CPU_FRACTION = 0.5
"""Share of the host's available RAM that a probe may use on a host-memory device when no limit is given."""

_HOST_MEMORY = ("cpu", "mps")
"""Device types whose memory is the host's RAM."""

_SCOPED_LIMIT: ContextVar[int | None] = ContextVar("autobatch_memory_limit", default=None)


@contextlib.contextmanager
def memory_limit_scope(limit: int | str) -> Iterator[int]:
    """Inside the block, probe, fit and try_batch calls that pass no ``memory_limit`` use ``limit``.

    The pytest kit's ``@pytest.mark.memory_limit("4GiB")`` is built on it. Scopes nest; the innermost wins.

    Example:
        >>> with memory_limit_scope("4GiB") as limit:
        ...     resolve_memory_limit(None) == limit
        True
    """
    nbytes = parse_memory_limit(limit)
    if nbytes is None:
        raise UsageTypeError(
            "Expected `memory_limit` to be an int of bytes or a string such as '8GiB', but got None."
        )
    token = _SCOPED_LIMIT.set(nbytes)
    try:
        yield nbytes
    finally:
        _SCOPED_LIMIT.reset(token)


def resolve_memory_limit(value: int | str | None) -> int | None:
    """``value`` in bytes; ``None`` means the enclosing :func:`memory_limit_scope`'s limit, if any."""
    nbytes = parse_memory_limit(value)
    return _SCOPED_LIMIT.get() if nbytes is None else nbytes


def default_cpu_limit() -> int:
    """Half of the host RAM available now: a guarded probe's emulated capacity when none is given."""
    available = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 * 2**30  # no way to ask: assume a modest 8 GiB machine
    return int(available * DEFAULT_CPU_FRACTION)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@dataclass
class Measurement:
    """What one measured region used: peaks in bytes (``None`` where the backend cannot tell)."""

    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    resident_bytes: int | None = None
    trace: tuple[tuple[int, ...], tuple[tuple[Any, ...], ...]] | None = None
    """With ``trace=True``: the sizes of the resident tensors and the region's allocations and frees."""
    _peak_now: Callable[[], int | None] = field(default=lambda: None, repr=False)

    def peak_so_far(self) -> int | None:
        """The peak since the region began, read while it is still running."""
        return self._peak_now()


class DeviceMemory:
    """The memory of one device under one limit.

    Args:
        device: the device.
        limit: bytes a step may use, or ``None`` for no limit.
        emulation: ``"auto"``, ``"ideal"`` or ``"allocator"`` (see the module's docs); CUDA ignores it.
    """

    def __init__(self, device: torch.device, limit: int | None, emulation: str = "auto") -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.limit = limit
        self.emulation = emulation
        self.emulated = not self.is_cuda and limit is not None
        self.allocator = self.emulated and (
            emulation == "allocator"
            or (emulation == "auto" and limit is not None and limit >= ALLOCATOR_FROM)
        )
        self.guard = False  # the limit is a guard the probe chose, not the user's

    def guarded(self) -> DeviceMemory:
        """This memory for a probe: without a limit, a host-memory device gets half the available RAM
        (counted in live bytes: it guards the host, it models no GPU)."""
        if self.limit is not None or self.device.type not in _HOST_MEMORY:
            return self
        guarded = DeviceMemory(self.device, default_cpu_limit(), emulation="ideal")
        guarded.guard = True
        return guarded

    def roomy(self) -> DeviceMemory | None:
        """This device without the limit, to measure what a step that failed under it needs; ``None``
        where nothing is roomier (no limit was set). An emulated device stays emulated, counting as before,
        under half the host's available RAM (a guard: the host is never run out of memory)."""
        if self.limit is None or self.guard:
            return None
        if self.emulated:
            roomy = DeviceMemory(self.device, default_cpu_limit(), "allocator" if self.allocator else "ideal")
        else:  # CUDA under a memory_limit: the whole card (capped() lifts the cap inside its block)
            roomy = DeviceMemory(self.device, self.capacity_of_device(), self.emulation)
        roomy.guard = True
        return roomy

    def capacity_of_device(self) -> int:
        """The CUDA device's total memory."""
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    @property
    def counts_reserved(self) -> bool:
        """Whether the limit caps reserved memory (CUDA, the allocator model) rather than live bytes."""
        return self.is_cuda or self.allocator

    @property
    def capacity(self) -> int | None:
        """The bytes a step may use: the limit, else the whole CUDA device, else unknown."""
        if self.limit is not None:
            return self.limit
        if self.is_cuda:
            return self.capacity_of_device()
        return None

    @contextlib.contextmanager
    def capped(self) -> Iterator[None]:
        """Hold the CUDA caching allocator to ``limit`` inside the block; restore the old cap after."""
        if not (self.is_cuda and self.limit is not None):
            yield
            return
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        previous = getter(index) if getter is not None else 1.0
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, self.limit / total), index)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(previous, index)

    @contextlib.contextmanager
    def measure(
        self,
        resident: Iterable[torch.Tensor] | Callable[[], Iterable[torch.Tensor]] = (),
        *,
        trace: bool = False,
    ) -> Iterator[Measurement]:
        """Measure the block's peak (and, emulated, enforce the limit).

        Args:
            resident: the tensors already on the device, which count from the start (or a function that
                lists them, called only where they are counted or traced).
            trace: record the block's allocations and frees (:attr:`Measurement.trace`): on an emulated
                device its own, on CUDA an observer's (which never raises).
        """
        result = Measurement()
        if self.emulated or (trace and self.device.type != "cpu"):
            tensors = resident() if callable(resident) else resident
            limit = self.limit if self.emulated else None
            device = EmulatedDevice(limit, tensors, device=self.device, allocator=self.allocator, trace=trace)
        else:
            device = None
        with contextlib.ExitStack() as stack:
            if self.is_cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                result.resident_bytes = torch.cuda.memory_allocated(self.device)
                result._peak_now = lambda: torch.cuda.max_memory_allocated(self.device)
                stack.callback(self._cuda_peaks, result)
            if device is not None:
                stack.callback(self._emulated_peaks, result, device)
                stack.enter_context(device)
                if self.emulated:
                    result.resident_bytes = device.resident_bytes
                    result._peak_now = lambda: device.peak_reserved_bytes
            yield result

    def _cuda_peaks(self, result: Measurement) -> None:
        result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        result.reserved_bytes = torch.cuda.max_memory_reserved(self.device)

    def _emulated_peaks(self, result: Measurement, device: EmulatedDevice) -> None:
        if self.emulated:
            result.peak_bytes = device.peak_reserved_bytes
            result.reserved_bytes = device.peak_reserved_bytes if self.allocator else None
        if device.trace is not None:
            result.trace = (tuple(device.resident_sizes), tuple(device.trace))

    def transfer(self, batch: Any) -> Any:
        """Move every tensor of ``batch`` onto the device.

        On an emulated device the batch is copied (inside :meth:`measure`, the copy is counted), as a
        host-to-device copy is; elsewhere it is ``tensor.to(device)``.
        """
        if self.emulated:
            return map_tensors(torch.clone, batch)
        device, non_blocking = self.device, self.is_cuda
        return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)

    def describe(self) -> str:
        """One line for logs and tables: the limit and how it is enforced."""
        if self.limit is None:
            return "no limit"
        how = (
            "emulated, CUDA's caching allocator"
            if self.allocator
            else "emulated"
            if self.emulated
            else "allocator cap"
        )
        if self.guard:
            how = "emulated: half the available RAM, as no memory_limit was given"
        return f"{format_bytes(self.limit)} ({how})"
