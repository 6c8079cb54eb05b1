"""One optimizer step over a whole effective batch, backing off on out-of-memory: what fit's loop and
:class:`~autobatch.training.trainstep.TrainStep` both run.

A step's samples are cut into the plan's chunks, each collated on its own and run through
:func:`~autobatch.step.transaction.run_step`, every micro-loss weighted by its share of the step (its
samples, or its items with ``num_items``) so that the accumulated gradient equals the gradient of the whole
batch even for uneven chunks. When a micro-step runs out of memory, the step's gradients are dropped and the
same step is redone from its first sample with a smaller micro-batch: nothing from the partial step is
applied (the normalisation layers' running statistics are put back too), and no sample is lost or seen
twice. The smaller size is measured, not guessed: the largest that the memory model says fits after what
the failed micro-batch was measured to need (:mod:`autobatch.step.backoff`). After ``regrow_after`` clean
steps the micro-batch grows back towards the probed size. Collating and counting a step's samples is host
work, not device memory: a failure there never backs the micro-batch off (:mod:`autobatch.step.reading`).

A framework whose own loop steps the optimizer (the Hugging Face Trainer) runs each step in two calls:
:meth:`StepRunner.optimizer_step` (with ``defer_update``) runs the micro-steps, backing off as above, and
:meth:`StepRunner.update` then runs the framework's optimizer step as the transaction's last phase.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from autobatch import distributed
from autobatch._tree import batch_size_of
from autobatch.errors import (
    NoBatchFitsError,
    NonFiniteLossError,
    OptimizerStepError,
    UsageTypeError,
    UsageValueError,
)
from autobatch.memory.device import DeviceMemory
from autobatch.memory.footprint import model_state
from autobatch.planner import Plan, plan
from autobatch.result import Backoff
from autobatch.step.backoff import largest_fitting, peak_without_limit
from autobatch.step.data import StepData
from autobatch.step.reading import collate_pieces
from autobatch.step.stepper import Stepper
from autobatch.step.transaction import StepOutcome, run_step, run_update
from autobatch.units import format_bytes

__all__ = ["NONFINITE_STREAK", "NumItemsFn", "StepRunner", "chunk_bounds"]

logger = logging.getLogger(__name__)

NumItemsFn = Callable[[Any], int | float | torch.Tensor]

NONFINITE_STREAK = 5
"""Optimizer steps in a row with a NaN or infinite loss after which training stops: it has diverged."""


@functools.lru_cache(maxsize=64)
def chunk_bounds(micro: int, n: int, floor: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of each micro-batch of a step of ``n`` samples (cached: the same every step)."""
    bounds, start = [], 0
    for size in plan(micro, n, min_chunk=floor).chunks:
        bounds.append((start, start + size))
        start += size
    return tuple(bounds)


class StepRunner:
    """Runs accumulated optimizer steps of one stepper, and keeps what they did.

    Args:
        stepper: the step function, bound to model, optimizer, scaler and device memory.
        memory: the device memory training runs on (its limit: back-offs are measured against it).
        micro_batch: the micro-batch to start with (the probed one); never exceeded.
        floor: the smallest micro-batch the model trains on (2 with BatchNorm).
        group: the data-parallel ranks, or ``None``.
        ddp: the DDP wrapper whose ``no_sync()`` keeps micro-steps' gradients local, if any.
        sync_buffers: broadcast rank 0's buffers after each step (what DDP's ``broadcast_buffers`` does).
        num_items: counts what a micro-loss averages over, or ``None`` (samples).
        regrow_after: clean steps after a back-off before the micro-batch grows.
        fixed_bytes: the memory a step needs whatever its batch, from the probe's memory model (``None``:
            the model state is taken instead).
        scheduler: an LR scheduler stepped after each applied step, or ``None``.
        target_batch: the effective batch of a full step, over all ranks (for the plan it logs).
        on_step: called once a step has fitted, before its bookkeeping (fit: training has begun).
        loss_over_step_items: the step function divides each micro-loss by the items of the whole step
            itself (reading :attr:`step_items`, as Hugging Face's ``num_items_in_batch``), so every
            micro-loss weighs 1; ``num_items`` counts them.
        defer_update: :meth:`optimizer_step` stops once the micro-steps fitted; the framework's optimizer
            step follows through :meth:`update`.
    """

    def __init__(
        self,
        stepper: Stepper,
        memory: DeviceMemory,
        micro_batch: int,
        *,
        floor: int = 1,
        group: distributed.Group | None = None,
        ddp: Any = None,
        sync_buffers: bool = False,
        num_items: NumItemsFn | None = None,
        regrow_after: int = 50,
        fixed_bytes: float | None = None,
        scheduler: Any = None,
        target_batch: int | None = None,
        on_step: Callable[[], None] | None = None,
        loss_over_step_items: bool = False,
        defer_update: bool = False,
    ) -> None:
        if loss_over_step_items and num_items is None:
            raise UsageValueError(
                "Expected `num_items` with `loss_over_step_items`: it counts the step's items."
            )
        self.stepper = stepper
        self.memory = memory
        self.group = group
        self.ddp = ddp
        self.sync_buffers = sync_buffers
        self.world_size = group.world_size if group is not None else 1
        self.max_micro = micro_batch
        self.micro = micro_batch
        self.num_items = num_items
        self.regrow_after = regrow_after
        self.floor = floor
        self.fixed_bytes = fixed_bytes
        self.capacity = memory.capacity
        self.scheduler = scheduler
        self.target_batch = target_batch
        self.on_step = on_step
        self.loss_over_step_items = loss_over_step_items
        self.defer_update = defer_update
        self.step_items: float | None = None
        """The items of the step under way over all ranks (with ``num_items``), once its micro-batches are
        prepared."""
        self._pending: tuple[StepOutcome, int] | None = None
        # A failed micro-batch is measured on this rank alone: not where its forward is a collective.
        self._measurable = group is None or not any(
            isinstance(m, torch.nn.SyncBatchNorm) for m in stepper.model.modules()
        )
        self.skipped_steps = 0
        self.nonfinite_steps = 0
        self.steps = 0
        self.samples = 0
        self.backoffs: list[Backoff] = []
        self.regrowths: list[Backoff] = []
        self.epoch = 0  # set by an epoch loop: recorded with back-offs and regrowths
        self.last_micro = micro_batch
        """The micro-batch the last step ran with (:attr:`micro` may have regrown since)."""
        self.clean_steps = 0
        """Steps since the last back-off: at ``regrow_after`` of them the micro-batch doubles (up to its
        largest)."""
        self._nonfinite_run = 0

    def plan(self, target: int | None = None, micro: int | None = None) -> Plan:
        """The plan for a step of ``target`` samples over all ranks (default: the full one) at ``micro``
        (default: the micro-batch in force now)."""
        micro = micro or self.micro
        total = target or self.target_batch or micro * self.world_size
        return plan(micro, total, self.world_size, min_chunk=min(self.floor, total // self.world_size))

    def where(self) -> str:
        """The step under way, for messages: ``epoch 1, step 3`` (and the rank, under a group)."""
        rank = f", rank {self.group.rank}" if self.group is not None else ""
        return f"epoch {self.epoch + 1}, step {self.steps + 1}{rank}"

    # -- one optimizer step ------------------------------------------------------------------------
    def _count(self, part: Any) -> float:
        """``num_items(part)`` as a float: a finite count ≥ 0, or a usage error naming the step."""
        assert self.num_items is not None
        value = self.num_items(part)
        try:
            count = float(value)
        except (TypeError, ValueError, RuntimeError):
            got = (
                f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
            )
            raise UsageTypeError(
                f"Expected `num_items` to return a number (or a one-element tensor) for each micro-batch, "
                f"but it returned {got} ({type(value).__name__}) in {self.where()}."
            ) from None
        if not math.isfinite(count) or count < 0:
            raise UsageValueError(
                f"Expected `num_items` to return a finite count ≥ 0 for each micro-batch, but it returned "
                f"{count} for a micro-batch of {batch_size_of(part)} samples in {self.where()}. Each "
                "micro-loss is weighted by its count over the step's: one NaN or infinite count makes "
                "every weight NaN, and the step would be skipped as if the loss had diverged."
            )
        return count

    def _weights(self, parts: list[Any], samples: int, counts: list[float] | None) -> list[float]:
        """Each micro-loss's share of the whole (global) step: its samples, or its items (``counts``)."""
        if counts is None:
            return [batch_size_of(p) / samples for p in parts]
        items = math.fsum(counts)
        if self.group is not None:  # every rank takes part, also one with nothing to count
            items = self.group.sum([items])[0]
        if items <= 0:
            raise UsageValueError(
                f"Expected `num_items` to count at least one item in a step, but it counted {items} in "
                f"{self.where()}."
            )
        self.step_items = items
        if self.loss_over_step_items:
            return [1.0] * len(counts)
        return [count / items for count in counts]

    def _prepared(
        self, data: StepData | None, micro: int, samples: int, failure: BaseException | None
    ) -> Callable[[], list[tuple[Any, float]]]:
        """The step's micro-batches of ``micro`` with their weights, agreed on by every rank; the returned
        function hands them over once, so that the step holds the only reference to them.

        Collating and counting are host work: a failure there (or ``failure``, from reading the step) is
        no out-of-memory of the step, whatever it is, and is agreed on before the step begins: the rank
        that failed raises it, the others :class:`~autobatch.errors.PeerError`.
        """
        parts: list[Any] = []
        counts: list[float] | None = None
        if failure is None and data is not None and len(data):
            n = len(data)
            try:
                parts = collate_pieces(data, chunk_bounds(micro, n, min(self.floor, n)), self.where())
                if self.num_items is not None:
                    counts = [self._count(part) for part in parts]
            except Exception as exc:
                failure = exc
        where = f"preparing the micro-batches of step {self.steps + 1} (epoch {self.epoch + 1})"
        distributed.agree(self.group, failure, where)
        if self.num_items is not None and counts is None:
            counts = []  # this rank has no share of the step: it counts nothing, but sums with the others
        handed = [list(zip(parts, self._weights(parts, samples, counts), strict=True))]
        del parts
        return handed.pop

    def optimizer_step(
        self, data: StepData | None, samples: int, failure: BaseException | None = None
    ) -> float:
        """One optimizer step over a whole effective batch, backing off on out-of-memory.

        Args:
            data: this rank's share of the step (``None`` when a short last step left it nothing).
            samples: the step's samples over all ranks.
            failure: what reading this rank's share raised, if anything: every rank stops with it.

        Returns:
            The step's loss over every rank (NaN or infinite for a skipped non-finite step).
        """
        if self._pending is not None:
            raise RuntimeError(
                f"The optimizer step of step {self.steps + 1} is still pending: call update() before the "
                "next step's micro-steps."
            )
        # Every rank starts from the same micro-batch, so that all back off alike.
        first = micro = min(self.micro, max(1, -(-samples // self.world_size)))
        while True:
            outcome = run_step(
                self.stepper,
                self._prepared(data, micro, samples, failure),
                group=self.group,
                ddp=self.ddp,
                defer_update=self.defer_update,
            )
            if outcome.fitted:
                break
            if outcome.phase == "optimizer step":
                raise self._optimizer_error(outcome)
            if micro <= self.floor:
                state = model_state(self.stepper.model, self.stepper.optimizer)
                raise NoBatchFitsError(
                    f"The training step ran out of memory even with a micro-batch of {micro} "
                    f"sample{'s' if micro != 1 else ''} (on rank(s) {list(outcome.oom_ranks)}); it holds "
                    f"{state.describe()} of model state before any activation.",
                    memory_limit=self.memory.limit,
                    model_state=state,
                )
            smaller, need = self._smaller(micro, outcome, data)
            self._backed_off(micro, smaller, need, samples)
            micro = smaller
        if micro < first:  # backed off: train on with the micro-batch that fitted
            self.micro = micro
        self.last_micro = micro
        if self.on_step is not None:
            self.on_step()
        if outcome.deferred:
            self._pending = (outcome, samples)
        else:
            self._finish(outcome, samples)
        return outcome.loss

    @property
    def pending(self) -> bool:
        """Whether a step's micro-steps ran and its optimizer step (:meth:`update`) has not."""
        return self._pending is not None

    def update(self, update: Callable[[], bool]) -> StepOutcome:
        """The optimizer step of the step :meth:`optimizer_step` ran with ``defer_update``: ``update()`` is
        the framework's own (it returns whether it applied the update), run as the transaction's last
        phase (:func:`~autobatch.step.transaction.run_update`).

        Raises:
            OptimizerStepError: it ran out of memory after changing parameters, or also when tried again.
        """
        if self._pending is None:
            raise RuntimeError("No step is waiting for its optimizer step: run optimizer_step() first.")
        deferred, samples = self._pending
        self._pending = None
        outcome = run_update(self.stepper, update, deferred.loss, group=self.group)
        if not outcome.fitted:
            raise self._optimizer_error(outcome)
        self._finish(outcome, samples)
        return outcome

    def _smaller(self, micro: int, outcome: StepOutcome, data: StepData | None) -> tuple[int, int | None]:
        """The micro-batch to redo the step with after ``micro`` ran out of memory, agreed on by every rank
        (the smallest), and what this rank's failed micro-batch was measured to need (see
        :mod:`autobatch.step.backoff`)."""
        size, need = micro - 1, None
        if self.group is None or self.group.rank in outcome.oom_ranks:
            bounds = chunk_bounds(micro, len(data), min(self.floor, len(data))) if data else ()
            failed = micro
            if data is not None and outcome.failed_piece is not None and outcome.failed_piece < len(bounds):
                start, stop = bounds[outcome.failed_piece]
                failed = stop - start  # the chunk that failed, which may be below micro
                batch = self._recollated(data, start, stop) if self._measurable else None
                if batch is not None:
                    need = peak_without_limit(self.stepper, batch, self.memory)
                del batch
            need = need if need is not None else outcome.demand_bytes
            state = model_state(self.stepper.model, self.stepper.optimizer)
            if need is not None and state.estimated:  # before the first update: at steady state Adam's
                need += state.optimizer  # moments take their memory too
            fixed = self.fixed_bytes if self.fixed_bytes is not None else state.total
            measured = largest_fitting(failed, need, self.capacity, fixed)
            size = micro // 2 if measured is None else min(measured, failed - 1)
        if self.group is not None:
            size = int(self.group.min([size])[0])
        return max(self.floor, min(size, micro - 1)), need

    def _recollated(self, data: StepData, start: int, stop: int) -> Any | None:
        """The micro-batch that ran out of memory, collated again to measure it; ``None`` when that fails:
        the back-off then goes by the error's own figures, or halves, and the redone step collates the same
        samples again (a failure that lasts stops every rank there)."""
        failure = None
        try:
            return collate_pieces(data, [(start, stop)], self.where())[0]
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "could not collate the micro-batch that ran out of memory again to measure it (%s)", failure
        )
        return None

    def _finish(self, outcome: StepOutcome, samples: int) -> None:
        self.steps += 1
        self.samples += samples
        if self.sync_buffers and self.group is not None:
            self.group.broadcast_buffers(self.stepper.model)
        if outcome.applied:
            self._nonfinite_run = 0
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped_steps += 1
        if outcome.nonfinite:
            self.nonfinite_steps += 1
            self._nonfinite_run += 1
            logger.warning(
                "step %d: the loss is %s; the step is skipped (not applied)", self.steps, outcome.loss
            )
            if self._nonfinite_run >= NONFINITE_STREAK:
                first = self.steps - self._nonfinite_run + 1
                raise NonFiniteLossError(
                    f"Training diverged: the loss was NaN or infinite in {self._nonfinite_run} optimizer "
                    f"steps in a row (steps {first}-{self.steps}), and none of them was applied. Lower the "
                    "learning rate, pass grad_clip=1.0, or check the data and the loss for NaN/inf.",
                    first_step=first,
                    steps=self._nonfinite_run,
                )
        self.clean_steps += 1
        if self.micro < self.max_micro and self.clean_steps >= self.regrow_after:
            grown = min(self.max_micro, 2 * self.micro)
            self.regrowths.append(Backoff(self.epoch, self.steps, self.micro, grown))
            logger.info("micro-batch %d → %d after %d clean steps", self.micro, grown, self.clean_steps)
            self.micro, self.clean_steps = grown, 0

    def _optimizer_error(self, outcome: StepOutcome) -> OptimizerStepError:
        step, ranks = self.steps + 1, list(outcome.oom_ranks)
        where = f" on rank(s) {ranks}" if self.group is not None else ""
        if outcome.partial:
            return OptimizerStepError(
                f"Out of memory inside optimizer.step() of step {step}{where}, after it had begun to update "
                "the parameters or the optimizer state. That update can be neither undone nor repeated "
                "without applying part of it twice, so training stops here: the model holds a partly "
                "updated step. Restart from your last checkpoint with headroom for the optimizer step "
                "(margin=0.1, or a smaller micro_batch), or an optimizer with less state.",
                partial=True,
                step=step,
            )
        return OptimizerStepError(
            f"Out of memory inside optimizer.step() of step {step}{where}, also when tried again after the "
            "cached memory was released; nothing of the step was applied. The optimizer step alone (weights, "
            "gradients and optimizer state, no activations) does not fit: give it more memory, or use an "
            "optimizer with less state (SGD instead of Adam, or foreach=False).",
            partial=False,
            step=step,
        )

    def _plan_text(self, micro: int, samples: int) -> str:
        """The plan a step of ``samples`` is redone with at ``micro`` (the full step's, where this one's
        samples do not split evenly over the ranks: a short last step)."""
        total = samples if samples % self.world_size == 0 else self.target_batch
        if not total or total % self.world_size:
            return f"{micro} per micro-step"
        return self.plan(total, micro).describe()

    def _backed_off(self, old: int, new: int, demand: int | None, samples: int) -> None:
        self.backoffs.append(Backoff(self.epoch, self.steps, old, new))
        self.clean_steps = 0
        needed = (
            f" (it needs {format_bytes(demand)} of {format_bytes(self.capacity)})"
            if demand is not None and self.capacity is not None
            else ""
        )
        logger.warning(
            "out of memory at micro-batch %d%s (epoch %d, step %d): redoing the step with %d; plan %s",
            old,
            needed,
            self.epoch + 1,
            self.steps + 1,
            new,
            self._plan_text(new, samples),
        )
