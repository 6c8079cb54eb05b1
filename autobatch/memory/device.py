"""Device memory: one policy for enforcing a limit and measuring a step, for the probe and training alike.

:class:`DeviceMemory` decides, from the device and the limit alone:

* **CUDA**: a limit caps PyTorch's caching allocator (``torch.cuda.set_per_process_memory_fraction``)
  inside :meth:`DeviceMemory.capped`; peaks come from ``max_memory_allocated``/``max_memory_reserved``.
* **Any other device with a limit**: an :class:`~autobatch.memory.emulate.EmulatedDevice` raises
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from autobatch._tree import map_tensors
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.alloc_conf import AllocatorConfig, parse_alloc_conf
from autobatch.memory.emulate import EmulatedDevice
from autobatch.units import format_bytes, parse_memory_limit

__all__ = [
    "ALLOC_CONF_VARIABLES",
    "DeviceMemory",
    "Measurement",
    "allocator_config",
    "default_cpu_limit",
    "memory_limit_scope",
    "resolve_memory_limit",
    "tensor_bytes",
]

ALLOCATOR_FROM = 64 * 2**20
"""``emulation="auto"`` models CUDA's caching allocator for limits of at least this many bytes."""

UNBOUNDED = 1 << 60
"""The capacity of an emulated device that only counts (:meth:`DeviceMemory.roomy` for fake tensors)."""

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


ALLOC_CONF_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
"""Where PyTorch reads its caching allocator's settings (the first set wins; the second is the older name)."""


def allocator_config() -> AllocatorConfig:
    """The caching allocator's configuration this process runs with (``PYTORCH_CUDA_ALLOC_CONF``), which
    the emulated allocator follows too.

    Raises:
        UsageValueError: the variable's text is malformed.
    """
    for name in ALLOC_CONF_VARIABLES:
        text = os.environ.get(name)
        if text:
            try:
                return parse_alloc_conf(text)
            except ValueError as exc:
                raise UsageValueError(f"${name} is not a valid allocator configuration: {exc}") from None
    return AllocatorConfig()


def _adoptable(
    prefix: Sequence[Sequence[Any]], resident: Sequence[torch.Tensor], adopt: Sequence[torch.Tensor]
) -> bool:
    """Whether the blocks ``prefix`` leaves allocated match, size for size, the storages of ``adopt`` that
    ``resident`` does not hold (what :meth:`EmulatedDevice.adopt` will find)."""
    left: dict[Any, int] = {}
    for event in prefix:
        if event[0] == "alloc":
            left[event[1]] = int(event[2])
        elif event[0] == "free":
            left.pop(event[1], None)
    placed = {t.untyped_storage()._cdata for t in resident}
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in adopt}
    wanted = sorted(n for key, n in storages.items() if key not in placed)
    return wanted == sorted(left.values())


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


def tensor_bytes(tensors: Iterable[torch.Tensor], block: int = 1) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once), each rounded up
    to a multiple of ``block`` (as an allocator's blocks are).

    Storages are told apart by identity, not by address: fake and meta storages all report address 0.
    """
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sum(-(-n // block) * block for n in storages.values())


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
        self.alloc_config = allocator_config()
        self._carried: EmulatedDevice | None = None  # the emulated device whose state carries, if any
        self._pending: tuple[list[torch.Tensor], Sequence[Sequence[Any]], list[torch.Tensor]] | None = None
        self._active: EmulatedDevice | None = None  # the device of the region being measured

    def guarded(self) -> DeviceMemory:
        """This memory for a probe: without a limit, a host-memory device gets half the available RAM
        (counted in live bytes: it guards the host, it models no GPU)."""
        if self.limit is not None or self.device.type not in _HOST_MEMORY:
            return self
        guarded = DeviceMemory(self.device, default_cpu_limit(), emulation="ideal")
        guarded.guard = True
        return guarded

    def roomy(self, *, host_bound: bool = True) -> DeviceMemory | None:
        """This device without the limit, to measure what a step that failed under it needs; ``None``
        where nothing is roomier (no limit was set). An emulated device stays emulated, counting as before,
        under half the host's available RAM (a guard: the host is never run out of memory), unless
        ``host_bound`` is ``False`` (fake tensors hold no host memory: then under :data:`UNBOUNDED`)."""
        if self.limit is None or self.guard:
            return None
        if self.emulated:
            limit = default_cpu_limit() if host_bound else UNBOUNDED
            roomy = DeviceMemory(self.device, limit, "allocator" if self.allocator else "ideal")
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

    def _device(
        self, limit: int | str | None = "limit", resident: Iterable[torch.Tensor] = (), *, trace: bool = False
    ) -> EmulatedDevice:
        """A fresh emulated device of this memory (its limit, unless another is given)."""
        return EmulatedDevice(
            self.limit if limit == "limit" else limit,  # type: ignore[arg-type]
            resident,
            device=self.device,
            allocator=self.allocator,
            trace=trace,
            config=self.alloc_config,
        )

    @contextlib.contextmanager
    def carried(
        self,
        resident: Iterable[torch.Tensor] = (),
        *,
        prefix: Sequence[Sequence[Any]] = (),
        adopt: Iterable[torch.Tensor] = (),
    ) -> Iterator[bool]:
        """Inside the block, every measured region runs on one emulated device whose allocator carries from
        region to region, as a process's memory does from one training step to the next.

        The device starts cold: ``resident`` placed first, packed (as after ``model.to(device)``); then the
        synthetic ``prefix`` (earlier training steps replayed: :meth:`EmulatedDevice.replay`) and the
        ``adopt`` tensors taking over the blocks the prefix left (:meth:`EmulatedDevice.adopt`). Yields
        whether they match one to one (``False``: the prefix does not describe those tensors, and the
        device will hold only ``resident``). It is made when the first region is entered, so that running
        out of memory while placing them is that region's out-of-memory. Where nothing is emulated (CUDA:
        the real allocator carries anyway, and cannot be set to a replayed state) it yields ``not prefix``.
        """
        if not self.emulated:
            yield not prefix
            return
        resident, adopt = list(resident), list(adopt)
        matched = not prefix or _adoptable(prefix, resident, adopt)
        saved = self._carried, self._pending
        self._carried, self._pending = None, (resident, prefix if matched else (), adopt if matched else [])
        try:
            yield matched
        finally:
            self._carried, self._pending = saved

    @property
    def carries(self) -> bool:
        """Whether measured regions now share one emulated device (inside :meth:`carried`)."""
        return self._carried is not None or self._pending is not None

    def _carried_device(self) -> EmulatedDevice | None:
        """The carried device, made (and set up) on first use."""
        if self._carried is None and self._pending is not None:
            resident, prefix, adopt = self._pending
            device = self._device()
            device.register(resident)
            if prefix:
                device.replay(prefix)
                device.adopt(adopt)
            self._carried, self._pending = device, None
        return self._carried

    def empty_cache(self) -> None:
        """Release the cached, entirely free segments: the carried device's, or CUDA's."""
        if self._carried is not None and self._carried.allocator is not None:
            self._carried.allocator.empty_cache()
        elif self.is_cuda and torch.cuda.is_initialized():
            torch.cuda.empty_cache()

    def mark(self, label: str) -> None:
        """Mark a phase of the training step in the trace of the region being measured, if any."""
        if self._active is not None:
            self._active.mark(label)

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
                lists them, called only where they are counted or traced). On a carried device only those
                it does not count yet are placed.
            trace: record the block's allocations and frees (:attr:`Measurement.trace`): on an emulated
                device its own, on CUDA an observer's (which never raises).
        """
        result = Measurement()
        device: EmulatedDevice | None = None
        if self.carries:
            device = self._carried_device()
            assert device is not None
            device.enter_with(resident() if callable(resident) else resident)
            device.tracing = trace
        elif self.emulated or (trace and self.device.type != "cpu"):
            tensors = resident() if callable(resident) else resident
            limit = self.limit if self.emulated else None
            device = self._device(limit, tensors, trace=trace)
        with contextlib.ExitStack() as stack:
            if self.is_cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
                result.resident_bytes = torch.cuda.memory_allocated(self.device)
                result._peak_now = lambda: torch.cuda.max_memory_allocated(self.device)
                stack.callback(self._cuda_peaks, result)
            if device is not None:
                stack.callback(self._emulated_peaks, result, device)
                stack.enter_context(device)
                saved, self._active = self._active, device
                stack.callback(setattr, self, "_active", saved)
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
        if device.tracing and device.trace is not None:
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

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` on the host, as ``.cpu()``; on an emulated device a copy, made outside any measured
        region, so that the device's own copy leaves its count once freed (``.cpu()`` would be the same
        storage)."""
        if self.emulated:
            return tensor.detach().clone()
        return tensor.cpu()

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
