"""Tests for autobatch.planner: concrete splits, invariants over random inputs, and bad arguments."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autobatch.planner import Plan, plan, uniform_plan

# --- concrete examples --------------------------------------------------------------------------


def test_uneven_split_is_near_equal_larger_first() -> None:
    p = plan(12, 32)
    assert p.chunks == (11, 11, 10)
    assert p.accumulation_steps == 3
    assert p.micro_batch == 12
    assert p.effective_batch == 32
    assert p.per_rank_batch == 32
    assert p.describe() == "11+11+10 (micro ≤ 12) × 1 rank = 32"


def test_even_split() -> None:
    p = plan(8, 32)
    assert p.chunks == (8, 8, 8, 8)
    assert p.accumulation_steps == 4
    assert p.weights() == (0.25, 0.25, 0.25, 0.25)
    assert p.describe() == "8 × 4 steps × 1 rank = 32"


@pytest.mark.parametrize("micro", [32, 33, 1000])
def test_micro_at_least_target_gives_one_chunk(micro: int) -> None:
    p = plan(micro, 32)
    assert p.chunks == (32,)
    assert p.accumulation_steps == 1
    assert p.weights() == (1.0,)


def test_micro_above_target_describes_cap() -> None:
    assert plan(64, 20).describe() == "20 × 1 step (micro ≤ 64) × 1 rank = 20"


def test_world_size_two() -> None:
    p = plan(12, 64, world_size=2)
    assert p.per_rank_batch == 32
    assert p.chunks == (11, 11, 10)
    assert p.effective_batch == 64
    assert p.describe() == "11+11+10 (micro ≤ 12) × 2 ranks = 64"


def test_world_size_four() -> None:
    p = plan(8, 128, world_size=4)
    assert p.per_rank_batch == 32
    assert p.chunks == (8, 8, 8, 8)
    assert p.world_size == 4
    assert p.describe() == "8 × 4 steps × 4 ranks = 128"


def test_world_size_larger_micro_than_per_rank() -> None:
    p = plan(100, 8, world_size=4)
    assert p.chunks == (2,)
    assert p.accumulation_steps == 1


def test_replan_after_oom_backoff_keeps_effective_batch() -> None:
    before = plan(16, 96, world_size=2)
    after = plan(before.micro_batch // 2, before.effective_batch, before.world_size)
    assert before.chunks == (16, 16, 16)
    assert after.chunks == (8, 8, 8, 8, 8, 8)
    assert after.effective_batch == before.effective_batch
    assert after.world_size == before.world_size


def test_micro_batch_one() -> None:
    p = plan(1, 5)
    assert p.chunks == (1, 1, 1, 1, 1)


# --- properties ---------------------------------------------------------------------------------

micros = st.integers(min_value=1, max_value=4096)
per_ranks = st.integers(min_value=1, max_value=100_000)
worlds = st.integers(min_value=1, max_value=64)


@given(micro=micros, per_rank=per_ranks, world=worlds)
def test_plan_invariants(micro: int, per_rank: int, world: int) -> None:
    target = per_rank * world
    p = plan(micro, target, world)
    assert p.effective_batch == target
    assert p.per_rank_batch == per_rank
    assert sum(p.chunks) == per_rank
    assert all(1 <= c <= micro for c in p.chunks)
    assert max(p.chunks) - min(p.chunks) <= 1
    assert list(p.chunks) == sorted(p.chunks, reverse=True)
    assert p.accumulation_steps == len(p.chunks) == math.ceil(per_rank / micro)
    assert math.isclose(math.fsum(p.weights()), 1.0, rel_tol=0, abs_tol=1e-12)
    assert all(w == c / per_rank for w, c in zip(p.weights(), p.chunks, strict=True))


@given(micro=micros, per_rank=per_ranks, world=worlds)
def test_to_dict_round_trips(micro: int, per_rank: int, world: int) -> None:
    p = plan(micro, per_rank * world, world)
    data = p.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Plan(**{k: v for k, v in data.items() if k != "chunk_sizes"}) == p
    assert data == {
        "micro_batch": p.micro_batch,
        "accumulation_steps": p.accumulation_steps,
        "world_size": p.world_size,
        "effective_batch": p.effective_batch,
        "min_chunk": 1,
        "chunk_sizes": [[size, n] for size, n in p.chunks.sizes()],
    }
    assert [size for size, n in data["chunk_sizes"] for _ in range(n)] == list(p.chunks)


@given(micro=micros, per_rank=per_ranks, world=worlds)
def test_describe_ends_with_effective_batch(micro: int, per_rank: int, world: int) -> None:
    p = plan(micro, per_rank * world, world)
    assert p.describe().endswith(f"× {world} rank{'s' if world > 1 else ''} = {per_rank * world}")


# --- bad inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["micro_batch", "target_batch", "world_size"])
@pytest.mark.parametrize("bad", [1.0, "8", None, True, False])
def test_non_int_raises_type_error(name: str, bad: object) -> None:
    kwargs: dict[str, object] = {"micro_batch": 8, "target_batch": 32, "world_size": 1, name: bad}
    with pytest.raises(TypeError, match=rf"Expected `{name}` to be a positive int, but got"):
        plan(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["micro_batch", "target_batch", "world_size"])
@pytest.mark.parametrize("bad", [0, -1, -32])
def test_non_positive_raises_value_error(name: str, bad: int) -> None:
    kwargs = {"micro_batch": 8, "target_batch": 32, "world_size": 1, name: bad}
    with pytest.raises(ValueError, match=rf"Expected `{name}` to be a positive int, but got {bad}\."):
        plan(**kwargs)


def test_target_zero_message() -> None:
    with pytest.raises(ValueError, match=r"^Expected `target_batch` to be a positive int, but got 0\.$"):
        plan(8, 0)


def test_indivisible_target_names_nearest_valid_targets() -> None:
    with pytest.raises(
        ValueError,
        match=r"^target_batch=30 is not divisible by world_size=4; "
        r"nearest valid targets: 28 or 32\.$",
    ):
        plan(8, 30, world_size=4)


def test_target_below_world_size_names_only_valid_target_above() -> None:
    with pytest.raises(
        ValueError,
        match=r"^target_batch=3 is not divisible by world_size=4; nearest valid targets: 4\.$",
    ):
        plan(8, 3, world_size=4)


@pytest.mark.parametrize(
    "fields",
    [
        {"micro_batch": 8, "accumulation_steps": 2, "world_size": 1, "effective_batch": 32},  # 4 steps
        {"micro_batch": 8, "accumulation_steps": 1, "world_size": 1, "effective_batch": 16},  # chunk 16 > 8
        {"micro_batch": 8, "accumulation_steps": 3, "world_size": 1, "effective_batch": 16},  # not the fewest
        {"micro_batch": 8, "accumulation_steps": 0, "world_size": 1, "effective_batch": 0},
        {"micro_batch": 8, "accumulation_steps": 1, "world_size": 3, "effective_batch": 8},  # indivisible
        {"micro_batch": 8, "accumulation_steps": 1, "world_size": 1, "effective_batch": 8, "min_chunk": 0},
        {"micro_batch": 8.0, "accumulation_steps": 1, "world_size": 1, "effective_batch": 8},
    ],
)
def test_inconsistent_plan_is_rejected(fields: dict[str, object]) -> None:
    with pytest.raises(
        ValueError, match=r"Expected a plan whose `accumulation_steps` near-equal micro-steps"
    ):
        Plan(**fields)  # type: ignore[arg-type]


# --- huge targets and BatchNorm -------------------------------------------------------------------


def test_a_huge_target_costs_constant_memory_and_time() -> None:
    p = plan(1, 10**12)
    assert p.accumulation_steps == 10**12 and len(p.chunks) == 10**12
    assert p.chunks[0] == p.chunks[-1] == 1 and p.chunks.sizes() == [(1, 10**12)]
    assert p.describe() == "1 × 1000000000000 steps × 1 rank = 1000000000000"
    assert p.to_dict()["chunk_sizes"] == [[1, 10**12]]
    assert uniform_plan(10**9, 10**10).chunks.sizes() == [(10**9, 10)]


def test_many_uneven_chunks_are_described_by_their_sizes() -> None:
    assert plan(7, 100).describe() == "7 × 10 + 6 × 5 (15 steps) × 1 rank = 100"


@pytest.mark.parametrize(
    ("micro", "target", "chunks"),
    [
        (2, 3, (3,)),
        (2, 5, (3, 2)),
        (2, 33, (3,) + (2,) * 15),
        (3, 7, (3, 2, 2)),
        (4, 9, (3, 3, 3)),
        (2, 1, (1,)),
    ],
)
def test_min_chunk_never_leaves_a_chunk_of_one(micro: int, target: int, chunks: tuple[int, ...]) -> None:
    p = plan(micro, target, min_chunk=2)
    assert p.chunks == chunks
    assert all(c >= 2 for c in p.chunks) or target < 2


@given(micro=st.integers(2, 64), per_rank=st.integers(2, 5000))
def test_min_chunk_two_keeps_every_chunk_at_two_and_at_most_one_over_micro(micro: int, per_rank: int) -> None:
    chunks = list(plan(micro, per_rank, min_chunk=2).chunks)
    assert sum(chunks) == per_rank and min(chunks) >= 2
    assert max(chunks) <= max(micro, 3) and max(chunks) - min(chunks) <= 1


def test_chunks_is_a_sequence_equal_to_its_tuple() -> None:
    chunks = plan(12, 32).chunks
    assert chunks == (11, 11, 10) and chunks == [11, 11, 10] and chunks != (11, 11, 9)
    assert chunks[1:] == (11, 10) and list(reversed(chunks)) == [10, 11, 11]
    assert hash(chunks) == hash(plan(12, 32).chunks)
    with pytest.raises(IndexError):
        chunks[3]


# --- dataclass behaviour and docs ---------------------------------------------------------------


def test_plan_is_frozen() -> None:
    p = plan(12, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.micro_batch = 4  # type: ignore[misc]
    with pytest.raises(AttributeError):
        p.chunks = (32,)  # type: ignore[misc]


def test_plan_is_hashable_and_compares_by_value() -> None:
    assert plan(12, 32) == plan(12, 32)
    assert hash(plan(12, 32)) == hash(plan(12, 32))
    assert plan(12, 32) != plan(8, 32)
