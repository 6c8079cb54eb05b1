"""Tests for autobatch.memory.timeline: memory models from two trials' allocation timelines, on made-up
timelines and on the real steps of the test models (ideal and allocator emulation)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autobatch.memory.allocator import replay
from autobatch.memory.timeline import SMALL_SIZE, MemoryTimeline, Timeline, best_fit, fit_timeline
from autobatch.options import Options
from autobatch.probing.prober import Prober
from autobatch.session import resolve
from tests.models import case

KiB, MiB = 1 << 10, 1 << 20


def timeline(
    batch: int, per_sample: list[int], fixed: int = 0, resident: tuple[int, ...] = (4096,)
) -> Timeline:
    """Allocations of ``fixed + size × batch`` bytes, all held, then freed last first."""
    n = len(per_sample)
    allocs = [("alloc", i, fixed + size * batch) for i, size in enumerate(per_sample)]
    frees = [("free", i) for i in reversed(range(n))]
    return Timeline(batch, resident, tuple(allocs + frees))


# -- fitting -------------------------------------------------------------------------------------------


def test_two_timelines_that_line_up_give_every_allocation_as_a_line() -> None:
    model = fit_timeline(timeline(2, [1000, 300], fixed=64), timeline(5, [1000, 300], fixed=64))
    assert model is not None and model.points == (2, 5)
    assert model.sizes_at(11) == [64 + 11000, 64 + 3300]
    assert fit_timeline(timeline(5, [10]), timeline(2, [10])) is not None  # either order


@pytest.mark.parametrize(
    "other",
    [
        timeline(3, [1000, 300, 7]),  # another allocation
        timeline(3, [1000, 300], resident=(8192,)),  # other resident tensors
        Timeline(
            3, (4096,), (("alloc", 0, 3000), ("free", 0), ("alloc", 1, 900), ("free", 1))
        ),  # freed earlier
        timeline(2, [1000, 300]),  # the same batch: no line
        Timeline(3, (4096,), (("alloc", 0, 10), ("alloc", 1, 900), ("free", 1), ("free", 0))),  # shrank
    ],
    ids=["extra alloc", "resident", "order", "same batch", "smaller at a larger batch"],
)
def test_timelines_that_do_not_line_up_give_no_model(other: Timeline) -> None:
    assert fit_timeline(timeline(2, [1000, 300]), other) is None


def test_best_fit_takes_the_two_largest_batches_that_line_up() -> None:
    odd = Timeline(9, (4096,), (("alloc", 0, 1),))
    model = best_fit([timeline(2, [100]), timeline(3, [100]), timeline(7, [100]), odd])
    assert model is not None and model.points == (3, 7)
    assert best_fit([timeline(2, [100])]) is None


# -- peaks and predictions ------------------------------------------------------------------------------


def test_the_ideal_peak_is_the_largest_live_total_in_512_byte_blocks() -> None:
    # Resident 4096; at batch 10: 10000 → 10240 and 3000 → 3072 held together.
    model = fit_timeline(timeline(1, [1000, 300]), timeline(2, [1000, 300]))
    assert model is not None
    assert model.peak(10) == 4096 + 10240 + 3072
    # A temporary freed before the next allocation does not add up.
    temp = [
        Timeline(b, (), (("alloc", 0, 1000 * b), ("free", 0), ("alloc", 1, 600 * b), ("free", 1)))
        for b in (1, 2)
    ]
    assert fit_timeline(*temp).peak(10) == 10240  # type: ignore[union-attr]


def test_the_allocator_peak_is_the_replayed_reserved_memory() -> None:
    model = fit_timeline(timeline(1, [1000, 300]), timeline(2, [1000, 300]))
    assert model is not None
    assert model.peak(10, allocator=True) == replay(model.events_at(10), cap=None).peak_reserved == 2 * MiB


@given(
    sizes=st.lists(st.integers(0, 4096), min_size=1, max_size=6),
    fixed=st.integers(0, 2048),
    limit=st.integers(8 * KiB, 512 * KiB),
)
def test_the_ideal_max_batch_is_the_largest_that_fits(sizes: list[int], fixed: int, limit: int) -> None:
    model = fit_timeline(timeline(2, sizes, fixed), timeline(3, sizes, fixed))
    assert model is not None
    best = model.max_batch(limit, lo=1, hi=300)
    assert all(model.peak(b) <= limit for b in range(1, best + 1))
    assert best == 300 or model.peak(best + 1) > limit


@given(
    sizes=st.lists(st.sampled_from([0, 512, 4 * KiB, 20 * KiB, 70 * KiB, 300 * KiB]), min_size=1, max_size=5),
    segments=st.integers(2, 12),
)
def test_the_allocator_max_batch_leaves_no_hole_below_it(sizes: list[int], segments: int) -> None:
    """Through the allocator a larger batch can fit where a smaller one did not: the prediction is the
    largest batch below which every batch fits, as brute force over the replays finds it."""
    limit = segments * 2 * MiB
    model = fit_timeline(timeline(2, sizes, 100), timeline(3, sizes, 100))
    assert model is not None
    best = model.max_batch(limit, lo=1, hi=80, allocator=True)
    fits = [model.fits(b, limit, allocator=True) for b in range(1, 81)]
    brute = next((b for b, ok in enumerate(fits, start=1) if not ok), 81) - 1
    assert best == brute


def test_a_size_that_crosses_the_small_pool_cuts_the_range() -> None:
    model = fit_timeline(timeline(1, [64 * KiB]), timeline(2, [64 * KiB]))
    assert isinstance(model, MemoryTimeline)
    assert (1, 16) in model._regions(1, 40) and (17, 40) in model._regions(1, 40)  # 16 × 64 KiB = 1 MiB
    assert SMALL_SIZE == 1 << 20


# -- the real steps of the test models ----------------------------------------------------------------


def _timelines(name: str, emulation: str, limit: str, batches: range) -> tuple[dict[int, Timeline], Any]:
    c = case(name)
    options = {
        "optimizer": c.optimizer("adam"),
        "precision": "fp32",
        "memory_limit": limit,
        "emulation": emulation,
    }
    session = resolve(c.model, c.data, Options.parse("probe", options))
    with session.start():
        prober = Prober(session)
        with prober.restoring(), prober.memory.capped():
            prober.trials.trace_cold(2)  # makes the optimizer state
            for b in batches:
                prober.trials.warm(b)
    return prober.trials.warm_traces["longest"], prober


@pytest.mark.parametrize("name", ["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("emulation", ["ideal", "allocator"])
def test_two_small_trials_predict_every_larger_one_exactly(name: str, emulation: str) -> None:
    """The model from batches 2 and 3 gives the peak the emulated device measures at every batch."""
    timelines, prober = _timelines(name, emulation, "1GiB", range(2, 21))
    model = fit_timeline(timelines[2], timelines[3])
    assert model is not None
    for batch in range(4, 21):
        measured = timelines[batch]
        assert fit_timeline(timelines[2], measured) is not None, batch  # the same allocations, larger
        assert model.sizes_at(batch) == [e[2] for e in measured.events if e[0] == "alloc"], batch
    peaks = {b: model.peak(b, allocator=emulation == "allocator") for b in range(4, 21)}
    assert all(peaks[b] <= peaks[b + 1] for b in range(4, 20)) or emulation == "allocator"
    assert prober.memory.allocator is (emulation == "allocator")


def test_a_batch_of_one_takes_other_paths_in_the_transformer() -> None:
    """Why the probe's timeline trials start at 2."""
    timelines, _ = _timelines("transformer", "ideal", "1GiB", range(1, 4))
    assert fit_timeline(timelines[1], timelines[2]) is None
    assert fit_timeline(timelines[2], timelines[3]) is not None


def test_steady_traces_and_the_cold_one_are_kept_apart() -> None:
    """The first step from a cold start makes the optimizer state: its trace differs from a steady one."""
    timelines, prober = _timelines("mlp", "ideal", "1GiB", range(2, 3))
    assert set(timelines) == {2} and set(prober.trials.cold_traces["longest"]) == {2}
    cold, warm = prober.trials.cold_traces["longest"][2], timelines[2]
    assert cold.skeleton() != warm.skeleton() and len(cold.resident) < len(warm.resident)
