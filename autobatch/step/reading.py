"""Reading a training step's samples, tried again when it fails: host-side loading is not device memory.

A Dataset's ``__getitem__``, a ``collate_fn`` and the DataLoader's workers run on the host. When one of them
raises (a host out-of-memory included), the micro-batch is not the cause: backing it off, the training
loop's answer to a device out-of-memory, would replay the same failure at every size down to one and end
in a misleading :class:`~autobatch.errors.NoBatchFitsError`. So a failed read or collation is tried again,
up to :data:`READ_RETRIES` times, with memory released and a short pause in between; when it still fails,
the user's own exception propagates, with a note naming the step and its samples.

A retry reads the same samples again from a fresh reader (a generator or a DataLoader whose fetch raised
may yield nothing more, or skip the step): the failed attempt trained on nothing, so no sample counts twice.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from autobatch.memory.oom import release_memory
from autobatch.step.data import DataSource, StepData

__all__ = [
    "READ_RETRIES",
    "RETRY_PAUSE_S",
    "StepReader",
    "add_note",
    "collate_pieces",
    "describe_indices",
    "retried",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

READ_RETRIES = 3
"""Times a failed read or collation of a step's samples is tried again before training stops with it."""

RETRY_PAUSE_S = 0.05
"""The pause before the first retry; the n-th waits n times as long (0.3 s in all at most)."""

_LISTED = 32
"""Sample indices a note lists before it counts the rest."""


def describe_indices(indices: Sequence[int]) -> str:
    """``[3, 17, 42]``, or the first :data:`_LISTED` and how many more.

    Example:
        >>> describe_indices([3, 17, 42])
        '[3, 17, 42]'
        >>> describe_indices(range(100))[-27:]
        '29, 30, 31, …] (100 in all)'
    """
    shown = ", ".join(str(int(i)) for i in list(indices[:_LISTED]))
    return f"[{shown}]" if len(indices) <= _LISTED else f"[{shown}, …] ({len(indices)} in all)"


def add_note(exc: BaseException, note: str) -> None:
    """Add ``note`` to ``exc`` (Python 3.11+); on older Pythons log it, so that it is said somewhere."""
    adder = getattr(exc, "add_note", None)
    if callable(adder):
        adder(note)
    else:  # pragma: no cover - Python 3.10
        logger.error("%s", note)


def retried(work: Callable[[], T], what: str, where: str) -> T:
    """``work()``, tried again up to :data:`READ_RETRIES` times when it raises an ``Exception``.

    Args:
        work: reads or collates samples; it must be safe to call again after it raised.
        what: what it does, with the samples' indices (``"reading samples [3, 17]"``), for the log and note.
        where: where in training (``"epoch 1, step 3"``).

    Raises:
        The last attempt's exception, unchanged but for a note saying what failed where, and how often.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return work()
        except Exception as exc:
            if attempt > READ_RETRIES:
                add_note(
                    exc,
                    f"autobatch: {what} ({where}) failed {attempt} times in a row; host-side data loading "
                    "is not device memory, so the micro-batch was not backed off, and training stops with "
                    "this error.",
                )
                raise
            failure = f"{type(exc).__name__}: {exc}"
        # Outside the except clause: its traceback would keep the failed attempt's objects alive.
        logger.warning(
            "%s (%s) failed (%s); trying again (%d of %d)", what, where, failure, attempt, READ_RETRIES
        )
        release_memory()
        time.sleep(RETRY_PAUSE_S * attempt)


def collate_pieces(data: StepData, bounds: Sequence[tuple[int, int]], where: str) -> list[Any]:
    """One collated micro-batch per ``(start, stop)`` of ``data``, each collation retried on failure."""
    indices = data.indices

    def what(start: int, stop: int) -> str:
        samples = f" {describe_indices(indices[start:stop])}" if indices is not None else ""
        return f"collating micro-batch {start}:{stop} of the step's samples{samples}"

    return [retried(functools.partial(data.collate, a, b), what(a, b), where) for a, b in bounds]


class StepReader:
    """Reads the samples of each step in turn, with the source's loader settings, retrying a failed read.

    A read that raised leaves its reader unusable (a generator is finished; a DataLoader has moved past
    the step), so a retry opens a fresh reader at the failed step, which then reads the remaining ones.

    Args:
        source: the data.
        steps: the sample indices of each step to read, in order (none empty).
    """

    def __init__(self, source: DataSource, steps: Sequence[list[int]]) -> None:
        self.source = source
        self.steps = list(steps)
        self.position = 0
        self._reader: Iterator[StepData] | None = None

    def _next(self) -> StepData:
        if self._reader is None:
            self._reader = self.source.loader(self.steps[self.position :])
        try:
            return next(self._reader)
        except BaseException:
            self._reader = None  # reopen at this step
            raise

    def read(self, where: str) -> StepData:
        """The next step's samples; raises the last failure (with a note) when every retry failed too."""
        indices = self.steps[self.position]
        data = retried(self._next, f"reading samples {describe_indices(indices)}", where)
        self.position += 1
        return data
