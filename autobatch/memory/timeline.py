"""A step's memory as a function of its batch size, from the allocation timelines of two trials.

A step's peak is the maximum over time of its live bytes, and each moment's live bytes grow linearly with
the batch at a rate of their own: ``peak(batch)`` is convex and piecewise linear, so a line through two
measured peaks under-estimates every larger batch. Instead, each trial records its timeline: every
allocation (its size) and every free, in order. When two trials' timelines line up — the same
allocations, freed at the same moments — each allocation's size is fitted as ``a + b × batch``, and any
batch's timeline can be rebuilt and replayed: on an ideal device (live bytes, rounded to 512-byte blocks)
or through :mod:`autobatch.memory.allocator` (reserved bytes, as CUDA's caching allocator holds them). The
largest batch whose replay stays under the limit is the prediction. Timelines that do not line up
(data-dependent control flow) give no model, and the search falls back to its bisection.

Pure: no torch, so it is tested on hand-made timelines.

Example:
    >>> def step(b):  # a 4 KiB weight, 1 KiB of activations and a 2 KiB temporary per sample
    ...     events = (("alloc", 0, 1024 * b), ("alloc", 1, 2048 * b), ("free", 1), ("free", 0))
    ...     return Timeline(b, (4096,), events)
    >>> model = fit_timeline(step(1), step(2))
    >>> model.peak(10), model.max_batch(40 * 1024, lo=1, hi=1000)
    (34816, 12)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from autobatch.memory.allocator import replay

__all__ = ["MemoryTimeline", "Timeline", "best_fit", "fit_timeline"]

BLOCK = 512
SMALL_SIZE = 1 << 20  # the allocator's small pool holds blocks up to this
LARGE_ALLOC = 10 << 20  # from this size a block gets a segment of its own
SCAN_LIMIT = 4096
"""Through the allocator, at most this many batches below a prediction are replayed to check for holes."""


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


@dataclass(frozen=True)
class Timeline:
    """What one trial allocated, in order.

    Attributes:
        batch: the trial's batch size.
        resident: sizes (before rounding) of the tensors on the device when the step began, in the order
            they were allocated.
        events: ``("alloc", i, nbytes)`` for the step's i-th allocation, ``("free", i)``,
            ``("free", ("resident", j))`` for the j-th resident tensor, and ``("mark", label)`` where the
            step began a micro-step or its optimizer step (see :mod:`autobatch.memory.ledger`).
    """

    batch: int
    resident: tuple[int, ...]
    events: tuple[tuple[Any, ...], ...]

    def skeleton(self) -> tuple[Any, ...]:
        """The order of allocations, frees and marks, without the sizes."""
        return tuple(("alloc", e[1]) if e[0] == "alloc" else e for e in self.events)


@dataclass(frozen=True)
class MemoryTimeline:
    """A timeline whose allocation sizes are linear in the batch; replays it at any batch size.

    Fitted on one batch size only (``points`` equal), it holds that batch's sizes, whatever the batch.
    """

    resident: tuple[int, ...]
    skeleton: tuple[Any, ...]
    points: tuple[int, int]  # the two batch sizes it was fitted on
    sizes: tuple[tuple[int, int], ...]  # each allocation's size at those two batch sizes

    def sizes_at(self, batch: int) -> list[int]:
        """Each allocation's size at ``batch`` (rounded up where the fit is not a whole number)."""
        b1, b2 = self.points
        if b1 == b2:
            return [s1 for s1, _ in self.sizes]
        span, offset = b2 - b1, batch - b1
        # s1 + (s2 - s1) × offset / span, rounded up, in integers
        return [max(0, -(-(s1 * span + (s2 - s1) * offset) // span)) for s1, s2 in self.sizes]

    def step_events(self, batch: int) -> list[tuple[Any, ...]]:
        """The step's own events at ``batch`` (its marks included; the residents are not allocated)."""
        sizes = iter(self.sizes_at(batch))
        return [("alloc", e[1], next(sizes)) if e[0] == "alloc" else e for e in self.skeleton]

    def events_at(self, batch: int) -> list[tuple[Any, ...]]:
        """The timeline at ``batch``, the resident tensors allocated first (as a fresh region starts)."""
        events: list[tuple[Any, ...]] = [("alloc", ("resident", i), n) for i, n in enumerate(self.resident)]
        return events + [e for e in self.step_events(batch) if e[0] != "mark"]

    def peak(self, batch: int, *, allocator: bool = False) -> int:
        """The step's peak at ``batch``: live bytes in 512-byte blocks, or the allocator's reserved bytes."""
        if allocator:
            return replay(self.events_at(batch), cap=None).peak_reserved
        held: dict[Any, int] = {("resident", i): _rounded(n) for i, n in enumerate(self.resident)}
        live = peak = sum(held.values())
        for event in self.step_events(batch):
            if event[0] == "alloc":
                held[event[1]] = _rounded(event[2])
                live += held[event[1]]
                peak = max(peak, live)
            elif event[0] == "free":
                live -= held.pop(event[1])
        return peak

    def fits(self, batch: int, limit: int, *, allocator: bool = False) -> bool:
        """Whether the step at ``batch`` stays within ``limit`` (reserved bytes, for the allocator)."""
        if allocator:
            return replay(self.events_at(batch), cap=limit).first_oom is None
        return self.peak(batch) <= limit

    def max_batch(self, limit: int, *, lo: int, hi: int, allocator: bool = False) -> int:
        """The largest batch ``b`` in ``[lo, hi]`` such that every batch from ``lo`` to ``b`` fits under
        ``limit`` (``lo - 1`` when ``lo`` does not): what a loop whose micro-batches vary up to ``b`` needs.

        On an ideal device memory never shrinks as the batch grows, and a binary search finds it. Through
        the allocator it can: a tensor that outgrows the small pool (1 MiB) moves into the large pool's
        segments, where a larger batch may fit although a smaller one did not. There the range is cut at
        the batches where some allocation changes pool or segment kind, searched region by region, and
        the batches below the answer are replayed for holes (see :func:`largest_in_regions`).
        """
        known: dict[int, bool] = {}

        def fits(batch: int) -> bool:
            if batch not in known:
                known[batch] = self.fits(batch, limit, allocator=allocator)
            return known[batch]

        regions = self._regions(lo, hi) if allocator else [(lo, hi)]
        return largest_in_regions(fits, lo, hi, regions, scan=fits if allocator else None)

    def _regions(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """``[lo, hi]`` cut where an allocation crosses 1 MiB or 10 MiB, where the allocator changes rules."""
        b1, b2 = self.points
        cuts = set()
        for s1, s2 in self.sizes:
            if s2 == s1:
                continue
            slope = Fraction(s2 - s1, b2 - b1)
            for threshold in (SMALL_SIZE, LARGE_ALLOC):
                # the first batch at which this allocation is above the threshold
                crossing = b1 + (threshold - s1) / slope
                first = (
                    int(crossing) + 1
                    if crossing == int(crossing)
                    else -(-crossing.numerator // crossing.denominator)
                )
                if lo < first <= hi:
                    cuts.add(first)
        bounds = [lo, *sorted(cuts), hi + 1]
        return [(a, b - 1) for a, b in itertools.pairwise(bounds) if a <= b - 1]


def largest_in_regions(
    fits: Callable[[int], bool],
    lo: int,
    hi: int,
    regions: Sequence[tuple[int, int]],
    *,
    scan: Callable[[int], bool] | None = None,
    scan_limit: int = SCAN_LIMIT,
) -> int:
    """The largest ``b`` in ``[lo, hi]`` with ``fits(b)``, memory growing with the batch inside each region
    (binary search), the first region whose start does not fit ending the search; ``lo - 1`` when ``lo``
    does not fit.

    With ``scan`` (a test that fails wherever ``fits`` does), every batch from ``lo`` up to the answer is
    scanned for holes (at most ``scan_limit`` of them, in even strides beyond). Where one fails, the
    batches since the last one that passed are scanned one by one, and the answer is the largest batch
    below the first failure for which ``fits`` holds: every answer is tested.

    Example:
        >>> largest_in_regions(lambda b: b <= 37, 1, 100, [(1, 100)])
        37
        >>> largest_in_regions(lambda b: b <= 37 and b != 20, 1, 100, [(1, 100)], scan=lambda b: b != 20)
        19
    """
    if lo > hi or not fits(lo):
        return lo - 1
    best = hi
    for start, end in regions:
        if not fits(start):
            best = start - 1
            break
        if fits(end):
            continue
        good = start  # fits; the last batch that does, as memory grows within the region
        while good < end:
            mid = (good + end + 1) // 2
            if fits(mid):
                good = mid
            else:
                end = mid - 1
        best = good
        break
    if scan is None:
        return best
    stride = max(1, -(-(best - lo) // scan_limit))
    passed = lo
    for batch in range(lo + 1, best + 1, stride):
        if scan(batch):
            passed = batch
            continue
        # A hole: the first batch that fails is at most `stride` above the last one that passed.
        first = next(b for b in range(passed + 1, batch + 1) if not scan(b))
        answer = first - 1
        while answer >= lo and not fits(answer):
            answer -= 1
        return answer
    return best


def fit_timeline(first: Timeline, second: Timeline) -> MemoryTimeline | None:
    """The model through two trials' timelines, or ``None`` when they do not line up.

    They line up when both trials started with the same resident tensors and made the same allocations
    and frees in the same order, every allocation at least as large at the larger batch.
    """
    if first.batch == second.batch:
        return None
    if first.batch > second.batch:
        first, second = second, first
    if first.resident != second.resident or first.skeleton() != second.skeleton():
        return None
    sizes = []
    for a, b in zip(first.events, second.events, strict=True):
        if a[0] == "alloc":
            if b[2] < a[2]:
                return None
            sizes.append((int(a[2]), int(b[2])))
    return MemoryTimeline(first.resident, first.skeleton(), (first.batch, second.batch), tuple(sizes))


def best_fit(timelines: Sequence[Timeline]) -> MemoryTimeline | None:
    """The model through the two largest batches whose timelines line up (``None`` when no pair does)."""
    ordered = sorted(timelines, key=lambda t: -t.batch)
    for i, larger in enumerate(ordered):
        for smaller in ordered[i + 1 :]:
            model = fit_timeline(smaller, larger)
            if model is not None:
                return model
    return None
