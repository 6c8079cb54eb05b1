"""Tests for autobatch.memory.allocator: each rule of PyTorch's CUDA caching allocator on hand-computed
sequences."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import autobatch.memory.allocator
from autobatch.memory.alloc_conf import AllocatorConfig, parse_alloc_conf
from autobatch.memory.allocator import (
    AllocatorOutOfMemory,
    BlockInfo,
    CachingAllocator,
    ReplayResult,
    SegmentLayout,
    replay,
)

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
T, F = True, False  # allocated, free


def layout(a: CachingAllocator) -> list[list[tuple[int, bool]]]:
    """Each segment's blocks as (size, allocated), segments in address order."""
    return [[(b.size, b.allocated) for b in s.blocks] for s in a.snapshot()]


def figures(a: CachingAllocator) -> tuple[int, ...]:
    return (a.allocated_bytes, a.reserved_bytes, a.requested_bytes, a.num_segments)


# --- rounding and pools -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nbytes", "size"), [(1, 512), (511, 512), (512, 512), (513, 1024), (1024, 1024), (1025, 1536)]
)
def test_requests_round_up_to_512_bytes(nbytes: int, size: int) -> None:
    a = CachingAllocator(None)
    a.malloc(nbytes)
    assert figures(a) == (size, 2 * MiB, nbytes, 1)
    assert layout(a) == [[(size, T), (2 * MiB - size, F)]]


def test_zero_bytes_take_no_memory_and_free_of_the_null_handle_is_a_no_op() -> None:
    a = CachingAllocator(None)
    assert a.malloc(0) == 0
    assert figures(a) == (0, 0, 0, 0)
    a.free(0)
    assert a.snapshot() == []


def test_one_mib_is_small_and_one_byte_more_is_large() -> None:
    a = CachingAllocator(None)
    a.malloc(MiB)
    a.malloc(MiB + 1)
    small, large = a.snapshot()
    assert (small.small, small.size, large.small, large.size) == (True, 2 * MiB, False, 20 * MiB)
    assert layout(a) == [[(MiB, T), (MiB, F)], [(MiB + 512, T), (19 * MiB - 512, F)]]
    assert a.allocated_bytes == 2 * MiB + 512


@pytest.mark.parametrize(
    ("nbytes", "segment"),
    [
        (1, 2 * MiB),
        (MiB, 2 * MiB),
        (MiB + 1, 20 * MiB),
        (10 * MiB - 512, 20 * MiB),
        (10 * MiB, 10 * MiB),
        (11 * MiB, 12 * MiB),
        (12 * MiB, 12 * MiB),
        (12 * MiB + 1, 14 * MiB),
    ],
)
def test_segment_sizes(nbytes: int, segment: int) -> None:
    a = CachingAllocator(None)
    a.malloc(nbytes)
    assert (a.reserved_bytes, a.num_segments) == (segment, 1)
    assert [s.size for s in a.snapshot()] == [segment]


def test_pools_do_not_serve_each_other() -> None:
    a = CachingAllocator(None)
    a.free(a.malloc(2 * MiB))  # a free 20 MiB block in the large pool
    a.malloc(1000)
    assert layout(a) == [[(20 * MiB, F)], [(1024, T), (2 * MiB - 1024, F)]]
    b = CachingAllocator(None)
    b.free(b.malloc(1000))  # a free 2 MiB block in the small pool
    b.malloc(MiB + 512)
    assert layout(b) == [[(2 * MiB, F)], [(MiB + 512, T), (19 * MiB - 512, F)]]


# --- finding and splitting blocks -----------------------------------------------------------------


def _large_with_holes() -> tuple[CachingAllocator, list[int]]:
    """A 20 MiB segment laid out as [2 free, 2 used, 4 free, 2 used, 10 free] MiB."""
    a = CachingAllocator(None)
    h = [a.malloc(n * MiB) for n in (2, 2, 4, 2)]
    a.free(h[0])
    a.free(h[2])
    assert layout(a) == [[(2 * MiB, F), (2 * MiB, T), (4 * MiB, F), (2 * MiB, T), (10 * MiB, F)]]
    return a, h


def test_best_fit_takes_the_smallest_free_block_that_fits_and_keeps_a_1_mib_remainder_whole() -> None:
    a, h = _large_with_holes()
    assert a.malloc(3 * MiB) == h[2]  # 4 MiB is the smallest fit; its 1 MiB remainder is not split off
    assert layout(a) == [[(2 * MiB, F), (2 * MiB, T), (4 * MiB, T), (2 * MiB, T), (10 * MiB, F)]]
    assert (a.allocated_bytes, a.requested_bytes) == (8 * MiB, 7 * MiB)


def test_best_fit_splits_a_remainder_above_1_mib() -> None:
    a, h = _large_with_holes()
    assert a.malloc(5 * MiB) == h[3] + 2 * MiB  # only the 10 MiB block fits
    assert layout(a)[0][-2:] == [(5 * MiB, T), (5 * MiB, F)]


def test_ties_go_to_the_lowest_address() -> None:
    a = CachingAllocator(None)
    x, _, _ = (a.malloc(512 * KiB) for _ in range(3))
    a.free(x)  # two free 512 KiB blocks: offsets 0 and 1.5 MiB
    assert a.malloc(512 * KiB) == x
    assert layout(a) == [[(512 * KiB, T)] * 3 + [(512 * KiB, F)]]


def test_ties_between_segments_go_to_the_older_segment() -> None:
    a = CachingAllocator(None)
    first, second = a.malloc(2 * MiB), a.malloc(19 * MiB)  # the second fills a new 20 MiB segment whole
    a.free(second)
    a.free(first)
    assert layout(a) == [[(20 * MiB, F)], [(20 * MiB, F)]]
    assert a.malloc(19 * MiB) == first


@pytest.mark.parametrize(
    ("nbytes", "expected"),
    [
        (1024, [(1024, T), (512, T), (2 * MiB - 1536, F)]),  # remainder 0: the whole block
        (512, [(512, T), (512, F), (512, T), (2 * MiB - 1536, F)]),  # remainder 512: split
    ],
)
def test_small_pool_splits_a_remainder_of_512_bytes(nbytes: int, expected: list[tuple[int, bool]]) -> None:
    a = CachingAllocator(None)
    hole = a.malloc(1024)
    a.malloc(512)
    a.free(hole)
    assert a.malloc(nbytes) == hole
    assert layout(a) == [expected]
    assert a.allocated_bytes == expected[0][0] + 512


@pytest.mark.parametrize(
    ("nbytes", "expected", "allocated"),
    [
        (19 * MiB, [(20 * MiB, T)], 20 * MiB),  # remainder exactly 1 MiB: not split
        (19 * MiB - 512, [(19 * MiB - 512, T), (MiB + 512, F)], 19 * MiB - 512),
    ],
)
def test_large_pool_splits_only_a_remainder_above_1_mib(
    nbytes: int, expected: list[tuple[int, bool]], allocated: int
) -> None:
    a = CachingAllocator(None)
    a.malloc(nbytes)
    assert layout(a) == [expected]
    assert (a.allocated_bytes, a.reserved_bytes, a.requested_bytes) == (allocated, 20 * MiB, nbytes)


# --- freeing and merging --------------------------------------------------------------------------

Q = 512 * KiB


@pytest.mark.parametrize(
    ("frees", "expected"),
    [
        ((2,), [(Q, T), (Q, T), (2 * Q, F)]),  # merges with the next block
        ((0, 1), [(2 * Q, F), (Q, T), (Q, F)]),  # the second merges with the previous one
        ((0, 2, 1), [(4 * Q, F)]),  # the last merges with both
        ((1,), [(Q, T), (Q, F), (Q, T), (Q, F)]),  # no free neighbour
    ],
)
def test_free_merges_with_free_neighbours(frees: tuple[int, ...], expected: list[tuple[int, bool]]) -> None:
    a = CachingAllocator(None)
    h = [a.malloc(Q) for _ in range(3)]
    for i in frees:
        a.free(h[i])
    assert layout(a) == [expected]
    assert (a.allocated_bytes, a.reserved_bytes) == (sum(s for s, used in expected if used), 2 * MiB)


def test_a_freed_block_is_reused_instead_of_a_new_segment() -> None:
    a = CachingAllocator(None)
    h = a.malloc(5 * MiB)
    a.free(h)
    assert figures(a) == (0, 20 * MiB, 0, 1)
    assert a.malloc(5 * MiB) == h
    assert figures(a) == (5 * MiB, 20 * MiB, 5 * MiB, 1)


def test_fragmented_free_bytes_do_not_serve_a_larger_request() -> None:
    a = CachingAllocator(None)
    h = [a.malloc(Q) for _ in range(4)]
    a.free(h[0])
    a.free(h[2])  # 1 MiB free, in two 512 KiB blocks
    a.malloc(MiB)
    assert layout(a) == [[(Q, F), (Q, T), (Q, F), (Q, T)], [(MiB, T), (MiB, F)]]
    assert figures(a) == (2 * MiB, 4 * MiB, 2 * MiB, 2)


# --- the cap, releasing the cache, empty_cache ----------------------------------------------------


@pytest.mark.parametrize(("cap", "fits"), [(22 * MiB, True), (22 * MiB - 1, False)])
def test_the_cap_applies_to_reserved_not_allocated_bytes(cap: int, fits: bool) -> None:
    a = CachingAllocator(cap)
    a.malloc(2 * MiB)  # 2 MiB allocated, 20 MiB reserved
    assert a.would_fit(1000) is fits
    if fits:
        a.malloc(1000)
        assert figures(a) == (2 * MiB + 1024, 22 * MiB, 2 * MiB + 1000, 2)
    else:
        with pytest.raises(AllocatorOutOfMemory):
            a.malloc(1000)  # 2 MiB + 1 KiB allocated would fit the cap; 22 MiB reserved does not
        assert figures(a) == (2 * MiB, 20 * MiB, 2 * MiB, 1)
    assert (a.num_ooms, a.num_alloc_retries) == ((0, 0) if fits else (1, 1))


def test_cached_segments_of_both_pools_are_released_before_running_out() -> None:
    a = CachingAllocator(21 * MiB)
    a.free(a.malloc(2 * MiB))  # a cached 20 MiB large segment
    before = a.snapshot()
    assert a.would_fit(1000)  # only once the cached segment is released
    assert a.snapshot() == before
    a.malloc(1000)
    assert layout(a) == [[(1024, T), (2 * MiB - 1024, F)]]
    assert (a.reserved_bytes, a.num_alloc_retries, a.num_ooms) == (2 * MiB, 1, 0)
    b = CachingAllocator(20 * MiB)
    b.free(b.malloc(1000))  # a cached 2 MiB small segment
    assert b.would_fit(2 * MiB)
    b.malloc(2 * MiB)
    assert layout(b) == [[(2 * MiB, T), (18 * MiB, F)]]
    assert (b.reserved_bytes, b.num_alloc_retries) == (20 * MiB, 1)


def test_a_segment_with_a_live_block_is_not_released() -> None:
    a = CachingAllocator(21 * MiB)
    h = a.malloc(2 * MiB)
    a.malloc(2 * MiB)
    a.free(h)
    before = a.snapshot()
    assert not a.would_fit(1000)
    with pytest.raises(AllocatorOutOfMemory):
        a.malloc(1000)
    assert a.snapshot() == before
    assert layout(a) == [[(2 * MiB, F), (2 * MiB, T), (16 * MiB, F)]]
    assert (a.reserved_bytes, a.num_ooms, a.num_alloc_retries) == (20 * MiB, 1, 1)


def test_empty_cache_releases_only_entirely_free_segments() -> None:
    a = CachingAllocator(None)
    a.free(a.malloc(1000))  # small, entirely free
    a.malloc(3 * MiB)  # large, one live block
    a.free(a.malloc(18 * MiB))  # too large for the 17 MiB left: an 18 MiB segment, entirely free
    assert figures(a) == (3 * MiB, 40 * MiB, 3 * MiB, 3)
    a.empty_cache()
    assert layout(a) == [[(3 * MiB, T), (17 * MiB, F)]]
    assert figures(a) == (3 * MiB, 20 * MiB, 3 * MiB, 1)
    assert a.num_alloc_retries == 0


# --- statistics -----------------------------------------------------------------------------------


def test_peaks_and_their_reset() -> None:
    a = CachingAllocator(None)
    big = a.malloc(3 * MiB)
    a.malloc(1000)
    a.free(big)
    a.empty_cache()
    assert figures(a) == (1024, 2 * MiB, 1000, 1)
    peaks = (a.peak_allocated_bytes, a.peak_reserved_bytes, a.peak_requested_bytes)
    assert peaks == (3 * MiB + 1024, 22 * MiB, 3 * MiB + 1000)
    a.reset_peaks()
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes, a.peak_requested_bytes) == (1024, 2 * MiB, 1000)
    a.malloc(1)
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes, a.peak_requested_bytes) == (1536, 2 * MiB, 1001)


def test_out_of_memory_error_fields_and_message() -> None:
    a = CachingAllocator(21 * MiB)
    a.malloc(2 * MiB)
    with pytest.raises(AllocatorOutOfMemory) as caught:
        a.malloc(1000)
    e = caught.value
    assert isinstance(e, RuntimeError)
    assert (e.requested, e.segment_size, e.allocated, e.reserved, e.cap) == (
        1000,
        2 * MiB,
        2 * MiB,
        20 * MiB,
        21 * MiB,
    )
    assert str(e) == (
        "CUDA out of memory (emulated). Tried to allocate 2.00 MiB. 21.00 MiB allowed; of the allocated "
        "memory 2.00 MiB is allocated by PyTorch, and 18.00 MiB is reserved by PyTorch but unallocated. "
        "Free tensors or use a smaller batch."
    )
    again = pickle.loads(pickle.dumps(e))
    assert (str(again), again.reserved) == (str(e), e.reserved)


@pytest.mark.parametrize(
    ("cap", "nbytes", "tried", "allowed"),
    [
        (0, 1, "2.00 MiB", "0 bytes"),
        (1024, 1, "2.00 MiB", "1024 bytes"),
        (1025, MiB + 1, "20.00 MiB", "1.00 KiB"),
        (GiB, 3 * GiB, "3.00 GiB", "1024.00 MiB"),
        (GiB + 1, 3 * GiB, "3.00 GiB", "1.00 GiB"),
    ],
)
def test_out_of_memory_message_uses_cuda_units(cap: int, nbytes: int, tried: str, allowed: str) -> None:
    with pytest.raises(AllocatorOutOfMemory, match=f"Tried to allocate {tried}. {allowed} allowed;"):
        CachingAllocator(cap).malloc(nbytes)


# --- would_fit and bad arguments ------------------------------------------------------------------


@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from([1, 700 * KiB, MiB + 1, 3 * MiB, 11 * MiB]))))
def test_would_fit_predicts_malloc_and_changes_nothing(steps: list[tuple[int, int]]) -> None:
    a = CachingAllocator(30 * MiB)
    live: list[int] = []
    for choice, nbytes in steps:
        if choice < 3 and live:
            a.free(live.pop(choice % len(live)))
            continue
        before = (a.snapshot(), figures(a), a.num_ooms)
        fits = a.would_fit(nbytes)
        assert (a.snapshot(), figures(a), a.num_ooms) == before
        try:
            live.append(a.malloc(nbytes))
        except AllocatorOutOfMemory:
            assert not fits
        else:
            assert fits


def test_would_fit_without_a_cap_is_always_true() -> None:
    assert CachingAllocator(None).would_fit(1 << 50)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1", None])
def test_bad_sizes_are_refused_and_change_nothing(bad: object) -> None:
    a = CachingAllocator(None)
    a.malloc(1000)
    before = (a.snapshot(), figures(a))
    for call in (a.malloc, a.would_fit):
        with pytest.raises(ValueError, match=r"Expected `nbytes` to be a non-negative int of bytes, but got"):
            call(bad)  # type: ignore[operator]
    assert (a.snapshot(), figures(a)) == before


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1GiB"])
def test_bad_cap_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Expected `cap` to be a non-negative int of bytes, but got"):
        CachingAllocator(bad)  # type: ignore[arg-type]


def test_unknown_and_double_freed_handles_are_refused() -> None:
    a = CachingAllocator(None)
    h = a.malloc(1000)
    for bad in (h + 1024, 12345, True, "h", None):  # h + 1024 is the free rest of h's segment
        with pytest.raises(ValueError, match=r"Expected `handle` to be a live allocation .* but got"):
            a.free(bad)  # type: ignore[arg-type]
    a.free(h)
    with pytest.raises(ValueError, match=rf"but got {h} \(never returned by malloc, or already freed\)"):
        a.free(h)
    assert figures(a) == (0, 2 * MiB, 0, 1)


# --- replay ---------------------------------------------------------------------------------------


def test_replay_agrees_with_a_step_by_step_run() -> None:
    events = [("alloc", "w", 3 * MiB), ("alloc", "x", 1000), ("free", "w"), ("alloc", "y", 2 * MiB)]
    events += [("alloc", "z", 19 * MiB), ("free", "x"), ("free", "y")]
    a = CachingAllocator(None)
    handles = {}
    for kind, key, *nbytes in events:
        if kind == "alloc":
            handles[key] = a.malloc(*nbytes)
        else:
            a.free(handles.pop(key))
    result = replay(events, cap=None)
    assert (result.peak_allocated, result.peak_reserved, result.first_oom) == (
        a.peak_allocated_bytes,
        a.peak_reserved_bytes,
        None,
    )
    assert (result.peak_allocated, result.peak_reserved) == (22 * MiB + 1024, 42 * MiB)


def test_replay_stops_at_the_first_out_of_memory() -> None:
    events = [("alloc", 1, 2 * MiB), ("alloc", 2, 1000), ("free", 1), ("alloc", 3, 21 * MiB), ("free", 9)]
    # The 21 MiB request needs a 22 MiB segment: 2 MiB stay reserved once the cached 20 MiB is released.
    assert replay(events, cap=22 * MiB) == ReplayResult(2 * MiB + 1024, 22 * MiB, 3)
    # Under 40 MiB it fits only because the cached segment goes first (22 + 22 > 40 ≥ 2 + 22).
    assert replay(events[:4], cap=40 * MiB) == ReplayResult(22 * MiB + 1024, 24 * MiB, None)


@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 24 * MiB)), max_size=60), st.integers(0, 64))
def test_replay_matches_the_allocator_and_blocks_tile_their_segments(
    steps: list[tuple[int, int]], cap_mib: int
) -> None:
    cap = cap_mib * MiB
    a, live, events = CachingAllocator(cap), [], []
    oom = None
    for i, (choice, nbytes) in enumerate(steps):
        if choice == 0 and live:
            key, h = live.pop(nbytes % len(live))
            events.append(("free", key))
            a.free(h)
            continue
        events.append(("alloc", i, nbytes))
        try:
            live.append((i, a.malloc(nbytes)))
        except AllocatorOutOfMemory:
            oom = len(events) - 1
            break
        for s in a.snapshot():  # contiguous blocks, no two free neighbours
            assert [b.offset for b in s.blocks] == [
                sum(b.size for b in s.blocks[:j]) for j in range(len(s.blocks))
            ]
            assert sum(b.size for b in s.blocks) == s.size
            assert not any(not x.allocated and not y.allocated for x, y in pairwise(s.blocks))
        assert a.reserved_bytes == sum(s.size for s in a.snapshot()) <= cap
        assert a.allocated_bytes == sum(b.size for s in a.snapshot() for b in s.blocks if b.allocated)
    result = replay(events, cap)
    assert (result.peak_allocated, result.peak_reserved, result.first_oom) == (
        a.peak_allocated_bytes,
        a.peak_reserved_bytes,
        oom,
    )


@pytest.mark.parametrize(
    ("events", "index"),
    [
        ([("alloc", "x", -1)], 0),
        ([("alloc", "x", 1), ("alloc", "x", 1)], 1),
        ([("alloc", "x", 1), ("free", "x"), ("free", "x")], 2),
        ([("free", "never")], 0),
        ([("alloc", "x", 1.5)], 0),
        ([("alloc", "x")], 0),
        ([("bogus", "x", 1)], 0),
        ([()], 0),
        (["alloc"], 0),
    ],
)
def test_replay_refuses_bad_events(events: list[tuple[object, ...]], index: int) -> None:
    with pytest.raises(ValueError, match=rf"Expected `events\[{index}\]` to be \('alloc', new_id"):
        replay(events, cap=None)


def test_snapshot_offsets_and_addresses() -> None:
    a = CachingAllocator(None)
    x, y = a.malloc(1000), a.malloc(MiB + 1)
    small, large = a.snapshot()
    assert (x, y) == (small.address, large.address) and small.address + 2 * MiB == large.address
    assert small.blocks == (BlockInfo(0, 1024, True), BlockInfo(1024, 2 * MiB - 1024, False))


def test_the_module_does_not_import_torch() -> None:
    path = Path(autobatch.memory.allocator.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('allocator', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['allocator'] = module\n"
        "spec.loader.exec_module(module)\n"
        "module.CachingAllocator(None).malloc(1)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- PYTORCH_CUDA_ALLOC_CONF ----------------------------------------------------------------------

EXPANDABLE = AllocatorConfig(expandable_segments=True)


def seg(
    small: bool, size: int, blocks: list[tuple[int, int, bool]], unmapped: tuple[tuple[int, int], ...] = ()
) -> SegmentLayout:
    return SegmentLayout(small, size, tuple(BlockInfo(*b) for b in blocks), unmapped)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, AllocatorConfig()),
        ("", AllocatorConfig()),
        ("expandable_segments:True", EXPANDABLE),
        (" expandable_segments : True ,", EXPANDABLE),  # spaces dropped, a trailing comma allowed
        ("expandable_segments:True,expandable_segments:False", AllocatorConfig()),  # the last one wins
        ("max_split_size_mb:128", AllocatorConfig(max_split_size_mb=128)),
        (
            "backend:native,release_lock_on_cudamalloc:True,pinned_use_cuda_host_register:True",
            AllocatorConfig(),
        ),
        (
            "roundup_power2_divisions:[256:1,512:2,>:4],garbage_collection_threshold:0.6,backend:cudaMallocAsync",
            AllocatorConfig(
                unmodelled=(
                    "roundup_power2_divisions:[256:1,512:2,>:4]",
                    "garbage_collection_threshold:0.6",
                    "backend:cudaMallocAsync",
                )
            ),
        ),
        ("some_future_key:7,expandable_segments:True", AllocatorConfig(True, None, ("some_future_key:7",))),
        # Not modelled together: reported rather than silently dropped or half-applied.
        (
            "max_split_size_mb:256,expandable_segments:True",
            AllocatorConfig(True, None, ("max_split_size_mb:256",)),
        ),
    ],
)
def test_parse_alloc_conf(text: str | None, expected: AllocatorConfig) -> None:
    assert parse_alloc_conf(text) == expected


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("expandable_segments", "comma-separated key:value"),
        ("expandable_segments:", "comma-separated key:value"),
        (":True", "comma-separated key:value"),
        ("expandable_segments:True:False", "comma-separated key:value"),
        ("expandable_segments:True,,max_split_size_mb:64", "comma-separated key:value"),
        ("roundup_power2_divisions:[256:1", "comma-separated key:value"),
        ("expandable_segments:true", "expandable_segments to be True or False"),
        ("expandable_segments:1", "expandable_segments to be True or False"),
        ("max_split_size_mb:19", "max_split_size_mb to be a whole number of MiB >= 20"),
        ("max_split_size_mb:64MB", "max_split_size_mb to be a whole number of MiB >= 20"),
    ],
)
def test_malformed_alloc_conf_is_refused_naming_the_text(text: str, what: str) -> None:
    with pytest.raises(ValueError, match=rf"Expected .*{what}.* but got .*{re.escape(repr(text))}"):
        parse_alloc_conf(text)


def test_config_arguments_are_checked() -> None:
    assert AllocatorConfig(max_split_size_mb=64).alloc_conf == "max_split_size_mb:64"
    assert (EXPANDABLE.alloc_conf, AllocatorConfig().alloc_conf) == ("expandable_segments:True", "")
    with pytest.raises(TypeError, match="Expected `expandable_segments` to be a bool, but got 'True'"):
        AllocatorConfig(expandable_segments="True")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected `max_split_size_mb` to be None or an int >= 20"):
        AllocatorConfig(max_split_size_mb=10)
    with pytest.raises(ValueError, match="Expected `max_split_size_mb` to be None with expandable segments"):
        AllocatorConfig(expandable_segments=True, max_split_size_mb=64)
    with pytest.raises(TypeError, match="Expected `config` to be an AllocatorConfig"):
        CachingAllocator(None, "expandable_segments:True")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Expected the allocator configuration to be a str or None"):
        parse_alloc_conf(b"expandable_segments:True")  # type: ignore[arg-type]


# --- max_split_size_mb ----------------------------------------------------------------------------

MSS64 = AllocatorConfig(max_split_size_mb=64)


def test_max_split_size_keeps_oversize_blocks_whole_and_for_oversize_requests() -> None:
    a = CachingAllocator(None, MSS64)
    big = a.malloc(80 * MiB)
    a.free(big)
    a.malloc(30 * MiB)  # would split the cached 80 MiB block by default: here it gets a segment of its own
    assert layout(a) == [[(80 * MiB, F)], [(30 * MiB, T)]]
    assert a.malloc(70 * MiB) == big  # an oversize request takes the oversize block, unsplit (80 < 70 + 20)
    assert layout(a) == [[(80 * MiB, T)], [(30 * MiB, T)]]
    assert a.allocated_bytes == 110 * MiB
    b = CachingAllocator(None, MSS64)
    b.free(b.malloc(90 * MiB))
    b.malloc(70 * MiB)  # 90 MiB is 20 MiB or more above the request: not taken
    assert layout(b) == [[(90 * MiB, F)], [(70 * MiB, T)]]
    d = CachingAllocator(None)
    d.free(d.malloc(80 * MiB))
    d.malloc(30 * MiB)
    assert layout(d) == [[(30 * MiB, T), (50 * MiB, F)]]  # the default splits it


def test_max_split_size_releases_oversize_blocks_before_everything_else() -> None:
    def cached(cap: int, *oversize: int) -> CachingAllocator:
        a = CachingAllocator(cap, MSS64)
        small = a.malloc(2 * MiB)  # a 20 MiB segment, cached once freed
        for nbytes in oversize:
            a.free(a.malloc(nbytes))
        a.free(small)
        return a

    a = cached(190 * MiB, 100 * MiB)
    a.malloc(80 * MiB)  # 100 >= 80 + 20: a segment of its own; 120 + 80 > 190: the 100 MiB one goes first
    assert layout(a) == [[(20 * MiB, F)], [(80 * MiB, T)]]
    assert (a.reserved_bytes, a.num_alloc_retries) == (100 * MiB, 0)
    b = cached(200 * MiB, 100 * MiB, 70 * MiB)
    b.malloc(150 * MiB)  # no one cached block covers 150 MiB: the largest oversize ones go until they do
    assert layout(b) == [[(20 * MiB, F)], [(150 * MiB, T)]]
    assert (b.reserved_bytes, b.num_alloc_retries) == (170 * MiB, 0)
    c = cached(200 * MiB, 100 * MiB)
    c.malloc(150 * MiB)  # 100 MiB released is not enough: then every cached segment goes, and it is a retry
    assert layout(c) == [[(150 * MiB, T)]]
    assert (c.reserved_bytes, c.num_alloc_retries) == (150 * MiB, 1)


# --- expandable segments --------------------------------------------------------------------------


def ranges(a: CachingAllocator) -> list[tuple[int, int, list[tuple[int, bool]]]]:
    """Each mapped range as (offset from the first one, size, blocks)."""
    snapshot = a.snapshot()
    return [
        (s.address - snapshot[0].address, s.size, [(b.size, b.allocated) for b in s.blocks]) for s in snapshot
    ]


@pytest.mark.parametrize(
    ("nbytes", "mapped", "expected"),
    [
        (1000, 2 * MiB, [(1024, T), (2 * MiB - 1024, F)]),  # the small pool maps 2 MiB pages
        (MiB + 1, 20 * MiB, [(MiB + 512, T), (19 * MiB - 512, F)]),  # the large pool 20 MiB pages
        (19 * MiB, 20 * MiB, [(19 * MiB, T), (MiB, F)]),  # any remainder of 512 bytes is split off
        (25 * MiB, 40 * MiB, [(25 * MiB, T), (15 * MiB, F)]),
        (40 * MiB, 40 * MiB, [(40 * MiB, T)]),
    ],
)
def test_expandable_segments_map_whole_pages(
    nbytes: int, mapped: int, expected: list[tuple[int, bool]]
) -> None:
    a = CachingAllocator(None, EXPANDABLE)
    a.malloc(nbytes)
    assert layout(a) == [expected]
    assert (a.reserved_bytes, a.allocated_bytes, a.num_segments) == (mapped, expected[0][0], 1)
    assert a.snapshot()[0].expandable


def test_expandable_segments_fill_the_slack_that_whole_segments_strand() -> None:
    # Five 7 MiB tensors: by default two per 20 MiB segment, 6 MiB stranded at the end of each.
    default, expandable = CachingAllocator(None), CachingAllocator(None, EXPANDABLE)
    for a in (default, expandable):
        for _ in range(5):
            a.malloc(7 * MiB)
    assert (default.reserved_bytes, default.num_segments) == (60 * MiB, 3)
    assert layout(expandable) == [[(7 * MiB, T)] * 5 + [(5 * MiB, F)]]
    assert (expandable.reserved_bytes, expandable.num_segments) == (40 * MiB, 1)
    under_cap = [CachingAllocator(50 * MiB, config) for config in (AllocatorConfig(), EXPANDABLE)]
    for a in under_cap:
        for _ in range(4):
            a.malloc(7 * MiB)
    with pytest.raises(AllocatorOutOfMemory):
        under_cap[0].malloc(7 * MiB)
    under_cap[1].malloc(7 * MiB)
    assert under_cap[1].reserved_bytes == 40 * MiB


def test_a_request_larger_than_any_free_block_extends_the_segment() -> None:
    # Allocate A, then B, free A, allocate C slightly larger than A.
    default, expandable = CachingAllocator(None), CachingAllocator(None, EXPANDABLE)
    for a in (default, expandable):
        first = a.malloc(18 * MiB)
        a.malloc(3 * MiB // 2)
        a.free(first)
        a.malloc(19 * MiB)
    # By default C needs a third segment; the free 18 MiB one stays cached beside it.
    assert layout(default) == [[(18 * MiB, F)], [(3 * MiB // 2, T), (37 * MiB // 2, F)], [(20 * MiB, T)]]
    assert default.reserved_bytes == 58 * MiB
    # Expandable: C starts in the free end of the first page, and one more page is mapped after it.
    assert layout(expandable) == [[(18 * MiB, F), (3 * MiB // 2, T), (19 * MiB, T), (3 * MiB // 2, F)]]
    assert (expandable.reserved_bytes, expandable.num_segments) == (40 * MiB, 1)


def test_best_fit_takes_the_end_of_the_mapped_pages_last() -> None:
    a = CachingAllocator(None, EXPANDABLE)
    first = a.malloc(8 * MiB)
    a.malloc(8 * MiB)
    a.free(first)  # free: 8 MiB at offset 0, and 4 MiB at the end of the mapped page
    assert a.malloc(3 * MiB) == first  # the 4 MiB block could grow into unmapped pages: taken last
    assert layout(a) == [[(3 * MiB, T), (5 * MiB, F), (8 * MiB, T), (4 * MiB, F)]]
    d = CachingAllocator(None)
    h = d.malloc(8 * MiB)
    d.malloc(8 * MiB)
    d.free(h)
    assert d.malloc(3 * MiB) == h + 16 * MiB  # the default takes the smaller block


def test_expandable_cap_checks_the_segment_a_request_would_get_without_them() -> None:
    a = CachingAllocator(45 * MiB, EXPANDABLE)
    a.malloc(30 * MiB)  # 40 MiB mapped
    a.malloc(5 * MiB)  # from the free 10 MiB: nothing mapped
    assert a.would_fit(5 * MiB) and not a.would_fit(6 * MiB)
    with pytest.raises(AllocatorOutOfMemory, match=r"Tried to allocate 20\.00 MiB\. 45\.00 MiB allowed"):
        a.malloc(6 * MiB)  # 40 + a 20 MiB segment > 45, though one more page is all it needs
    assert (a.reserved_bytes, a.num_alloc_retries, a.num_ooms) == (40 * MiB, 1, 1)


@pytest.mark.parametrize(("cap", "fits"), [(60 * MiB, True), (55 * MiB, False)])
def test_expandable_pages_are_mapped_only_within_the_cap(cap: int, fits: bool) -> None:
    # 40 MiB mapped, 10 MiB of it free at the end; 12 MiB passes the fraction check (40 + 12 <= 55),
    # but needs one more 20 MiB page: on a device of 55 MiB cuMemCreate fails. (PyTorch on a larger
    # device under set_per_process_memory_fraction maps it, and reserves more than the fraction.)
    a = CachingAllocator(cap, EXPANDABLE)
    a.malloc(30 * MiB)
    assert a.would_fit(12 * MiB) is fits
    if fits:
        a.malloc(12 * MiB)
        assert a.reserved_bytes == 60 * MiB
    else:
        with pytest.raises(AllocatorOutOfMemory):
            a.malloc(12 * MiB)
        assert a.reserved_bytes == 40 * MiB


def test_release_before_out_of_memory_unmaps_free_pages_in_the_middle() -> None:
    a = CachingAllocator(80 * MiB, EXPANDABLE)
    _, middle, last = (a.malloc(20 * MiB) for _ in range(3))
    a.free(middle)
    assert a.layout() == (
        seg(F, 60 * MiB, [(0, 20 * MiB, T), (20 * MiB, 20 * MiB, F), (40 * MiB, 20 * MiB, T)]),
    )
    # 21 MiB: no free block fits, and 60 + 22 > 80: the free middle page is unmapped, then two pages
    # are mapped at the end (the hole is too small, between two live blocks).
    grown = a.malloc(21 * MiB)
    assert grown == last + 20 * MiB
    assert a.layout() == (
        seg(
            F,
            100 * MiB,
            [(0, 20 * MiB, T), (40 * MiB, 20 * MiB, T), (60 * MiB, 21 * MiB, T), (81 * MiB, 19 * MiB, F)],
            ((20 * MiB, 20 * MiB),),
        ),
    )
    assert ranges(a) == [
        (0, 20 * MiB, [(20 * MiB, T)]),
        (40 * MiB, 60 * MiB, [(20 * MiB, T), (21 * MiB, T), (19 * MiB, F)]),
    ]
    assert (a.reserved_bytes, a.num_segments, a.num_alloc_retries, a.num_ooms) == (80 * MiB, 2, 1, 0)
    assert a.peak_reserved_bytes == 80 * MiB


def test_growth_refills_the_lowest_hole_before_the_end() -> None:
    a = CachingAllocator(None, EXPANDABLE)
    first, middle, _ = (a.malloc(20 * MiB) for _ in range(3))
    a.free(middle)
    a.empty_cache()
    a.free(first)  # free [0, 20), unmapped [20, 40), live [40, 60)
    assert a.reserved_bytes == 40 * MiB
    assert a.malloc(25 * MiB) == first  # grows from the free block into the hole after it
    assert a.layout() == (
        seg(F, 60 * MiB, [(0, 25 * MiB, T), (25 * MiB, 15 * MiB, F), (40 * MiB, 20 * MiB, T)]),
    )
    assert a.reserved_bytes == 60 * MiB


def test_expandable_empty_cache_unmaps_free_pages_and_gives_up_empty_segments() -> None:
    a = CachingAllocator(None, EXPANDABLE)
    small = a.malloc(1000)
    h = [a.malloc(15 * MiB) for _ in range(4)]  # 60 MiB: [15 15 15 15] in three pages
    a.free(h[1])
    a.free(h[2])  # free [15, 45): the page [20, 40) is whole
    a.empty_cache()
    large = [(0, 15 * MiB, T), (15 * MiB, 5 * MiB, F), (40 * MiB, 5 * MiB, F), (45 * MiB, 15 * MiB, T)]
    assert a.layout() == (
        seg(F, 60 * MiB, large, ((20 * MiB, 20 * MiB),)),
        seg(T, 2 * MiB, [(0, 1024, T), (1024, 2 * MiB - 1024, F)]),
    )
    assert (a.reserved_bytes, a.num_segments) == (42 * MiB, 3)
    for handle in (small, h[0], h[3]):
        a.free(handle)
    a.empty_cache()
    assert (a.snapshot(), a.layout(), a.reserved_bytes) == ([], (), 0)
    assert a.peak_reserved_bytes == 62 * MiB
    a.malloc(1)  # a new segment, at a new address
    assert a.layout() == (seg(T, 2 * MiB, [(0, 512, T), (512, 2 * MiB - 512, F)]),)


def test_expandable_peaks() -> None:
    a = CachingAllocator(None, EXPANDABLE)
    big = a.malloc(30 * MiB)
    a.malloc(1000)
    a.free(big)
    a.empty_cache()  # the 40 MiB segment is given up; 2 MiB of the small pool stays
    assert figures(a) == (1024, 2 * MiB, 1000, 1)
    assert (a.peak_allocated_bytes, a.peak_reserved_bytes, a.peak_requested_bytes) == (
        30 * MiB + 1024,
        42 * MiB,
        30 * MiB + 1000,
    )
    a.reset_peaks()
    a.malloc(3 * MiB)
    assert (a.peak_reserved_bytes, a.peak_allocated_bytes) == (22 * MiB, 3 * MiB + 1024)


# --- layout -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [AllocatorConfig(), EXPANDABLE], ids=["default", "expandable"])
def test_equal_histories_give_equal_layouts_at_other_addresses(config: AllocatorConfig) -> None:
    def history(a: CachingAllocator) -> None:
        x = a.malloc(3 * MiB)
        a.malloc(1000)
        a.malloc(12 * MiB)
        a.free(x)

    plain, shifted = CachingAllocator(None, config), CachingAllocator(None, config)
    shifted.free(shifted.malloc(50 * MiB))
    shifted.empty_cache()  # its segments now start at other addresses
    history(plain)
    history(shifted)
    assert plain.snapshot() != shifted.snapshot()
    assert plain.layout() == shifted.layout()
    assert len({plain.layout(), shifted.layout()}) == 1  # hashable
    assert next(s.small for s in plain.layout()) is False  # the large pool first


@pytest.mark.parametrize("config", [AllocatorConfig(), EXPANDABLE], ids=["default", "expandable"])
def test_a_different_placement_gives_a_different_layout(config: AllocatorConfig) -> None:
    a, b = CachingAllocator(None, config), CachingAllocator(None, config)
    h = [a.malloc(4 * MiB) for _ in range(2)]
    k = [b.malloc(4 * MiB) for _ in range(2)]
    a.free(h[0])
    b.free(k[1])  # the same bytes, freed at another offset
    assert figures(a) == figures(b)
    assert a.layout() != b.layout()


def test_the_order_of_equal_segments_is_part_of_the_layout() -> None:
    # Two 12 MiB segments, one free: which one is older decides where the next 12 MiB goes.
    a, b = CachingAllocator(None), CachingAllocator(None)
    ha = [a.malloc(12 * MiB) for _ in range(2)]
    hb = [b.malloc(12 * MiB) for _ in range(2)]
    a.free(ha[0])
    b.free(hb[1])
    assert a.layout() != b.layout()


@pytest.mark.parametrize(
    ("config", "fixed_from", "reserved"),
    [(AllocatorConfig(), 2, 102 * MiB), (EXPANDABLE, 1, 80 * MiB)],
    ids=["default", "expandable"],
)
def test_repeated_steps_reach_a_fixed_layout(config: AllocatorConfig, fixed_from: int, reserved: int) -> None:
    # Weights, then training steps: activations, gradients made as activations are freed, and in the
    # first step the optimizer's state, which lands in the blocks the activations freed.
    a = CachingAllocator(None, config)
    weights = [a.malloc(3 * MiB + 512 * i) for i in range(4)]
    layouts = []
    for step in range(5):
        activations = [a.malloc((i + 2) * 5 * MiB // 2) for i in range(4)]
        grads = []
        for i in reversed(range(4)):
            grads.append(a.malloc(a.block_size(weights[i])))
            a.free(activations[i])
        if step == 0:
            _state = [a.malloc(a.block_size(w)) for w in weights for _ in range(2)]
        for g in grads:
            a.free(g)
        layouts.append(a.layout())
    assert layouts[fixed_from - 1] != layouts[fixed_from]
    assert all(later == layouts[fixed_from] for later in layouts[fixed_from:])
    assert a.peak_reserved_bytes == reserved


@pytest.mark.parametrize(
    "config", [AllocatorConfig(), MSS64, EXPANDABLE], ids=["default", "mss", "expandable"]
)
@given(
    steps=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 70 * MiB)), max_size=60),
    cap_mib=st.integers(0, 160),
)
def test_blocks_tile_segments_and_would_fit_predicts_malloc(
    config: AllocatorConfig, steps: list[tuple[int, int]], cap_mib: int
) -> None:
    a = CachingAllocator(cap_mib * MiB, config)
    live: list[int] = []
    for choice, nbytes in steps:
        if choice == 0 and live:
            a.free(live.pop(nbytes % len(live)))
            continue
        before = (a.layout(), figures(a), a.num_ooms)
        fits = a.would_fit(nbytes)
        assert (a.layout(), figures(a), a.num_ooms) == before
        try:
            live.append(a.malloc(nbytes))
        except AllocatorOutOfMemory:
            assert not fits
        else:
            assert fits
        for s in a.layout():
            pieces = sorted(
                [(b.offset, b.size, b.allocated, True) for b in s.blocks]
                + [(o, n, F, F) for o, n in s.unmapped]
            )
            assert [p[0] for p in pieces] == [sum(p[1] for p in pieces[:j]) for j in range(len(pieces))]
            assert sum(p[1] for p in pieces) == s.size and pieces[-1][3]  # ends on a mapped block
            assert not any(not x[2] and not y[2] and x[3] == y[3] for x, y in pairwise(pieces))  # merged
        assert a.reserved_bytes == sum(s.size for s in a.snapshot()) <= cap_mib * MiB
        assert a.allocated_bytes == sum(b.size for s in a.snapshot() for b in s.blocks if b.allocated)


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40 * MiB)), max_size=60))
def test_expandable_segments_allocate_exactly_the_rounded_requests(steps: list[tuple[int, int]]) -> None:
    default, expandable = CachingAllocator(None), CachingAllocator(None, EXPANDABLE)
    live: list[tuple[int, int, int]] = []  # handles in each, and the rounded request
    for choice, nbytes in steps:
        if choice == 0 and live:
            d, e, _ = live.pop(nbytes % len(live))
            default.free(d)
            expandable.free(e)
        else:
            live.append((default.malloc(nbytes), expandable.malloc(nbytes), -(-nbytes // 512) * 512))
        assert default.requested_bytes == expandable.requested_bytes
        assert expandable.allocated_bytes == sum(n for _, _, n in live) <= default.allocated_bytes


def test_replay_takes_a_config() -> None:
    events = [("alloc", i, 7 * MiB) for i in range(5)]
    assert replay(events, cap=50 * MiB).first_oom == 4
    assert replay(events, cap=50 * MiB, config=EXPANDABLE) == ReplayResult(35 * MiB, 40 * MiB, None)
