"""Tests for autobatch.probing.search: the pure search over synthetic ``try_step`` functions."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autobatch.probing.search import (
    MAX_GROWTH,
    MemoryModel,
    OutOfMemory,
    Peaks,
    SearchOutcome,
    Trial,
    fit_memory_model,
    search,
)

FIXED = 50_000_000  # model state and workspace
PER_SAMPLE = 100_000

SHAPES = ("linear", "flat_then_linear", "noisy", "underestimated", "quadratic", "concave", "no_peaks")


MISMEASURED = ("noisy", "underestimated")


def linear(b: int) -> float:
    return FIXED + PER_SAMPLE * b


def _jitter(b: int) -> float:
    """Deterministic noise within ± one sample's bytes, as block rounding gives real measurements."""
    return ((b * 2_654_435_761) % 2001 - 1000) / 1000 * PER_SAMPLE


PEAK: dict[str, Callable[[int], float] | None] = {
    "linear": linear,
    "flat_then_linear": linear,  # the backward peak; the whole step's peak is flat first, see below
    "noisy": lambda b: linear(b) + _jitter(b),
    # Measured peaks that grow at a third of the real rate (memory the measurement misses, such as
    # fragmentation): the model keeps predicting maxima beyond batches that already failed.
    "underestimated": lambda b: FIXED + PER_SAMPLE * b / 3,
    "quadratic": lambda b: FIXED + PER_SAMPLE * b + 7.0 * b * b,
    "concave": lambda b: FIXED + 1_000_000 * math.sqrt(b),
    "no_peaks": None,
}


class Device:
    """A synthetic device: batches up to ``true_max`` fit; each trial reports peaks of ``shape``."""

    def __init__(self, true_max: int, shape: str) -> None:
        self.true_max = true_max
        self.shape = shape
        self.calls: list[int] = []
        peak = PEAK[shape]
        # The limit that makes true_max the largest batch that fits (by the real, linear usage where the
        # measured peaks are off).
        real = linear if shape in MISMEASURED else peak
        self.limit = None if real is None else int(real(true_max))

    def __call__(self, batch: int) -> Peaks:
        assert batch >= 1
        self.calls.append(batch)
        if batch > self.true_max:
            raise OutOfMemory
        peak = PEAK[self.shape]
        if peak is None:
            return Peaks()
        backward = int(peak(batch))
        if self.shape == "flat_then_linear":
            # The optimizer step's own peak dominates small batches; it does not grow with the batch.
            return Peaks(step_bytes=max(int(linear(self.true_max // 2)), backward), backward_bytes=backward)
        return Peaks(step_bytes=backward, backward_bytes=backward)


def run(true_max: int, shape: str, *, cap: int = 10**9, start: int = 1) -> tuple[SearchOutcome, Device]:
    device = Device(true_max, shape)
    ticks = iter(range(10**6))
    outcome = search(device, cap=cap, limit=device.limit, start=start, clock=lambda: float(next(ticks)))
    return outcome, device


def log_bound(true_max: int) -> float:
    """Doubling to the first failure, then bisecting: about 2·log2(max) steps in the worst case."""
    return 2 * math.log2(max(true_max, 2)) + 4


def assert_exact(outcome: SearchOutcome, true_max: int, cap: int = 10**9) -> None:
    best = min(true_max, cap)
    assert outcome.best == best
    assert outcome.first_failure == (None if true_max >= cap else true_max + 1)
    fitted = {t.batch for t in outcome.trials if t.fitted}
    failed = {t.batch for t in outcome.trials if not t.fitted}
    assert best == 0 or best in fitted  # the answer was tested, not inferred
    if outcome.first_failure is not None:
        assert outcome.first_failure in failed
    assert all(b <= true_max for b in fitted) and all(b > true_max for b in failed)
    assert all(t.batch <= cap for t in outcome.trials)


# --- exactness and step counts ---------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(true_max=st.integers(1, 100_000), shape=st.sampled_from(SHAPES))
def test_search_is_exact_in_logarithmic_steps(true_max: int, shape: str) -> None:
    outcome, device = run(true_max, shape)
    assert_exact(outcome, true_max)
    assert len(outcome.trials) == len(device.calls) <= log_bound(true_max)
    assert len(set(device.calls)) == len(device.calls), f"a batch was tried twice: {device.calls}"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("true_max", [*range(1, 70), 127, 128, 129, 1000, 4095, 4096, 4097, 65_537, 100_000])
def test_search_is_exact_for_small_and_round_maxima(true_max: int, shape: str) -> None:
    outcome, device = run(true_max, shape)
    assert_exact(outcome, true_max)
    assert len(device.calls) <= log_bound(true_max)


@pytest.mark.parametrize("true_max", [1, 2, 3, 7, 12, 40, 100, 150, 1000, 8192])
@pytest.mark.parametrize("shape", ["linear", "flat_then_linear"])
def test_linear_memory_takes_at_most_six_trials(true_max: int, shape: str) -> None:
    outcome, device = run(true_max, shape)
    assert_exact(outcome, true_max)
    assert len(device.calls) <= 6, device.calls


def test_linear_memory_beyond_8192_costs_one_trial_per_growth_factor() -> None:
    # Before the first out-of-memory a jump grows the batch at most MAX_GROWTH times.
    outcome, device = run(100_000, "linear")
    assert_exact(outcome, 100_000)
    assert device.calls == [1, 2, 2 * MAX_GROWTH, 2 * MAX_GROWTH**2, 2 * MAX_GROWTH**3, 100_000, 100_001]


def test_docstring_example_counts() -> None:
    outcome, device = run(100, "linear")
    assert (outcome.best, outcome.first_failure) == (100, 101)
    assert device.calls == [1, 2, 2 * MAX_GROWTH, 100, 101]


def test_without_peaks_the_search_doubles_then_bisects() -> None:
    outcome, device = run(100, "no_peaks")
    assert device.calls == [1, 2, 4, 8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101]
    assert_exact(outcome, 100)
    assert outcome.model is None


def test_without_a_limit_peaks_are_not_used() -> None:
    device = Device(100, "linear")
    outcome = search(device, cap=10**6, limit=None)
    assert device.calls[:8] == [1, 2, 4, 8, 16, 32, 64, 128]
    assert_exact(outcome, 100)


# --- caps and starts ----------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    true_max=st.integers(0, 5000),
    cap=st.integers(1, 5000),
    shape=st.sampled_from(SHAPES),
    start=st.integers(1, 6000),
)
def test_cap_and_start_are_honoured(true_max: int, cap: int, shape: str, start: int) -> None:
    outcome, device = run(true_max, shape, cap=cap, start=start)
    assert_exact(outcome, true_max, cap)
    assert device.calls[0] == min(start, cap)
    assert max(device.calls) <= cap
    assert len(device.calls) <= log_bound(max(true_max, start, 2)) + 2


@pytest.mark.parametrize("shape", SHAPES)
def test_cap_below_the_maximum_is_tested_and_returned(shape: str) -> None:
    outcome, device = run(1000, shape, cap=37)
    assert outcome.best == 37
    assert outcome.first_failure is None
    assert any(t.batch == 37 and t.fitted for t in outcome.trials)
    assert max(device.calls) == 37


def test_cap_of_one() -> None:
    outcome, device = run(1000, "linear", cap=1)
    assert (outcome.best, outcome.first_failure, device.calls) == (1, None, [1])


@pytest.mark.parametrize("shape", SHAPES)
def test_start_that_does_not_fit_halves_down(shape: str) -> None:
    outcome, device = run(10, shape, start=64)
    assert_exact(outcome, 10)
    assert device.calls[:3] == [64, 32, 16]


def test_start_that_fits_grows_from_there() -> None:
    outcome, device = run(1000, "no_peaks", start=100)
    assert device.calls[:4] == [100, 200, 400, 800]
    assert_exact(outcome, 1000)


@pytest.mark.parametrize("start", [1, 8, 1000])
def test_nothing_fits(start: int) -> None:
    outcome, device = run(0, "linear", start=start)
    assert (outcome.best, outcome.first_failure) == (0, 1)
    assert device.calls[-1] == 1
    assert not any(t.fitted for t in outcome.trials)


def test_trials_record_peaks_and_time() -> None:
    outcome, _ = run(50, "flat_then_linear")
    first = outcome.trials[0]
    assert first.fitted and first.batch == 1
    assert first.peak_bytes == int(linear(25))  # the flat optimizer-step peak
    assert first.backward_peak_bytes == int(linear(1))
    assert first.seconds == 1.0  # one tick of the injected clock
    assert all(t.peak_bytes is None for t in outcome.trials if not t.fitted)


# --- the memory model -------------------------------------------------------------------------------


def test_fit_memory_model_uses_the_two_largest_fitted_batches() -> None:
    trials = [
        Trial(1, True, None, 0.0, 1_000),
        Trial(4, True, None, 0.0, 9_999),  # not one of the two largest
        Trial(10, True, None, 0.0, 2_000),
        Trial(20, True, None, 0.0, 3_000),
        Trial(40, False, None, 0.0, None),
    ]
    model = fit_memory_model(trials)
    assert model == MemoryModel(fixed_bytes=1_000.0, bytes_per_sample=100.0)
    assert model.predict_max(5_000) == 40


def test_fit_memory_model_needs_two_measured_points() -> None:
    assert fit_memory_model([]) is None
    assert fit_memory_model([Trial(4, True, None, 0.0, 100)]) is None
    assert fit_memory_model([Trial(4, True, None, 0.0, None), Trial(8, True, None, 0.0, None)]) is None
    assert fit_memory_model([Trial(4, True, None, 0.0, 100), Trial(4, True, None, 0.0, 100)]) is None


def test_a_flat_or_falling_model_predicts_nothing() -> None:
    assert MemoryModel(1_000.0, 0.0).predict_max(10_000) is None
    assert MemoryModel(1_000.0, -5.0).predict_max(10_000) is None


def test_search_never_tries_below_its_floor() -> None:
    tried: list[int] = []

    def step(batch: int) -> Peaks:
        tried.append(batch)
        if batch > 5:
            raise OutOfMemory
        return Peaks(100 * batch, 100 * batch)

    outcome = search(step, cap=1000, start=8, floor=2)
    assert outcome.best == 5 and min(tried) >= 2

    def never_fits(batch: int) -> Peaks:
        tried.append(batch)
        raise OutOfMemory

    tried.clear()
    outcome = search(never_fits, cap=100, start=2, floor=2)
    assert outcome.best == 0 and tried == [2]
