"""How many CPU threads autobatch's own work runs with: one, unless you chose otherwise.

Measured on a 2-core machine (``benchmarks/`` and the README's Performance section): the models people
train on a CPU are small, and for them one intra-op thread is as fast as two on an idle machine, while on a
loaded one (a second process busy on the other core, as in CI) two threads make a training loop 10–60×
slower — OpenMP's threads wait for each other at every operation. So on the CPU ``cpu_threads="auto"``
runs probe and training on one thread, unless you chose a number yourself: ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS`` in the environment, a ``torch.set_num_threads`` call with another value than torch's
default, or ``cpu_threads=N``, at most the cores this process may run on (:func:`available_cores`: more
threads only wait for each other, and a thousand of them can exhaust the address space). The previous
setting is restored when the call returns.

Imports torch only when it runs: :mod:`autobatch.options` checks ``cpu_threads`` before torch is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["available_cores", "chosen_by_user", "cpu_threads"]

logger = logging.getLogger(__name__)

_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@functools.cache
def _default_counts() -> frozenset[int]:
    """The thread counts torch starts with on this machine: its logical or its physical cores."""
    counts = {os.cpu_count() or 1}
    with contextlib.suppress(AttributeError, OSError):
        counts.add(len(os.sched_getaffinity(0)))
    with contextlib.suppress(OSError, ValueError), open("/proc/cpuinfo") as f:
        cores, physical = set(), "0"
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "physical id":
                physical = value.strip()
            elif key.strip() == "core id":
                cores.add((physical, value.strip()))
        if cores:
            counts.add(len(cores))
    return frozenset(counts)


def available_cores() -> int:
    """The logical CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity mask
        return os.cpu_count() or 1


def chosen_by_user() -> bool:
    """Whether the thread count is one the user set (environment, or ``torch.set_num_threads``)."""
    import torch

    if any(os.environ.get(name) for name in _ENV):
        return True
    return torch.get_num_threads() not in _default_counts()


@contextlib.contextmanager
def cpu_threads(setting: int | str, device: torch.device, *, say: bool = True) -> Iterator[int | None]:
    """Run the block with the policy's thread count on the CPU; yields it (``None`` off the CPU). ``say``:
    log the change (a caller that enters once per step says it on its first step only)."""
    import torch

    if device.type != "cpu":
        yield None
        return
    previous = torch.get_num_threads()
    count = (previous if chosen_by_user() else 1) if setting == "auto" else int(setting)
    if count != previous:
        if say:
            logger.info(
                "running on %d CPU thread(s) instead of %d (cpu_threads=%r); pass cpu_threads=N for others",
                count,
                previous,
                setting,
            )
        torch.set_num_threads(count)
    try:
        yield count
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
