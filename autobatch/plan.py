"""Split a target batch into gradient-accumulation micro-steps that each fit in memory.

The plan is pure arithmetic: given the largest micro-batch that fits (the probed size), the batch
the optimizer should see, and the number of data-parallel ranks, it returns how many micro-steps
each rank runs and how many samples each one holds. After an OOM back-off, call :func:`plan` again
with the smaller micro-batch; the effective batch stays the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from autobatch.validate import check_positive_int

__all__ = ["Plan", "plan"]


@dataclass(frozen=True)
class Plan:
    """How one optimizer step is split into micro-steps on each rank.

    Attributes:
        micro_batch: the largest micro-batch allowed (the probed size).
        accumulation_steps: micro-steps per optimizer step, per rank.
        world_size: number of data-parallel ranks.
        effective_batch: samples per optimizer step over all ranks; equals the target exactly.
        chunks: sample counts of the micro-steps on one rank, largest first.
    """

    micro_batch: int
    accumulation_steps: int
    world_size: int
    effective_batch: int
    chunks: tuple[int, ...]

    def __post_init__(self) -> None:
        # Plans built by hand (e.g. from ``to_dict`` output) must keep the invariants of ``plan``.
        consistent = (
            len(self.chunks) == self.accumulation_steps >= 1
            and all(1 <= c <= self.micro_batch for c in self.chunks)
            and sum(self.chunks) * self.world_size == self.effective_batch
        )
        if not consistent:
            raise ValueError(
                f"Expected `chunks` to hold `accumulation_steps` sizes in [1, micro_batch] "
                f"summing to effective_batch // world_size, but got {self!r}. "
                "Build plans with `plan(...)`."
            )

    @property
    def per_rank_batch(self) -> int:
        """Samples each rank processes per optimizer step."""
        return self.effective_batch // self.world_size

    def weights(self) -> tuple[float, ...]:
        """Factors for each micro-step's mean loss, so accumulated gradients equal the batch's.

        Returns:
            ``chunk / per_rank_batch`` for each chunk; they sum to 1.
        """
        return tuple(c / self.per_rank_batch for c in self.chunks)

    def describe(self) -> str:
        """A one-line human-readable summary: micro-steps × ranks = effective batch.

        Example:
            >>> plan(12, 32).describe()
            '11+11+10 (micro ≤ 12) × 1 rank = 32'
            >>> plan(8, 64, world_size=2).describe()
            '8 × 4 steps × 2 ranks = 64'
        """
        first, steps = self.chunks[0], self.accumulation_steps
        if all(c == first for c in self.chunks):
            split = f"{first} × {steps} step{'s' if steps != 1 else ''}"
        else:
            split = "+".join(str(c) for c in self.chunks)
        if first != self.micro_batch:
            split += f" (micro ≤ {self.micro_batch})"
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"{split} × {ranks} = {self.effective_batch}"

    def to_dict(self) -> dict[str, Any]:
        """The plan's fields as JSON-ready built-ins (``chunks`` becomes a list)."""
        data = asdict(self)
        data["chunks"] = list(self.chunks)
        return data


def plan(micro_batch: int, target_batch: int, world_size: int = 1) -> Plan:
    """Plan the fewest near-equal micro-steps per rank that add up to ``target_batch`` exactly.

    Each rank processes ``target_batch // world_size`` samples in ``ceil(per_rank / micro_batch)``
    micro-steps whose sizes differ by at most one, larger first, and never exceed ``micro_batch``.

    Args:
        micro_batch: the largest micro-batch that fits in memory.
        target_batch: samples per optimizer step over all ranks.
        world_size: number of data-parallel ranks; must divide ``target_batch``.

    Returns:
        The :class:`Plan`.

    Raises:
        TypeError: an argument is not an ``int`` (``bool`` included).
        ValueError: an argument is below 1, or ``target_batch`` is not divisible by ``world_size``.

    Example:
        >>> plan(12, 32).chunks
        (11, 11, 10)
        >>> p = plan(8, 32)
        >>> p.micro_batch, p.accumulation_steps, p.chunks
        (8, 4, (8, 8, 8, 8))
        >>> plan(6, 32).accumulation_steps  # re-plan after backing off from 8 to 6
        6
    """
    micro_batch = check_positive_int(micro_batch, "micro_batch")
    target_batch = check_positive_int(target_batch, "target_batch")
    world_size = check_positive_int(world_size, "world_size")
    if target_batch % world_size:
        below = target_batch - target_batch % world_size
        above = below + world_size
        nearest = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"target_batch={target_batch} is not divisible by world_size={world_size}; "
            f"nearest valid targets: {nearest}."
        )
    per_rank = target_batch // world_size
    steps = -(-per_rank // micro_batch)
    base, extra = divmod(per_rank, steps)
    chunks = (base + 1,) * extra + (base,) * (steps - extra)
    return Plan(
        micro_batch=micro_batch,
        accumulation_steps=steps,
        world_size=world_size,
        effective_batch=target_batch,
        chunks=chunks,
    )
