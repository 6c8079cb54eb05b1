"""The batch-size search, a pure function over an injected ``try_step``.

``try_step(batch_size)`` runs one training step and returns its measured :class:`Peaks` (fields ``None``
where the backend cannot measure), or raises :class:`OutOfMemory` when the step did not fit.

With a ``predictor`` (the memory timelines of :mod:`autobatch.memory.timeline`: each allocation of a step
fitted as linear in the batch), two small trials (the start and the batch after it) predict the largest batch
that fits; the search tests it and the batch after it, and is done: five steps (with the probe's warm-up) and
one out-of-memory when the prediction is exact. A surprise calibrates the limit the next prediction uses
to what the device allowed (a predicted fit that ran out of memory lowers it, a predicted failure that
fitted raises it); after two surprises, or where no timeline model exists (data-dependent control flow),
the search goes on as below.

Without one, the search doubles from a small start until the first out-of-memory, then narrows the gap
between the largest batch that fitted (``lo``) and the smallest that did not (``hi``). Wherever peaks
were measured it fits ``peak ≈ fixed + per_sample × batch`` on the forward/backward peak through the two
largest batches that fitted, and jumps to the predicted maximum. A jump whose outcome contradicts the
model is followed by a plain doubling or bisection step, so the worst case stays logarithmic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "MemoryModel",
    "OutOfMemory",
    "Peaks",
    "Predictor",
    "SearchOutcome",
    "Trial",
    "fit_memory_model",
    "search",
]

SURPRISES = 2
"""Wrong predictions after which the search stops trusting the predictor."""

MAX_GROWTH = 16
"""Before the first out-of-memory, a model-predicted jump grows the batch by at most this factor."""


class OutOfMemory(Exception):
    """Raised by ``try_step`` when a batch did not fit."""


@dataclass(frozen=True)
class Peaks:
    """What one step used: the whole step's peak and the forward/backward peak, in bytes; and the most
    memory the allocator held (reserved), where it has one."""

    step_bytes: int | None = None
    backward_bytes: int | None = None
    reserved_bytes: int | None = None


@dataclass(frozen=True)
class Trial:
    """One step the search ran."""

    batch: int
    fitted: bool
    peak_bytes: int | None
    seconds: float
    backward_peak_bytes: int | None = None
    reserved_bytes: int | None = None
    case: str = "longest"
    """What the batch held: ``"longest"``, the largest samples; ``"mixed"``, the largest but one with the
    smallest, which collation pads (see :meth:`autobatch.step.data.DataSource.mixed_case`)."""
    role: str = "verdict"
    """What the step was for: ``"verdict"``, whether training at the batch survives (see
    :mod:`autobatch.memory.survival`); ``"cold"`` and ``"steady"``, a traced first step from a cold start and
    a traced step at steady state, whose timelines make the memory model (they decide nothing alone)."""


@dataclass(frozen=True)
class MemoryModel:
    """``peak ≈ fixed_bytes + bytes_per_sample × batch``, fitted on measured forward/backward peaks."""

    fixed_bytes: float
    bytes_per_sample: float

    def predict_max(self, limit: int) -> int | None:
        """The largest batch the model says fits under ``limit``, or None when it cannot tell."""
        if self.bytes_per_sample <= 0:
            return None
        return int((limit - self.fixed_bytes) // self.bytes_per_sample)


class Predictor(Protocol):
    """A memory model that predicts which batches fit (see
    :class:`autobatch.memory.timeline.MemoryTimeline`)."""

    def max_batch(self, limit: int, *, lo: int, hi: int) -> int:
        """The largest batch in ``[lo, hi]`` that fits under ``limit``; ``lo - 1`` when none does."""
        ...

    def peak(self, batch: int) -> int:
        """The peak the model predicts for ``batch``, in the units of the limit."""
        ...


@dataclass
class SearchOutcome:
    """The largest batch that fitted, the smallest that did not (None if none failed), every trial."""

    best: int
    first_failure: int | None
    trials: list[Trial] = field(default_factory=list)
    model: MemoryModel | None = None


def fit_memory_model(trials: list[Trial]) -> MemoryModel | None:
    """The line through the two largest fitted batches with a measured peak (None with fewer than two)."""
    points = sorted(
        {(t.batch, t.backward_peak_bytes) for t in trials if t.fitted and t.backward_peak_bytes is not None}
    )
    if len(points) < 2:
        return None
    (b0, m0), (b1, m1) = points[-2], points[-1]
    slope = (m1 - m0) / (b1 - b0)
    return MemoryModel(fixed_bytes=m1 - slope * b1, bytes_per_sample=slope)


def run_trial(
    try_step: Callable[[int], Peaks],
    batch: int,
    *,
    clock: Callable[[], float],
    on_trial: Callable[[Trial], None] | None = None,
    case: str = "longest",
    role: str = "verdict",
) -> Trial:
    """Run ``try_step(batch)`` once and record it as a :class:`Trial` (passed to ``on_trial`` too)."""
    t0 = clock()
    try:
        peaks = try_step(batch)
    except OutOfMemory:
        trial = Trial(batch, False, None, clock() - t0, case=case, role=role)
    else:
        trial = Trial(
            batch,
            True,
            peaks.step_bytes,
            clock() - t0,
            peaks.backward_bytes,
            peaks.reserved_bytes,
            case,
            role,
        )
    if on_trial is not None:
        on_trial(trial)
    return trial


def search(
    try_step: Callable[[int], Peaks],
    *,
    cap: int,
    limit: int | None = None,
    start: int = 1,
    clock: Callable[[], float] | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    floor: int = 1,
    predictor: Callable[[], Predictor | None] | None = None,
    case: str = "longest",
    start_expected: bool | None = None,
) -> SearchOutcome:
    """Find the largest batch in ``[1, cap]`` for which ``try_step`` does not raise :class:`OutOfMemory`.

    Args:
        try_step: runs one step at a batch size and returns its :class:`Peaks`; raises OutOfMemory.
        cap: the largest batch allowed (``max_batch`` or the dataset size); tested before it is returned.
        limit: the memory limit in bytes, used to predict the maximum.
        start: the first batch size tried.
        clock: a time source for ``Trial.seconds`` (``time.perf_counter`` by default).
        on_trial: called with each :class:`Trial` as soon as it is measured (progress displays).
        floor: the smallest batch that can train at all (2 for BatchNorm in training mode); never
            tried below.
        predictor: returns the memory model of the trials so far (``None`` while it has none).
        case: what ``try_step``'s batches hold, recorded in every :class:`Trial`.
        start_expected: what the predictor said of ``start`` when it chose it (``True``: fits), so that
            a surprise there calibrates the next prediction.

    Returns:
        A :class:`SearchOutcome`; ``best`` is 0 when not even a batch of 1 fitted.

    Example:
        >>> def step(b):
        ...     if 1000 + 10 * b > 2000:
        ...         raise OutOfMemory
        ...     return Peaks(1000 + 10 * b, 1000 + 10 * b)
        >>> outcome = search(step, cap=10_000, limit=2000)
        >>> outcome.best, outcome.first_failure, len(outcome.trials)
        (100, 101, 5)
    """
    if clock is None:
        import time

        clock = time.perf_counter
    trials: list[Trial] = []
    lo, hi = 0, None  # lo: the largest batch that fitted; hi: the smallest that did not

    def run(batch: int) -> bool:
        trial = run_trial(try_step, batch, clock=clock, on_trial=on_trial, case=case)
        trials.append(trial)
        return trial.fitted

    candidate = max(floor, min(start, cap))
    expected = start_expected  # what a model predicted for the candidate (None: not model-based)
    surprises, effective = 0, limit  # the limit predictions use, calibrated by surprises
    # the predictor behind the candidate, if it chose it
    timeline: Predictor | None = predictor() if predictor is not None and expected is not None else None
    while True:
        fitted = run(candidate)
        if fitted:
            lo = candidate
        else:
            hi = candidate
        trust_model = expected is None or expected == fitted
        if not trust_model and timeline is not None and effective is not None:
            surprises += 1  # calibrate: the device allowed more, or less, than the model said
            peak = timeline.peak(candidate)
            effective = min(effective, peak - 1) if expected else max(effective, peak)
        if lo >= cap or (hi is not None and (hi - lo <= 1 or hi <= floor)):
            break
        upper = min(cap, hi - 1 if hi is not None else cap)
        timeline = (
            predictor() if predictor is not None and effective is not None and surprises < SURPRISES else None
        )
        if lo == 0:  # the start did not fit: below it, by the model where it has one, else halving
            assert hi is not None
            predicted = timeline.max_batch(effective, lo=floor, hi=hi - 1) if timeline and effective else 0
            if predicted >= floor:
                candidate, expected = predicted, True
            else:
                candidate, expected, timeline = max(floor, candidate // 2), None, None
            continue
        if timeline is None and predictor is not None and len(trials) == 1:
            # The model needs a second timeline: the next batch up is the cheapest one to get.
            candidate, expected = min(lo + 1, cap), None
            continue
        if timeline is not None:
            assert effective is not None
            predicted = timeline.max_batch(effective, lo=lo, hi=upper)
            if predicted >= lo:  # the model agrees that lo fits: test its maximum, or the batch after lo
                candidate = predicted if predicted > lo else lo + 1
                expected = candidate <= predicted
                continue
            timeline = None  # it says a batch that fitted does not: no use here
        candidate, expected = _without_timeline(trials, lo, hi, limit, trust_model)
        candidate = min(candidate, cap)
    return SearchOutcome(best=lo, first_failure=hi, trials=trials, model=fit_memory_model(trials))


def _without_timeline(
    trials: list[Trial], lo: int, hi: int | None, limit: int | None, trust_model: bool
) -> tuple[int, bool | None]:
    """The next candidate from the line through the measured peaks, or by doubling or bisection."""
    model = fit_memory_model(trials) if limit is not None else None
    predicted_max = model.predict_max(limit) if (model is not None and limit is not None) else None
    # A model that says a batch known to fail would fit is wrong here: it would only test hi - 1.
    contradicted = hi is not None and predicted_max is not None and predicted_max >= hi
    if predicted_max is None or not trust_model or contradicted:
        return (2 * lo if hi is None else (lo + hi) // 2), None
    # Test the predicted maximum; when the model says lo already is it, confirm lo + 1 fails.
    candidate = max(predicted_max, lo + 1)
    if hi is None:
        candidate = min(candidate, MAX_GROWTH * lo)
    candidate = min(candidate, hi - 1 if hi is not None else candidate)
    return candidate, candidate <= predicted_max
