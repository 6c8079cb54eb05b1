"""One optimizer step, all or nothing, on every rank: the probe's trials and the training loop both run it.

:func:`run_step` runs a whole optimizer step in three phases, and every phase that can fail is agreed on
by every rank before any rank acts on it (one small all-gather each; nothing in one process):

1. **Micro-steps.** Read the step's samples, then forward and scaled backward of each micro-batch, their
   gradients kept local (DDP's ``no_sync``). An out-of-memory here drops the step's gradients on every
   rank and puts back the running statistics of its normalisation layers: nothing was applied, and the
   caller redoes the step with smaller micro-batches (the loop) or records that the batch does not fit
   (the probe).
2. **Gradient sum.** The gradients are summed across ranks in place (every micro-loss is already weighted
   by its share of the global step).
3. **Optimizer step.** Unscale, clip, ``optimizer.step``, ``scaler.update``. An out-of-memory here may come
   after some parameters were updated. The step is redone only where that is safe: when no parameter
   and no existing optimizer state changed (:class:`_Guard` reads the tensors' version counters), the
   state it created is removed, cached memory is released and the ranks that failed try the optimizer
   step once more, with the same gradients (so every rank applies the same update). Otherwise the step
   is *partial*, and the outcome says so: the loop stops every rank with
   :class:`~autobatch.errors.OptimizerStepError` rather than apply an update twice.

Any other exception, on any rank, stops every rank (:func:`autobatch.distributed.fail_together`).

A framework whose own loop steps the optimizer (the Hugging Face Trainer clips, steps, schedules and logs
after its ``training_step``) runs phases 1 and 2 with ``run_step(..., defer_update=True)`` and phase 3
later with :func:`run_update`, its own optimizer step in place of autobatch's: measured, agreed and
tried once more where nothing changed, as above.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from autobatch import distributed
from autobatch.memory.device import Measurement
from autobatch.memory.oom import demand_bytes, is_oom, release_memory
from autobatch.step.stepper import Stepper, StepResult

__all__ = ["StepOutcome", "run_step", "run_update"]

OK, OOM, PARTIAL, ERROR = 0, 1, 2, 3
"""Per-rank status of a phase; the worst over the ranks wins."""

Pieces = Callable[[], Sequence[tuple[Any, float]]]
"""Returns the step's micro-batches with their weights: ``[(batch, weight), ...]`` (may be empty)."""


@dataclass(frozen=True)
class StepOutcome:
    """What one optimizer step came to, the same on every rank.

    Attributes:
        fitted: every micro-step and the optimizer step fitted on every rank.
        phase: where it did not: ``"micro-steps"`` or ``"optimizer step"`` (``None`` when it fitted).
        partial: the optimizer step ran out of memory after it had changed parameters or optimizer state
            (on some rank): it can be neither undone nor repeated.
        applied: the update was applied (``False`` when skipped for inf/NaN gradients or a NaN loss).
        nonfinite: the step's loss (or clipped gradient norm) was NaN or infinite, so it was skipped.
        loss: the step's loss over every rank, weighted as its gradient is (NaN when it did not fit).
        backward_peak: the highest device-memory peak of the micro-steps over the ranks, when measured.
        step_peak: the highest peak of the whole step over the ranks, when measured.
        step_reserved: the most memory the allocator held in the step (CUDA, the emulated allocator).
        oom_ranks: the ranks that ran out of memory.
        demand_bytes: where the micro-steps ran out of memory, this rank's lower bound of what they needed
            (what the failed allocation would have brought the memory to; ``None`` when the error does not
            say, or this rank did not fail).
        failed_piece: the index of this rank's micro-batch that ran out of memory (``None`` when this rank
            did not, or it ran out before its first micro-batch: reading the step, placing the residents).
        retried: the optimizer step ran out of memory on some rank without changing anything, and was
            tried once more there after the cached memory was released.
        trace: with ``trace=True``, this rank's allocation timeline of the step (resident sizes, events).
        deferred: the micro-steps fitted on every rank and the gradients are summed, but the optimizer
            step is the caller's (``run_step(..., defer_update=True)``, then :func:`run_update`).
    """

    fitted: bool
    phase: str | None = None
    partial: bool = False
    applied: bool = False
    nonfinite: bool = False
    loss: float = math.nan
    backward_peak: int | None = None
    step_peak: int | None = None
    step_reserved: int | None = None
    oom_ranks: tuple[int, ...] = field(default_factory=tuple)
    demand_bytes: int | None = None
    failed_piece: int | None = None
    retried: bool = False
    trace: Any = None
    deferred: bool = False


def _peak(value: int | None) -> float:
    return -1.0 if value is None else float(value)


def _unpeak(values: list[float]) -> int | None:
    best = max(values, default=-1.0)
    return None if best < 0 else int(best)


def run_step(
    stepper: Stepper,
    pieces: Pieces,
    *,
    group: distributed.Group | None = None,
    ddp: Any = None,
    trace: bool = False,
    defer_update: bool = False,
) -> StepOutcome:
    """Run one optimizer step over the micro-batches ``pieces()`` returns, all or nothing on every rank.

    Args:
        stepper: the step function (model, optimizer, scaler, device memory).
        pieces: reads the step's micro-batches and their weights; an exception it raises (a failing
            dataset, say) is this rank's failure, agreed on like any other.
        group: the data-parallel ranks, or ``None`` in one process.
        ddp: the DDP wrapper whose ``no_sync()`` keeps each micro-step's gradients local.
        trace: record the step's allocations (the probe's memory model is made of them).
        defer_update: stop once the micro-steps fitted and the gradients are summed (the outcome is
            ``deferred``): the caller's framework steps the optimizer, through :func:`run_update`.

    Returns:
        The :class:`StepOutcome`, identical on every rank. After a step that did not fit, its gradients
        are dropped and memory is released.

    Raises:
        Whatever a rank raised that was not an out-of-memory, on that rank; PeerError on the others.
    """
    result: _Done | None = None
    rows: list[list[float]] = []
    with contextlib.ExitStack() as region:
        status, failure, measured, demand, piece = OK, None, Measurement(), None, None
        statistics = stepper.save_statistics()  # a step redone must not update them twice
        try:
            # Collation is host work, as on a GPU: only the copy onto the device (`transfer`, inside each
            # micro-step) is counted, one micro-batch at a time, as the probe's trials count theirs.
            parts = pieces()
            # Entering the region places the resident tensors on the device: they may not fit either.
            measured = region.enter_context(stepper.memory.measure(stepper.state_tensors, trace=trace))
            with distributed.no_sync(ddp):
                for index, (batch, weight) in enumerate(parts):
                    piece = index  # the micro-batch under way, should it run out of memory
                    stepper.forward_backward(batch, weight)
            piece = None
            del parts
            if group is not None:
                stepper.materialise_gradients()  # the sum below then allocates nothing
        except Exception as exc:
            status, failure = (OOM, None) if is_oom(exc) else (ERROR, exc)
            demand = demand_bytes(exc) if status == OOM else None
        loss = stepper.pending_loss() if status == OK else 0.0
        rows = _agree(group, failure, [status, loss, _peak(measured.peak_so_far())], "in its micro-steps")
        oom_ranks = tuple(r for r, row in enumerate(rows) if row[0] == OOM)
        if not oom_ranks:
            loss = math.fsum(row[1] for row in rows)
            backward_peak = _unpeak([row[2] for row in rows])
            if group is not None:
                group.sum_gradients(stepper.trainable)
            if not defer_update:
                result, rows = _optimizer_phase(stepper, None, loss, group, measured.peak_so_far)
    if oom_ranks:
        _drop(stepper)
        stepper.restore_statistics(statistics)
        return StepOutcome(
            fitted=False,
            phase="micro-steps",
            oom_ranks=oom_ranks,
            demand_bytes=demand,
            failed_piece=piece if status == OOM else None,
        )
    if defer_update:
        return StepOutcome(
            fitted=True,
            deferred=True,
            loss=loss,
            backward_peak=backward_peak,
            step_reserved=measured.reserved_bytes,
            trace=measured.trace,
        )
    return _settled(stepper, result, rows, loss, backward_peak, measured)


def run_update(
    stepper: Stepper, update: Callable[[], bool], loss: float, *, group: distributed.Group | None = None
) -> StepOutcome:
    """The optimizer phase of a step whose micro-steps :func:`run_step` ran with ``defer_update=True``.

    ``update()`` is a framework's own optimizer step (the Hugging Face Trainer's, after its loop
    clipped), returning whether it applied the update. It runs in a measured region of its own on the
    stepper's device memory, and every rank agrees on it as in :func:`run_step`: an out-of-memory that
    changed nothing is tried once more, any other makes the step partial.

    Args:
        stepper: the stepper whose micro-steps ran.
        update: the framework's optimizer step.
        loss: the step's loss over every rank (what the deferred outcome said).
        group: the data-parallel ranks, or ``None`` in one process.

    Returns:
        The :class:`StepOutcome` of the whole step, identical on every rank (its ``backward_peak`` is
        the deferred outcome's).
    """
    with stepper.memory.measure(stepper.state_tensors) as measured:
        result, rows = _optimizer_phase(stepper, update, loss, group, measured.peak_so_far)
    return _settled(stepper, result, rows, loss, None, measured)


def _settled(
    stepper: Stepper,
    result: _Done | None,
    rows: list[list[float]],
    loss: float,
    backward_peak: int | None,
    measured: Measurement,
) -> StepOutcome:
    """The outcome of a step whose micro-steps fitted, from its optimizer phase's result and rows."""
    statuses = [int(row[0]) for row in rows]
    if max(statuses) != OK:
        _drop(stepper)
        return StepOutcome(
            fitted=False,
            phase="optimizer step",
            partial=max(statuses) == PARTIAL,
            loss=loss,
            backward_peak=backward_peak,
            oom_ranks=tuple(r for r, s in enumerate(statuses) if s != OK),
        )
    assert result is not None
    return StepOutcome(
        fitted=True,
        applied=result.applied,
        nonfinite=result.nonfinite,
        loss=loss,
        backward_peak=backward_peak,
        step_peak=_unpeak([row[1] for row in rows]),
        step_reserved=measured.reserved_bytes,
        retried=result.retried,
        trace=measured.trace,
    )


def _agree(
    group: distributed.Group | None, failure: BaseException | None, values: list[float], where: str
) -> list[list[float]]:
    """Every rank's ``[status, ...]`` row; raises on every rank when one had an error (status ERROR)."""
    if group is None:
        if failure is not None:
            raise failure
        return [values]
    rows = group.exchange(values)
    distributed.fail_together(group, failure, [r for r, row in enumerate(rows) if row[0] == ERROR], where)
    return rows


def _drop(stepper: Stepper) -> None:
    """After a step that did not fit: drop its gradients and give the memory back (outside ``except``)."""
    stepper.discard_step()
    release_memory(stepper.model, stepper.optimizer)


@dataclass(frozen=True)
class _Done:
    applied: bool
    nonfinite: bool
    retried: bool


def _optimizer_phase(
    stepper: Stepper,
    update: Callable[[], bool] | None,
    loss: float,
    group: distributed.Group | None,
    peak_now: Callable[[], int | None],
) -> tuple[_Done | None, list[list[float]]]:
    """The optimizer step (autobatch's, or a framework's ``update``), tried at most twice; this rank's
    result and every rank's ``[status, peak]``.

    The second try is only for the ranks whose first one ran out of memory without changing anything;
    if some rank is still failing then while others applied the update, the ranks now differ: PARTIAL.
    """
    result: StepResult | None = None
    status, retried = OOM, False  # every rank takes the first attempt
    for attempt in range(2):
        failure = None
        if status == OOM:
            guard = _Guard(stepper)
            try:
                result = stepper.optimizer_step(loss, update)
                status = OK
            except Exception as exc:
                status, failure = (PARTIAL if guard.touched() else OOM, None) if is_oom(exc) else (ERROR, exc)
        rows = _agree(group, failure, [status, _peak(peak_now())], "in an optimizer step")
        statuses = [int(row[0]) for row in rows]
        if max(statuses) != OOM:
            break
        if attempt == 1:
            if min(statuses) == OK:  # some ranks applied the update and the others could not
                rows = [[max(row[0], PARTIAL if row[0] == OOM else OK), row[1]] for row in rows]
            break
        retried = True
        if status == OOM:  # this rank tries again, with the same gradients, after giving the cache back
            guard.rollback()
            release_memory()
    done = None if result is None else _Done(result.applied, result.nonfinite, retried)
    return done, rows


class _Guard:
    """Tells whether a failed ``optimizer.step`` had changed anything, and removes the state it created.

    In-place updates of a tensor bump its version counter. torch's own optimizers update parameters and
    state in place (a fused kernel that does not bump a parameter's counter bumps the ``step`` counters
    first), so unchanged counters mean nothing was applied. An optimizer whose ``step`` is defined outside
    ``torch.optim`` may update ``p.data``, which leaves no trace: any failure of it counts as partial.
    Gradients may change only by a completed unscale or clipping, which a retry does not repeat.
    """

    def __init__(self, stepper: Stepper) -> None:
        self.stepper = stepper
        self.optimizer = stepper.optimizer
        self.exact = getattr(type(self.optimizer).step, "__module__", "").startswith("torch.optim")
        self.params = [(p, p._version) for p in stepper.trainable]
        self.grads = [(p, p.grad._version) for p in stepper.trainable if p.grad is not None]
        self.stages = (stepper.unscaled, stepper.clipped)
        self.state = {p: [(k, _version_of(v)) for k, v in s.items()] for p, s in self.optimizer.state.items()}

    def touched(self) -> bool:
        if not self.exact or any(p._version != v for p, v in self.params):
            return True
        completed = (self.stepper.unscaled, self.stepper.clipped) != self.stages
        if not completed and any(p.grad is None or p.grad._version != v for p, v in self.grads):
            return True  # an unscale or clipping stopped half-way: the gradients are neither one nor other
        for param, state in self.optimizer.state.items():
            before = self.state.get(param)
            if before is None:  # created by the failed step: harmless unless its update began
                step = state.get("step")
                if isinstance(step, torch.Tensor) and float(step) != 0:
                    return True
                continue
            if any(key not in state or _version_of(state[key]) != version for key, version in before):
                return True
        return False

    def rollback(self) -> None:
        """Remove the optimizer state the failed step created (lazily initialised moments, say)."""
        for param in list(self.optimizer.state):
            before = self.state.get(param)
            if before is None:
                del self.optimizer.state[param]
            else:
                keys = {key for key, _ in before}
                for key in [k for k in self.optimizer.state[param] if k not in keys]:
                    del self.optimizer.state[param][key]


def _version_of(value: Any) -> Any:
    """A tensor's version counter; any other value itself (compared by equality)."""
    return value._version if isinstance(value, torch.Tensor) else (type(value), value)
