"""Device memory: parse ``memory_limit``, cap or emulate the device, and measure peaks.

Three regimes, chosen by :class:`DeviceMemory` from the device and the limit:

* **CUDA**: PyTorch's caching allocator is capped to the limit with
  ``torch.cuda.set_per_process_memory_fraction`` for the duration of :meth:`DeviceMemory.capped`; peaks
  come from ``max_memory_allocated`` (and ``max_memory_reserved``, reported too).
* **Emulated** (the CPU, and any device without an allocator cap): an
  :class:`~autobatch.emulate.EmulatedDevice` counts live tensor bytes and raises
  ``torch.OutOfMemoryError`` at the limit. Without a ``memory_limit`` on the CPU the probe still runs
  emulated, under :func:`default_cpu_limit` (half of the RAM available when it starts), so that a probe
  can never push the host into the Linux OOM killer, which cannot be caught.
* **Unlimited**: the training loop on the CPU without a ``memory_limit`` runs at full speed with no
  emulation; real allocator failures are still caught as out-of-memory.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch

from autobatch.data import map_tensors
from autobatch.emulate import EmulatedDevice, format_bytes

__all__ = [
    "DeviceMemory",
    "Measurement",
    "default_cpu_limit",
    "format_bytes",
    "memory_limit_scope",
    "parse_memory_limit",
    "resolve_memory_limit",
    "tensor_bytes",
]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "K": 2**10,
    "M": 2**20,
    "G": 2**30,
    "T": 2**40,
}
_LIMIT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")

DEFAULT_CPU_FRACTION = 0.5
"""Share of the host's available RAM that an emulated CPU device may use when no limit is given."""


def parse_memory_limit(value: int | str | None, *, name: str = "memory_limit") -> int | None:
    """Turn a memory limit into bytes.

    Args:
        value: ``None`` (no limit), a positive int of bytes, or a string such as ``"8GiB"``,
            ``"512MiB"``, ``"1.5GB"`` (binary units KiB/MiB/GiB/TiB or K/M/G/T; decimal KB/MB/GB/TB).
        name: the argument name used in error messages.

    Raises:
        TypeError: ``value`` is neither ``None``, an int nor a str.
        ValueError: the string does not parse or the amount is not positive.

    Example:
        >>> parse_memory_limit("512MiB"), parse_memory_limit("1.5GB"), parse_memory_limit(4096)
        (536870912, 1500000000, 4096)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(
            f"Expected `{name}` to be an int of bytes or a string such as '8GiB', "
            f"but got {value!r} ({type(value).__name__})."
        )
    if isinstance(value, int):
        nbytes = value
    else:
        match = _LIMIT_RE.match(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"Expected `{name}` to be a size such as '8GiB', '512MiB' or '1.5GB', but got {value!r}."
            )
        nbytes = int(float(match.group(1)) * _UNITS[unit])
    if nbytes <= 0:
        raise ValueError(f"Expected `{name}` to be a positive size, but got {value!r}.")
    return nbytes


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
        raise TypeError(
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
    """Half of the host RAM available now: the emulated CPU device's capacity when none is given."""
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
    _peak_now: Callable[[], int | None] = field(default=lambda: None, repr=False)

    def peak_so_far(self) -> int | None:
        """The peak since the region began, read while it is still running."""
        return self._peak_now()


class DeviceMemory:
    """Cap, emulate and measure the memory of one device.

    Args:
        device: the training device.
        limit: bytes the step may use, or ``None``.
        emulate: force emulation on (``True``) or off (``False``); ``None`` picks it: emulated on any
            non-CUDA device that has a limit.
    """

    def __init__(self, device: torch.device, limit: int | None, *, emulate: bool | None = None) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.emulated = (not self.is_cuda and limit is not None) if emulate is None else emulate
        if self.emulated and limit is None:
            limit = default_cpu_limit()
        self.limit = limit
        self._emulator: EmulatedDevice | None = None

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
    def measure(self, resident: Iterable[torch.Tensor] = ()) -> Iterator[Measurement]:
        """Measure the peak of the block; emulated devices count ``resident`` tensors from the start."""
        result = Measurement()
        if self.emulated:
            assert self.limit is not None  # set in __init__ whenever emulated
            emulator = EmulatedDevice(self.limit, resident, device=self.device)
            self._emulator = emulator
            try:
                with emulator:
                    result.resident_bytes = emulator.resident_bytes
                    result._peak_now = lambda: emulator.peak_bytes
                    yield result
            finally:
                self._emulator = None
                result.peak_bytes = emulator.peak_bytes
            return
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            result.resident_bytes = torch.cuda.memory_allocated(self.device)
            result._peak_now = lambda: torch.cuda.max_memory_allocated(self.device)
            try:
                yield result
            finally:
                result.peak_bytes = torch.cuda.max_memory_allocated(self.device)
                result.reserved_bytes = torch.cuda.max_memory_reserved(self.device)
            return
        yield result

    def transfer(self, batch: Any) -> Any:
        """Move every tensor of ``batch`` to the device (a counted copy on an emulated device)."""
        if self._emulator is not None:
            return self._emulator.transfer(batch)
        device, non_blocking = self.device, self.is_cuda
        return map_tensors(lambda t: t.to(device, non_blocking=non_blocking), batch)

    def describe(self) -> str:
        """One line for logs and tables: the limit and how it is enforced."""
        if self.limit is None:
            return "no limit"
        how = "emulated" if self.emulated else "allocator cap" if self.is_cuda else "unenforced"
        return f"{format_bytes(self.limit)} ({how})"
