"""Recognise an out-of-memory failure and give the memory back before the next try.

The probe runs a training step at growing batch sizes and must tell "this batch did not fit" apart
from every other failure. :func:`is_oom` makes that call: by exception type first, then, only for
the backends that still raise a plain ``RuntimeError``, by the allocator's message.
:func:`release_memory` drops gradients and empties the device caches so that the next, smaller step
starts from a clean slate.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

from autobatch.errors import AutobatchError, NoBatchFitsError

__all__ = ["demand_bytes", "frozen_heap", "is_oom", "release_memory", "run_shrinking"]

T = TypeVar("T")

# torch.OutOfMemoryError is the device-generic name (CUDA, HIP, XPU, MPS); older torch has only the
# CUDA one.
_OOM_TYPES: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    torch.cuda.OutOfMemoryError,
    MemoryError,
)

# RuntimeError subclasses whose message is never an allocator's, however it is worded.
# AutobatchError is autobatch's own verdict (e.g. NoBatchFitsError), not a failed step.
_NOT_OOM_TYPES: tuple[type[BaseException], ...] = (
    NotImplementedError,
    RecursionError,
    AutobatchError,
)

# Case-sensitive, as the backends spell them.
_OOM_MESSAGES: tuple[str, ...] = (
    "CUDA out of memory",
    "CUDA error: out of memory",
    "HIP out of memory",
    "HIP error: out of memory",
    "XPU out of memory",
    "XPU error: out of memory",
    "MPS backend out of memory",
    "DefaultCPUAllocator: can't allocate memory",
    "DefaultCPUAllocator: not enough memory",
    # cuDNN reports a failed workspace allocation as "not supported"; in practice it is an OOM.
    "CUDNN_STATUS_NOT_SUPPORTED",
    "CUBLAS_STATUS_ALLOC_FAILED",
)


def is_oom(exc: BaseException) -> bool:
    """Tell whether an exception means the step ran out of memory.

    ``torch.OutOfMemoryError`` (and ``torch.cuda.OutOfMemoryError``) are recognised by type.
    Python's ``MemoryError`` counts as well: it is raised when a host allocation fails, it can be
    caught, and a smaller batch is the fix just as for a device OOM. Only then, for a
    ``RuntimeError`` (including torch's subclasses such as ``torch.AcceleratorError``, but not
    ``NotImplementedError``, ``RecursionError`` or autobatch's own errors), the message is searched
    for the wording of the CUDA, HIP, XPU, MPS, CPU allocator, cuDNN and cuBLAS out-of-memory
    failures. The exception's ``__cause__`` and ``__context__`` are not followed. Everything else
    (shape errors, ``ValueError``, ``KeyboardInterrupt``, ...) is not an OOM.

    Args:
        exc: the exception caught around the step.

    Returns:
        ``True`` when a smaller batch may succeed where this one failed.

    Example:
        >>> is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
        True
        >>> is_oom(ValueError("bad input"))
        False
    """
    if isinstance(exc, _OOM_TYPES):
        return True
    if not isinstance(exc, RuntimeError) or isinstance(exc, _NOT_OOM_TYPES):
        return False
    message = str(exc)
    return any(pattern in message for pattern in _OOM_MESSAGES)


_SIZE = r"([0-9]+(?:\.[0-9]+)?) (bytes|B|KiB|MiB|GiB|TiB)"
_SCALE = {"bytes": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
_DEMAND_PARTS = (
    re.compile("Tried to allocate " + _SIZE),
    re.compile(_SIZE + " is allocated by PyTorch"),
    re.compile(_SIZE + " is reserved by PyTorch but unallocated"),
)


def demand_bytes(exc: BaseException) -> int | None:
    """What the failed allocation would have brought the device's memory to, or ``None`` when unknown.

    A lower bound of what the failed step needed, in the units of the limit: reserved memory plus the
    request where the limit caps reserved memory (CUDA, the emulated allocator), live bytes plus the
    request on the ideal emulated device. The emulated device says so itself (``demand_bytes``); a CUDA
    error's message is read (the request, the memory allocated and the memory reserved but unallocated).

    Example:
        >>> demand_bytes(RuntimeError(
        ...     "CUDA out of memory. Tried to allocate 2.00 MiB. GPU 0 has a total capacity of 8.00 GiB of "
        ...     "which 1.00 MiB is free. Of the allocated memory 7.00 GiB is allocated by PyTorch, and "
        ...     "10.00 MiB is reserved by PyTorch but unallocated.")) == 7 * 2**30 + 12 * 2**20
        True
    """
    given = getattr(exc, "demand_bytes", None)
    if isinstance(given, int) and not isinstance(given, bool):
        return given
    message = str(exc)
    matches = [pattern.search(message) for pattern in _DEMAND_PARTS]
    if matches[0] is None or matches[1] is None:
        return None
    return sum(int(float(m.group(1)) * _SCALE[m.group(2)]) for m in matches if m is not None)


def release_memory(*optimizers_or_models: torch.optim.Optimizer | torch.nn.Module) -> None:
    """Drop gradients, collect garbage and empty the device caches after an OOM.

    Call it *after* the ``except`` block has been left: while the exception is being handled, its
    traceback keeps the failed step's frames, and with them its activations, alive. Record the OOM
    inside the ``except`` block and release outside it.

    Args:
        *optimizers_or_models: optimizers and modules whose gradients to set to ``None``; none is
            fine.

    Raises:
        TypeError: an argument is neither a ``torch.optim.Optimizer`` nor a ``torch.nn.Module``.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> failed = False
        >>> try:
        ...     model(torch.randn(8, 4)).sum().backward()
        ... except Exception as exc:
        ...     failed = is_oom(exc)
        >>> release_memory(model, optimizer)
        >>> model.weight.grad is None
        True
    """
    # Check every argument before touching any, so that a bad call changes nothing.
    for position, obj in enumerate(optimizers_or_models, start=1):
        if not isinstance(obj, (torch.optim.Optimizer, torch.nn.Module)):
            raise TypeError(
                f"Expected argument {position} of release_memory to be a torch.optim.Optimizer "
                f"or a torch.nn.Module, but got {type(obj).__qualname__}. Pass the objects "
                "themselves, e.g. release_memory(model, optimizer)."
            )
    for obj in optimizers_or_models:
        obj.zero_grad(set_to_none=True)

    gc.collect()
    # A cache is emptied only where the backend exists and (for CUDA) has been started: initialising
    # a device just to empty it would allocate memory, not free it.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    mps_backend = getattr(torch.backends, "mps", None)
    if mps_backend is not None and mps_backend.is_available():
        torch.mps.empty_cache()
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        xpu.empty_cache()


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now out of the garbage collections made inside the block.

    :func:`release_memory` collects garbage after every OOM, and a full collection walks every tracked
    object: with torch imported that is a few hundred thousand objects, about 0.2 s each time. What a
    failed step leaves behind was all created inside the block, so the older heap is frozen
    (``gc.freeze``) for its duration and unfrozen after. When the caller has frozen objects itself,
    nothing is changed.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def run_shrinking(
    run: Callable[[int], T],
    size: int,
    *,
    release: Callable[[], None],
    on_shrink: Callable[[int, int], None] | None = None,
    what: str = "step",
    floor: int = 1,
) -> tuple[T, int]:
    """Call ``run(size)``; on out-of-memory release memory, halve ``size`` and call it again.

    The retry happens after the ``except`` block has been left, so the failed attempt's tensors are
    gone before the smaller one starts. Any other exception propagates unchanged.

    Args:
        run: the work at one batch size; it must leave nothing half-done when it raises.
        size: the batch size to try first.
        release: frees what a failed attempt left (gradients, caches); called before each retry.
        on_shrink: told ``(old_size, new_size)`` before each retry.
        what: what ``run`` does, for the error message.
        floor: the smallest size worth trying (2 where BatchNorm trains: it cannot on one sample).

    Returns:
        ``run``'s result and the size that succeeded.

    Raises:
        NoBatchFitsError: ``run(floor)`` ran out of memory too.

    Example:
        >>> def run(n):
        ...     if n > 3:
        ...         raise torch.OutOfMemoryError("too big")
        ...     return n * 10
        >>> run_shrinking(run, 16, release=lambda: None)  # 16, 8 and 4 do not fit; 2 does
        (20, 2)
    """
    while True:
        failure = None
        try:
            return run(size), size
        except Exception as exc:
            if not is_oom(exc):
                raise
            failure = str(exc)
        release()
        if size <= floor:
            samples = f"{size} sample{'s' if size != 1 else ''}"
            raise NoBatchFitsError(f"The {what} ran out of memory even with a batch of {samples}: {failure}")
        smaller = max(floor, size // 2)
        if on_shrink is not None:
            on_shrink(size, smaller)
        size = smaller
