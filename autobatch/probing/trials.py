"""The probe's trials: real training steps, each run in a chosen state of the device's allocator.

Every trial is one optimizer step of :func:`~autobatch.step.transaction.run_step` (the step training runs) on
the worst-case batch of a size (or on the chunks a plan cuts that size into). What differs is where it
starts, and what it is for:

* :meth:`Trials.cold` — a **traced** step from a cold start (weights only, packed; the optimizer's state is
  cleared first, and the step makes it again);
* :meth:`Trials.warm` — a **traced** step from steady state (weights and optimizer state, packed);
* :meth:`Trials.verdict` — the step of a training run that :func:`~autobatch.memory.survival.survive` says has
  the least room at this batch (or runs out of memory first), run for real where the replay of the steps
  before it leaves the allocator: one step tells whether the batch survives training;
* :meth:`Trials.exact` — the same without a model fitted on other batches: a cold and a steady step traced
  at this batch give its exact timeline, and the verdict follows from it. What ``try_batch`` runs.

On CUDA the real allocator cannot be set to a replayed state: the steps before a verdict run for real.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autobatch.memory.survival import COLD, STEADY, StepModel, Survival, fit_step_model, prefix, survive
from autobatch.memory.timeline import Timeline
from autobatch.probing.search import OutOfMemory, Peaks
from autobatch.step.transaction import run_step

__all__ = ["Trials", "Verdict"]

logger = logging.getLogger("autobatch.probe")


@dataclass(frozen=True)
class Verdict:
    """Whether training at a batch survives, the replay it rests on and the real step that confirmed it."""

    fitted: bool
    peaks: Peaks
    survival: Survival | None


class Trials:
    """Runs the probe's steps for one :class:`~autobatch.probing.prober.Prober` (its stepper, memory and
    data).

    Args:
        prober: the probe (its session, stepper, guarded memory and capacity).
        chunks: the micro-batches a plan cuts a batch of ``b`` into (``None``: two micro-steps of ``b`` when
            the probe accumulates, else one).
    """

    def __init__(self, prober: Any, chunks: Any = None) -> None:
        self.prober = prober
        self.stepper = prober.stepper
        self.memory = prober.memory
        self.chunks = chunks
        self.cold_traces: dict[str, dict[int, Timeline]] = {"longest": {}, "mixed": {}}
        self.warm_traces: dict[str, dict[int, Timeline]] = {"longest": {}, "mixed": {}}
        # What the traced steps measured: a verdict whose decisive step is one of them need not run it again.
        self._ran: dict[tuple[str, str, int], Peaks] = {}
        self._model_key: Any = None
        self._started = False  # a step made the optimizer's state since it was last cleared
        self._model: StepModel | None = None
        self.steps = 0
        self.samples = 0

    # -- agreement across ranks ------------------------------------------------------------------------
    def _all(self, flag: bool) -> bool:
        """``flag`` where every rank has it: ranks that branch alike run the same steps (a step is a
        collective), whatever each one's traces say."""
        group = self.prober.session.group
        return flag if group is None else bool(group.min([1.0 if flag else 0.0])[0])

    def _decisive(self, survival: Survival) -> tuple[str, int, bool] | None:
        """The step that decides a verdict, the same on every rank: the replay's where they agree, else
        the latest of theirs from a cold start, run for real. ``None`` where nothing fits at all."""
        step = survival.failure or survival.binding
        mine = (COLD, 0, False) if step is None else (step.start, step.step, step.fitted)
        group = self.prober.session.group
        if group is None:
            return None if step is None else mine
        rows = group.exchange([float(mine[0] == COLD), float(mine[1]), float(mine[2])])
        if any(row[1] == 0 for row in rows):
            return None
        if all(row == rows[0] for row in rows):
            return mine
        return COLD, -int(max(row[1] for row in rows)), all(row[2] for row in rows)  # negative: for real

    # -- one step --------------------------------------------------------------------------------------
    def _sizes(self, batch: int, planned: bool = True) -> list[int]:
        """The micro-batches of a step at ``batch``: the plan's (``planned``, where there is one), or the
        traced structure the model is made of: two micro-steps of ``batch`` (one without accumulation)."""
        if planned and self.chunks is not None:
            return list(self.chunks(batch))
        return [batch, batch] if self.prober.session.options.probe.accumulate else [batch]

    def _step(
        self, batch: int, case: str, *, trace: bool, planned: bool = True
    ) -> tuple[Peaks, Timeline | None]:
        """One optimizer step of ``batch``'s worst case; raises :class:`OutOfMemory` when it does not fit."""
        session = self.prober.session
        source, size_fn = session.source, session.options.probe.size_fn
        sizes = self._sizes(batch, planned)
        make = source.mixed_case if case == "mixed" else source.worst_case
        batches = {size: make(size, size_fn) for size in set(sizes)}
        total = sum(sizes)
        outcome = run_step(
            self.stepper,
            lambda: [(batches[size], size / total) for size in sizes],
            group=session.group,
            trace=trace,
        )
        self.steps += 1
        self.samples += total
        if not outcome.fitted:
            raise OutOfMemory
        self._started = True  # the optimizer's state exists (if it keeps any)
        timeline = Timeline(batch, *outcome.trace) if trace and outcome.trace is not None else None
        return Peaks(outcome.step_peak, outcome.backward_peak, outcome.step_reserved), timeline

    def _clear_state(self) -> None:
        """Forget the optimizer's state (inside the probe's snapshot): the next step starts cold."""
        self.stepper.discard_step()
        self.stepper.optimizer.state.clear()
        self.memory.empty_cache()
        self._started = False

    # -- traced steps ----------------------------------------------------------------------------------
    def cold(
        self, batch: int, case: str = "longest", *, planned: bool = False
    ) -> tuple[Peaks, Timeline | None]:
        """A traced first step from a cold start (the traced micro-steps, or the plan's); raises
        OutOfMemory."""
        # An emulated device counts only what it is given: the state can wait aside, and come back
        # should the step not fit (a later steady step then needs no cold one to make it again).
        kept = dict(self.stepper.optimizer.state) if self.memory.emulated else {}
        self._clear_state()
        try:
            with self.memory.carried(self.stepper.weight_tensors()):
                peaks, timeline = self._step(batch, case, trace=True, planned=planned)
        except OutOfMemory:
            self.stepper.optimizer.state.update(kept)
            self._started = bool(kept)
            raise
        if not planned or self._sizes(batch) == self._sizes(batch, planned=False):
            if timeline is not None:
                self.cold_traces[case][batch] = timeline
            self._ran[(case, COLD, batch)] = peaks
        return peaks, timeline

    def trace_cold(self, batch: int, case: str = "longest") -> Peaks:
        """A traced first step from a cold start, of the traced micro-steps; raises OutOfMemory."""
        return self.cold(batch, case)[0]

    def warm(self, batch: int, case: str = "longest") -> Peaks:
        """A traced step from steady state (a cold step first, where there is no optimizer state yet)."""
        if not self._all(self._started):
            self.cold(batch, case)
        with self.memory.carried(self.stepper.state_tensors()):
            peaks, timeline = self._step(batch, case, trace=True, planned=False)
        if timeline is not None:
            self.warm_traces[case][batch] = timeline
        if self._sizes(batch) == self._sizes(batch, planned=False):  # else a plan's step is another one
            self._ran[(case, STEADY, batch)] = peaks
        return peaks

    # -- models and verdicts ---------------------------------------------------------------------------
    def model(self, case: str = "longest") -> StepModel | None:
        """The training step's model from the traces so far (the cold step's optimizer phase is shared by
        the cases: it does not depend on the batch); the same object until a trace is added."""
        key = (
            case,
            tuple(self.cold_traces["longest"]),
            tuple(self.cold_traces[case]),
            tuple(self.warm_traces[case]),
        )
        if self._model_key != key:
            self._model_key, self._model = key, self._fit(case)
        return self._model

    def _fit(self, case: str) -> StepModel | None:
        warm = list(self.warm_traces[case].values())
        own = self.cold_traces[case]
        if own:
            others = [trace for batch, trace in own.items() if batch != max(own)]
            return fit_step_model(own[max(own)], warm, more=others)
        longest = self.cold_traces["longest"]
        if not longest or not warm:
            return None
        return fit_step_model(longest[max(longest)], warm, cold_micro=False)

    def survival(self, model: StepModel, batch: int) -> Survival:
        """The replay of training at ``batch`` under the probe's capacity."""
        return survive(
            model,
            batch,
            self.prober.capacity,
            allocator=self.memory.counts_reserved,
            chunks=self._sizes(batch) if self.chunks is not None else None,
            config=self.memory.alloc_config,
        )

    def verdict(self, batch: int, case: str, model: StepModel) -> Verdict:
        """Whether training at ``batch`` survives: the replay's decisive step, run for real.

        The real step is traced where it fits; where it disagrees with the model (its allocations, or
        its outcome), the batch is settled from its own trace instead (:meth:`at`). Raises OutOfMemory
        when it does not survive.
        """
        survival = self.survival(model, batch)
        decisive = self._decisive(survival)
        if decisive is None:  # the resident tensors alone do not fit
            raise OutOfMemory
        start, step, expected = decisive
        try:
            peaks, timeline = self._run_at(batch, case, model, start, step)
        except OutOfMemory:
            if expected:  # a surprise: the model said it fits
                return self._settled(batch, case, model)
            raise
        exact = timeline is None or self._agrees(model, timeline, batch)
        if not self._all(expected and exact):
            return self._settled(batch, case, model)
        return Verdict(True, peaks, survival)

    def _settled(self, batch: int, case: str, model: StepModel) -> Verdict:
        """A verdict from this batch's own steps, from a cold start: where the model of other batches is
        not exact here (control flow that depends on the batch), neither is the optimizer state they made."""
        logger.debug(
            "probe: the model of %s batches is not exact at %d; settling it from its own steps", case, batch
        )
        return self.exact(batch, case)

    def _agrees(self, model: StepModel, timeline: Timeline, batch: int) -> bool:
        """Whether a real step's micro-steps allocated what the model says they do at ``batch``."""
        chunks = self._sizes(batch) if self.chunks is not None else None
        expected = model.step_events(batch, cold=False, chunks=chunks)
        expected = expected[: expected.index(("mark", "optimizer"))]
        cut = next((i for i, e in enumerate(timeline.events) if e == ("mark", "optimizer")), None)
        return cut is not None and _normalized(timeline.events[:cut]) == _normalized(expected)

    def at(self, batch: int, case: str = "longest") -> Verdict:
        """Whether training at ``batch`` survives, from a traced steady step at this batch (the optimizer
        step of a cold start, which does not depend on the batch, from the cold trace at hand)."""
        longest = self.cold_traces["longest"]
        if not longest:
            return self.exact(batch, case)
        self._ran.pop((case, STEADY, batch), None)
        self.warm_traces[case].pop(batch, None)
        self.warm(batch, case)
        traced = self.warm_traces[case].get(batch)
        model = None if traced is None else fit_step_model(longest[max(longest)], [traced], cold_micro=False)
        if not self._all(model is not None):
            return self.exact(batch, case)
        assert model is not None
        survival = self.survival(model, batch)
        decisive = self._decisive(survival)
        if decisive is None:
            raise OutOfMemory
        peaks, _ = self._run_at(batch, case, model, decisive[0], decisive[1])
        return Verdict(True, peaks, survival)

    def exact(self, batch: int, case: str = "longest") -> Verdict:
        """Whether training at ``batch`` survives, from this batch's own traces (see the module's docs)."""
        self._ran = {k: v for k, v in self._ran.items() if k[2] != batch}  # the steps below are not those
        self._clear_state()
        with self.memory.carried(self.stepper.weight_tensors()):
            first, cold = self._step(batch, case, trace=True)  # a cold start's first and second steps
            second, warm = self._step(batch, case, trace=True)
        model = None
        if cold is not None and warm is not None:  # traced (a limit to enforce, or an observer)
            self.cold_traces[case][batch], self.warm_traces[case][batch] = cold, warm
            model = fit_step_model(cold, [warm])
        if not self._all(model is not None):
            return Verdict(True, _highest(first, second), None)
        assert model is not None
        survival = self.survival(model, batch)
        decisive = self._decisive(survival)
        if decisive is None:
            raise OutOfMemory
        start, step, expected = decisive
        if start == COLD and 0 < step <= 2:  # ran already
            if not expected:
                logger.debug("probe: the replay of batch %d disagrees with its run", batch)
            return Verdict(True, _highest(first, second), survival)
        return Verdict(True, self._run_at(batch, case, model, start, step)[0], survival)

    def _run_at(
        self, batch: int, case: str, model: StepModel, start: str, step: int
    ) -> tuple[Peaks, Timeline | None]:
        """Run step ``step`` of a training run from ``start`` at ``batch`` for real, where the replay of the
        steps before it leaves the allocator (the steps before run for real where that cannot be set up);
        its peaks, and its trace where it was taken."""
        if step < 0:  # the ranks disagreed on the decisive step: every rank runs that many, for real
            return self.run_for_real(batch, case, start, -step), None
        if self._all(step == 1 and (case, start, batch) in self._ran):  # that very step was traced already
            return self._ran[(case, start, batch)], None
        if start == COLD and step == 1:
            return self.cold(batch, case, planned=True)
        if not self._all(self._started):
            self.cold(batch, case)  # the state the replayed steps made must exist to stand in their blocks
        events = prefix(model, batch, start, step, chunks=self._sizes(batch) if self.chunks else None)
        if not self._all(events is not None):
            return self.run_for_real(batch, case, start, step), None
        if start == COLD:
            resident, adopt = self.stepper.weight_tensors(), self.stepper.optimizer_state()
        else:
            resident, adopt = self.stepper.state_tensors(), []
            if not self._all(_sizes_of(resident) == sorted(model.warm_resident)):  # other batches' state
                self.cold(batch, case)
                resident = self.stepper.state_tensors()
                if not self._all(_sizes_of(resident) == sorted(model.warm_resident)):
                    return self.run_for_real(batch, case, start, step), None
        with self.memory.carried(resident, prefix=events or (), adopt=adopt) as matched:
            if self._all(matched):
                return self._step(batch, case, trace=True)
        return self.run_for_real(batch, case, start, step), None

    def run_for_real(self, batch: int, case: str, start: str, step: int) -> Peaks:
        if start == COLD:
            self._clear_state()
            resident = self.stepper.weight_tensors()
        else:
            resident = self.stepper.state_tensors()
        peaks = Peaks()
        with self.memory.carried(resident):
            for _ in range(step):
                peaks, _ = self._step(batch, case, trace=False)
        return peaks


def _sizes_of(tensors: Sequence[Any]) -> list[int]:
    """The sizes of the distinct storages of ``tensors``, sorted."""
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    return sorted(storages.values())


def _normalized(events: Sequence[Any]) -> list[Any]:
    """Events with their ids renumbered in order of first appearance (residents keep theirs)."""
    ids: dict[Any, int] = {}
    out: list[Any] = []
    for event in events:
        if event[0] == "alloc":
            ids[event[1]] = len(ids)
            out.append(("alloc", ids[event[1]], event[2]))
        elif event[0] == "free":
            out.append(("free", ids.get(event[1], event[1])))
        else:
            out.append(event)
    return out


def _highest(a: Peaks, b: Peaks) -> Peaks:
    def top(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else max(x, y)

    return Peaks(
        top(a.step_bytes, b.step_bytes),
        top(a.backward_bytes, b.backward_bytes),
        top(a.reserved_bytes, b.reserved_bytes),
    )
