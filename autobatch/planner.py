"""Split a target batch into gradient-accumulation micro-steps that each fit in memory.

Pure arithmetic: from the largest micro-batch that fits (the probed size), the batch the optimizer should
see and the number of data-parallel ranks, :func:`plan` gives how many micro-steps each rank runs and how
many samples each holds. After an out-of-memory back-off, call :func:`plan` again with the smaller
micro-batch; the effective batch stays the same. A plan costs O(1) memory whatever the target: its
chunks are near-equal, so two sizes and their counts describe them all.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from autobatch.errors import UsageValueError
from autobatch.validate import check_positive_int

if TYPE_CHECKING:
    from autobatch.export import TrainerConfig

__all__ = ["CONFIG_FORMATS", "Chunks", "Plan", "plan", "uniform_plan"]

CONFIG_FORMATS = ("hf", "lightning", "deepspeed", "accelerate")
"""Tools whose batch-size settings :meth:`Plan.to_config` writes."""

_LISTED = 8
"""Plans of at most this many uneven chunks are described chunk by chunk (``11+11+10``)."""


class Chunks(Sequence[int]):
    """The sample counts of a plan's micro-steps: ``extra`` chunks of ``base + 1``, then ``base``s.

    A lazy sequence (O(1) memory), equal to the tuple it stands for.

    Example:
        >>> chunks = Chunks(32, 3)
        >>> chunks, len(chunks), chunks[-1], list(chunks) == [11, 11, 10]
        ((11, 11, 10), 3, 10, True)
    """

    def __init__(self, total: int, count: int) -> None:
        self.n = count
        self.base, self.extra = divmod(total, count)

    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[int, ...]: ...
    def __getitem__(self, index: int | slice) -> int | tuple[int, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(self.n)))
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError("chunk index out of range")
        return self.base + 1 if index < self.extra else self.base

    def __iter__(self) -> Iterator[int]:
        for index in range(self.n):
            yield self.base + 1 if index < self.extra else self.base

    def sizes(self) -> list[tuple[int, int]]:
        """``[(size, count), ...]``, larger first: the chunks in O(1) space."""
        pairs = [(self.base + 1, self.extra), (self.base, self.n - self.extra)]
        return [(size, n) for size, n in pairs if n]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunks):
            return (self.n, self.base, self.extra) == (other.n, other.base, other.extra)
        if isinstance(other, (tuple, list)):
            return len(other) == self.n and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.n, self.base, self.extra))

    def __repr__(self) -> str:
        if self.n > 2 * _LISTED:
            return f"Chunks({self.base * self.n + self.extra}, {self.n})"
        return repr(tuple(self))


@dataclass(frozen=True)
class Plan:
    """How one optimizer step is split into micro-steps on each rank.

    Attributes:
        micro_batch: the largest micro-batch allowed (the probed size).
        accumulation_steps: micro-steps per optimizer step, per rank.
        world_size: number of data-parallel ranks.
        effective_batch: samples per optimizer step over all ranks; equals the target exactly.
        min_chunk: the smallest chunk allowed (2 for BatchNorm models, which cannot train on one sample;
            a lone sample then joins a neighbouring chunk).
    """

    micro_batch: int
    accumulation_steps: int
    world_size: int
    effective_batch: int
    min_chunk: int = 1

    def __post_init__(self) -> None:
        # Plans built by hand (e.g. from ``to_dict`` output) must be the plan ``plan`` would make.
        ints = (
            self.micro_batch,
            self.accumulation_steps,
            self.world_size,
            self.effective_batch,
            self.min_chunk,
        )
        valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in ints)
        if valid:
            per_rank, rest = divmod(self.effective_batch, self.world_size)
            valid = not rest and per_rank >= 1
            valid = valid and self.accumulation_steps == _steps(per_rank, self.micro_batch, self.min_chunk)
        if not valid:
            raise UsageValueError(
                f"Expected a plan whose `accumulation_steps` near-equal micro-steps of at most `micro_batch` "
                f"samples add up to effective_batch // world_size, but got {self!r}. Build plans with "
                "`plan(...)`."
            )

    @property
    def chunks(self) -> Chunks:
        """Sample counts of the micro-steps on one rank, larger first (a lazy sequence)."""
        return Chunks(self.per_rank_batch, self.accumulation_steps)

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
        """A one-line summary: micro-steps × ranks = effective batch.

        Example:
            >>> plan(12, 32).describe(), plan(8, 32, world_size=2).describe()
            ('11+11+10 (micro ≤ 12) × 1 rank = 32', '8 × 2 steps × 2 ranks = 32')
        """
        chunks = self.chunks
        steps = self.accumulation_steps
        sizes = chunks.sizes()
        if len(sizes) == 1:
            split = f"{sizes[0][0]} × {steps} step{'s' if steps != 1 else ''}"
        elif steps <= _LISTED:
            split = "+".join(str(c) for c in chunks)
        else:
            split = " + ".join(f"{size} × {n}" for size, n in sizes) + f" ({steps} steps)"
        if chunks[0] != self.micro_batch:
            split += f" (micro ≤ {self.micro_batch})"
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"{split} × {ranks} = {self.effective_batch}"

    def to_config(self, tool: str) -> TrainerConfig:
        """The plan as another trainer's settings (``"hf"``, ``"lightning"``, ``"deepspeed"``,
        ``"accelerate"``). They take one micro-batch size for every step: uneven chunks are exported as the
        nearest exact equal split, and the settings' notes say what that costs (see :mod:`autobatch.export`;
        :meth:`autobatch.result.ProbeResult.to_config` adds the precision and optimizer measured).

        Raises:
            UsageValueError: ``tool`` is unknown.

        Example:
            >>> plan(12, 32).to_config("deepspeed").settings
            {'train_micro_batch_size_per_gpu': 8, 'gradient_accumulation_steps': 4, 'train_batch_size': 32}
        """
        from autobatch.export import trainer_config

        return trainer_config(
            self.micro_batch, tool, target_batch=self.effective_batch, world_size=self.world_size
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready built-ins; ``chunk_sizes`` lists ``[size, count]`` pairs, larger first.

        Example:
            >>> plan(12, 32).to_dict()["chunk_sizes"]
            [[11, 2], [10, 1]]
        """
        return {
            "micro_batch": self.micro_batch,
            "accumulation_steps": self.accumulation_steps,
            "world_size": self.world_size,
            "effective_batch": self.effective_batch,
            "min_chunk": self.min_chunk,
            "chunk_sizes": [list(pair) for pair in self.chunks.sizes()],
        }


def plan(micro_batch: int, target_batch: int, world_size: int = 1, *, min_chunk: int = 1) -> Plan:
    """Plan the fewest near-equal micro-steps per rank that add up to ``target_batch`` exactly.

    Each rank processes ``target_batch // world_size`` samples in ``ceil(per_rank / micro_batch)``
    micro-steps whose sizes differ by at most one, larger first, and never exceed ``micro_batch`` — unless
    that would leave a chunk below ``min_chunk``: then one micro-step fewer is planned (with
    ``micro_batch == min_chunk == 2``, an odd share gets one chunk of 3).

    Args:
        micro_batch: the largest micro-batch that fits in memory.
        target_batch: samples per optimizer step over all ranks.
        world_size: number of data-parallel ranks; must divide ``target_batch``.
        min_chunk: the smallest chunk allowed (2 for BatchNorm models).

    Raises:
        UsageTypeError: an argument is not an ``int`` (``bool`` included).
        UsageValueError: an argument is below 1, or ``target_batch`` is not divisible by ``world_size``.

    Example:
        >>> plan(12, 32).chunks
        (11, 11, 10)
        >>> p = plan(8, 32)
        >>> p.micro_batch, p.accumulation_steps, p.chunks
        (8, 4, (8, 8, 8, 8))
        >>> plan(6, 32).accumulation_steps  # re-plan after backing off from 8 to 6
        6
        >>> plan(2, 5, min_chunk=2).chunks  # BatchNorm: no chunk of one sample
        (3, 2)
        >>> plan(1, 10**12).describe()
        '1 × 1000000000000 steps × 1 rank = 1000000000000'
    """
    micro_batch = check_positive_int(micro_batch, "micro_batch")
    target_batch = check_positive_int(target_batch, "target_batch")
    world_size = check_positive_int(world_size, "world_size")
    min_chunk = check_positive_int(min_chunk, "min_chunk")
    if target_batch % world_size:
        below = target_batch - target_batch % world_size
        above = below + world_size
        nearest = f"{below} or {above}" if below else f"{above}"
        raise UsageValueError(
            f"target_batch={target_batch} is not divisible by world_size={world_size}; "
            f"nearest valid targets: {nearest}."
        )
    per_rank = target_batch // world_size
    return Plan(micro_batch, _steps(per_rank, micro_batch, min_chunk), world_size, target_batch, min_chunk)


def _steps(per_rank: int, micro_batch: int, min_chunk: int) -> int:
    """The fewest micro-steps of at most ``micro_batch`` samples, none below ``min_chunk`` if possible."""
    steps = -(-per_rank // micro_batch)
    if per_rank // steps < min_chunk <= per_rank:
        steps = max(1, per_rank // min_chunk)
    return steps


def uniform_plan(micro_batch: int, target_batch: int, world_size: int = 1) -> Plan:
    """Plan equal micro-steps: the largest micro-batch ≤ ``micro_batch`` that divides the per-rank batch.

    Trainers that take a single micro-batch size (Hugging Face, Lightning, DeepSpeed) need this form;
    :func:`plan` may instead split 32 into 11+11+10, which takes fewer steps.

    Raises:
        UsageTypeError, UsageValueError: as :func:`plan`.

    Example:
        >>> uniform_plan(12, 32).chunks, uniform_plan(7, 30, world_size=2).chunks
        ((8, 8, 8, 8), (5, 5, 5))
    """
    per_rank = plan(micro_batch, target_batch, world_size).per_rank_batch
    return plan(_largest_divisor(per_rank, micro_batch), target_batch, world_size)


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is ≤ ``at_most``, in O(√n)."""
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for candidate in (d, n // d):
                if best < candidate <= at_most:
                    best = candidate
    return best
