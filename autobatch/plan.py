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

__all__ = ["CONFIG_FORMATS", "Plan", "plan", "uniform_plan"]

CONFIG_FORMATS = ("hf", "lightning", "deepspeed")
"""Tools whose batch-size settings :meth:`Plan.to_config` writes."""


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

    def to_config(self, tool: str) -> dict[str, int]:
        """The plan as the batch-size settings of another trainer.

        Args:
            tool: ``"hf"`` (Hugging Face ``TrainingArguments``), ``"lightning"`` (a ``DataLoader``'s
                ``batch_size`` and ``Trainer(accumulate_grad_batches=...)``) or ``"deepspeed"`` (the
                config's batch keys). These tools take one micro-batch size for every step, so the plan
                must have equal chunks: build it with :func:`uniform_plan`.

        Raises:
            ValueError: ``tool`` is unknown, or the chunks differ in size.

        Example:
            >>> uniform_plan(12, 32).to_config("deepspeed")
            {'train_micro_batch_size_per_gpu': 8, 'gradient_accumulation_steps': 4, 'train_batch_size': 32}
        """
        if tool not in CONFIG_FORMATS:
            raise ValueError(f"Expected `tool` to be one of {', '.join(CONFIG_FORMATS)}, but got {tool!r}.")
        if len(set(self.chunks)) != 1:
            raise ValueError(
                f"{tool} takes one micro-batch size for every step, but this plan's chunks are "
                f"{'+'.join(map(str, self.chunks))}; use uniform_plan({self.micro_batch}, "
                f"{self.effective_batch}, {self.world_size})."
            )
        micro, steps = self.chunks[0], self.accumulation_steps
        if tool == "hf":
            return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": steps}
        if tool == "lightning":
            return {"batch_size": micro, "accumulate_grad_batches": steps}
        return {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": steps,
            "train_batch_size": self.effective_batch,
        }

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


def uniform_plan(micro_batch: int, target_batch: int, world_size: int = 1) -> Plan:
    """Plan equal micro-steps: the largest micro-batch ≤ ``micro_batch`` that divides the per-rank batch.

    Trainers that take a single micro-batch size (Hugging Face, Lightning, DeepSpeed) need this form;
    :func:`plan` may instead split 32 into 11+11+10, which takes fewer steps.

    Raises:
        TypeError, ValueError: as :func:`plan`.

    Example:
        >>> uniform_plan(12, 32).chunks, uniform_plan(7, 30, world_size=2).chunks
        ((8, 8, 8, 8), (5, 5, 5))
    """
    per_rank = plan(micro_batch, target_batch, world_size).per_rank_batch
    micro = max(d for d in range(1, min(micro_batch, per_rank) + 1) if per_rank % d == 0)
    return plan(micro, target_batch, world_size)
