"""The probe: run the real training step at growing batch sizes and find the largest that fits.

Every trial is one optimizer step of :func:`~autobatch.transaction.run_step` (the step the training loop
runs) on the worst-case batch of that size, at steady state: a warm-up step first creates the optimizer
state, so that Adam's moments already take their memory while a trial is measured. The search itself is the
pure :func:`~autobatch.search.search`. Whatever happens, everything the steps change is restored bit for
bit (:mod:`autobatch.state`) before the probe returns or raises; reading samples for the cache key happens
inside that snapshot too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch

from autobatch.errors import NoBatchFitsError
from autobatch.footprint import ModelState, model_state
from autobatch.oom import frozen_heap, release_memory
from autobatch.result import ProbeResult
from autobatch.search import OutOfMemory, Peaks, Predictor, SearchOutcome, run_trial, search
from autobatch.session import Session
from autobatch.state import snapshot
from autobatch.step import Stepper
from autobatch.timeline import MemoryTimeline, Timeline, best_fit
from autobatch.transaction import run_step
from autobatch.units import format_bytes

__all__ = ["Prober", "apply_margin"]

logger = logging.getLogger("autobatch.probe")


def apply_margin(exact: int, margin: float, multiple_of: int) -> int:
    """Shrink the exact maximum by ``margin`` (a fraction) and round it down to ``multiple_of``.

    When no multiple of ``multiple_of`` fits, the batch after the margin is kept (at least 1).

    Example:
        >>> apply_margin(100, 0.1, 8), apply_margin(100, 0.0, 1), apply_margin(5, 0.0, 8)
        (88, 100, 5)
    """
    after_margin = max(1, math.floor(exact * (1.0 - margin)))
    rounded = (after_margin // multiple_of) * multiple_of
    return rounded if rounded >= 1 else after_margin


class Prober:
    """The probe of one started :class:`~autobatch.session.Session`.

    It steps with a GradScaler of its own whose scale starts at 1 (a first step skipped for inf gradients
    would not create the optimizer state that steady state needs), measures every step, NaN losses
    included, and runs on the session's memory guarded for probing (:meth:`DeviceMemory.guarded`).
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self.memory = session.memory.guarded()
        step = session.options.step
        optimizer = session.optimizer
        if optimizer is None:  # probe and try_batch: the optimizer training would default to
            optimizer = torch.optim.AdamW([p for p in session.model.parameters() if p.requires_grad], lr=1e-3)
        self.optimizer = optimizer
        scaler = torch.amp.GradScaler(
            session.device.type, init_scale=1.0, enabled=session.precision == "fp16"
        )
        self.stepper = Stepper(
            session.model,
            optimizer,
            self.memory,
            session.precision,
            loss_fn=step.loss_fn,
            step_fn=step.step_fn,
            grad_clip=step.grad_clip,
            scaler=scaler,
            skip_nonfinite=False,
        )
        self.floor = session.floor
        self.steps = 0
        self.samples = 0  # samples of training work, the warm-up included
        self.timelines: dict[str, dict[int, Timeline]] = {"longest": {}, "mixed": {}}
        self._warm = False
        capacity = self.memory.capacity
        if session.group is not None and capacity is not None:
            # Ranks with different limits must still search alike: all predict from the smallest.
            capacity = int(session.group.min([capacity])[0])
        self.capacity = capacity

    def trial(self, batch_size: int, case: str = "longest") -> Peaks:
        """One optimizer step on the worst-case batch; raises :class:`OutOfMemory` when it does not fit.

        ``case`` is ``"longest"`` (the ``batch_size`` largest samples) or ``"mixed"`` (the largest but one
        and the smallest, padded together: :meth:`~autobatch.data.DataSource.mixed_case`).
        """
        probe = self.session.options.probe
        source = self.session.source
        if case == "mixed":
            batch = source.mixed_case(batch_size, probe.size_fn)
        else:
            batch = source.worst_case(batch_size, probe.size_fn)
        # A micro-step after the first adds onto existing gradients: measure that one too.
        weights = (0.5, 0.5) if probe.accumulate else (1.0,)
        outcome = run_step(
            self.stepper, lambda: [(batch, w) for w in weights], group=self.session.group, trace=True
        )
        self.steps += 1
        self.samples += batch_size
        if not outcome.fitted:
            raise OutOfMemory
        if outcome.trace is not None and self._warm:  # the warm-up's own allocations differ: state is made
            self.timelines[case][batch_size] = Timeline(batch_size, *outcome.trace)
        logger.debug("probe: %s batch %d fits, peak %s", case, batch_size, outcome.step_peak)
        return Peaks(outcome.step_peak, outcome.backward_peak, outcome.step_reserved)

    def padded(self, batch_size: int) -> bool:
        """Whether a batch of ``batch_size`` has a mixed case other than its longest one."""
        return self.session.source.mixed_indices(batch_size, self.session.options.probe.size_fn) is not None

    def fits(self, batch_size: int) -> Peaks:
        """Both cases of ``batch_size`` (the mixed one where there is one); raises OutOfMemory."""
        peaks = self.trial(batch_size)
        if self.padded(batch_size):
            mixed = self.trial(batch_size, "mixed")
            peaks = Peaks(
                _highest(peaks.step_bytes, mixed.step_bytes),
                _highest(peaks.backward_bytes, mixed.backward_bytes),
                _highest(peaks.reserved_bytes, mixed.reserved_bytes),
            )
        return peaks

    @contextlib.contextmanager
    def restoring(self) -> Iterator[None]:
        """Snapshot everything the steps (and reading samples) change; restore it all on the way out."""
        with frozen_heap():
            snap = snapshot(self.session.model, self.session.optimizer, self.session.options.probe.scaler)
            try:
                yield
            finally:
                # Release first (it drops gradients), then restore (pending gradients come back).
                self.stepper.discard_step()
                release_memory(self.session.model, self.optimizer)
                snap.restore()

    @contextlib.contextmanager
    def warm(self) -> Iterator[bool]:
        """Cap memory and run the warm-up step that creates the optimizer state; yields whether it fitted."""
        self.session.model.train()
        with self.memory.capped():
            try:
                self.trial(self.floor)
            except OutOfMemory:
                yield False
            else:
                self._warm = True
                try:
                    yield True
                finally:
                    self._warm = False

    strategy = "timeline"
    """``"timeline"``: predict from the trials' memory timelines; ``"bisect"``: the search without them,
    from batch ``floor`` (what autobatch did before; the probe benchmark compares the two)."""

    def predictor(self, case: str = "longest") -> Predictor | None:
        """The memory model of the trials so far, the same on every rank (``None`` while there is none).

        The longest and the mixed case each have their own: a padded batch may take other paths.
        """
        model = best_fit(list(self.timelines[case].values()))
        group = self.session.group
        if group is not None and int(group.min([0.0 if model is None else 1.0])[0]) == 0:
            return None  # every rank predicts, or none does: the searches stay in lockstep
        if model is None:
            return None
        return _Agreed(model, self.memory.counts_reserved, group)

    def verify(self, micro_batch: int) -> bool:
        """Whether ``micro_batch`` fits one steady-state step now: a cached answer is never used untested."""
        with self.warm() as warm:
            if not warm:
                return False
            try:
                self.fits(micro_batch)
            except OutOfMemory:
                return False
        return True

    def search(self, cap: int) -> ProbeResult:
        """The search up to ``cap``, from a warm state; raises NoBatchFitsError when nothing fits.

        The search runs on batches of the largest samples. Where the data's samples differ in size, its
        answer is then confirmed on the mixed case of that size (one step); when that does not fit, a
        second search on mixed batches, below it, finds the size to take.
        """
        started = time.perf_counter()
        timeline = self.strategy == "timeline"
        with self.warm() as warm:
            outcome = mixed = None
            if warm:
                outcome = search(
                    self.trial,
                    cap=cap,
                    limit=self.capacity,
                    on_trial=self.session.options.probe.on_trial,
                    # From 2: a batch of one often takes other code paths (a matrix-vector product, a
                    # broadcast), whose timeline would not line up with the next batch's.
                    start=min(max(2, self.floor), cap) if timeline else self.floor,
                    floor=self.floor,
                    predictor=self.predictor if timeline else None,
                )
                if outcome.best > 0 and self.padded(outcome.best):
                    mixed = self.search_mixed(outcome.best, timeline)
            state = model_state(self.session.model, self.optimizer)
        if outcome is None or outcome.best == 0 or (mixed is not None and mixed.best == 0):
            raise self.nothing_fits()
        trials = outcome.trials
        if mixed is not None:
            trials = trials + mixed.trials
            if mixed.best < outcome.best:  # the mixed case decides: its failure and its memory model
                outcome = dataclasses.replace(mixed, trials=trials)
        outcome.trials = trials
        return self.result(outcome, state, cap, started)

    def search_mixed(self, best: int, timeline: bool) -> SearchOutcome:
        """Confirm ``best`` on its mixed case; where that does not fit, search the mixed case below it,
        from the smallest batches up, as the first search (its own timelines predict its maximum)."""
        on_trial = self.session.options.probe.on_trial
        mixed = partial(self.trial, case="mixed")
        confirm = run_trial(mixed, best, clock=time.perf_counter, on_trial=on_trial, case="mixed")
        if confirm.fitted:
            return SearchOutcome(best, None, [confirm])
        if best - 1 < self.floor:
            return SearchOutcome(0, best, [confirm])
        below = search(
            mixed,
            cap=best - 1,
            limit=self.capacity,
            on_trial=on_trial,
            start=min(max(2, self.floor), best - 1) if timeline else self.floor,
            floor=self.floor,
            predictor=(lambda: self.predictor("mixed")) if timeline else None,
            case="mixed",
        )
        first_failure = best if below.first_failure is None else below.first_failure
        return SearchOutcome(below.best, first_failure, [confirm, *below.trials], below.model)

    def result(self, outcome: SearchOutcome, state: ModelState, cap: int, started: float) -> ProbeResult:
        session, probe = self.session, self.session.options.probe
        best, model = outcome.best, outcome.model
        micro = apply_margin(best, probe.margin, probe.multiple_of)
        if session.group is not None:  # the searches ran in lockstep; this also covers per-rank options
            micro = int(session.group.min([micro])[0])
        capped_by = None
        if best >= cap:
            dataset = len(session.source)
            capped_by = (
                "max_batch" if probe.max_batch is not None and probe.max_batch <= dataset else "dataset"
            )
        return ProbeResult(
            micro_batch=micro,
            max_fitting_batch=best,
            first_failure=outcome.first_failure,
            capped_by=capped_by,
            device=str(session.device),
            precision=session.precision,
            memory_limit=self.memory.limit,
            limit_kind=self.memory.describe(),
            trials=outcome.trials,
            fixed_bytes=model.fixed_bytes if model else None,
            bytes_per_sample=model.bytes_per_sample if model else None,
            model_state_bytes=state.total,
            weights_bytes=state.weights,
            gradients_bytes=state.gradients,
            optimizer_state_bytes=state.optimizer,
            optimizer_steps=self.steps,
            ooms=sum(not t.fitted for t in outcome.trials),
            margin=probe.margin,
            multiple_of=probe.multiple_of,
            seconds=time.perf_counter() - started,
        )

    def nothing_fits(self) -> NoBatchFitsError:
        """The error of a probe whose smallest batch did not fit: what the step holds, what would do.

        The smallest limit that would do is measured: the steps of the floor batch run once more on a
        device without this limit (inside the probe's snapshot, like every trial), where there is one.
        """
        limit, precision, batch = self.memory.limit, self.session.precision, self.floor
        state = model_state(self.session.model, self.optimizer)
        needed = self.needed_at_floor()
        if needed is not None:
            state = model_state(self.session.model, self.optimizer)  # the steps made the optimizer state
        hints = []
        if needed is not None:
            hints.append(f"memory_limit='{format_bytes(needed, up=True)}' or more")
        else:
            hints.append("a larger memory_limit")
        hints.append("a smaller model")
        if precision == "fp32":
            hints.insert(1, "precision='bf16' (or 'fp16' on CUDA)")
        hints.append("an optimizer with less state (SGD instead of Adam)")
        where = format_bytes(limit) if limit is not None else "the device capacity"
        need = (
            f" One training step of {batch} sample{'s' if batch != 1 else ''} needs {format_bytes(needed)}"
            " (measured without the limit)."
            if needed is not None
            else ""
        )
        return NoBatchFitsError(
            f"Not even a batch of {batch} sample{'s' if batch != 1 else ''} fits under {where} in "
            f"{precision}: the training step holds {state.describe()} of model state before any "
            f"activation.{need} Try " + ", ".join(hints) + ".",
            memory_limit=limit,
            model_state=state,
            needed_bytes=needed,
        )

    def needed_at_floor(self) -> int | None:
        """The peak of a steady-state step of the floor batch on this device without the limit (the
        smallest limit that would do), or ``None`` where there is no roomier memory to measure on."""
        roomy = self.memory.roomy()
        group = self.session.group
        if group is not None and int(group.min([0.0 if roomy is None else 1.0])[0]) == 0:
            return None  # every rank measures, or none does
        if roomy is None:
            return None
        memory, self.stepper.memory = self.stepper.memory, roomy
        try:
            with roomy.capped():
                self.trial(self.floor)  # the warm-up: it makes the optimizer state
                peaks = self.fits(self.floor)
        except OutOfMemory:
            return None
        finally:
            self.stepper.memory = memory
        peak = peaks.reserved_bytes if roomy.counts_reserved else peaks.step_bytes
        return peak


def _highest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class _Agreed:
    """A rank's timeline model, its answers agreed across ranks (the smallest maximum, the largest peak)."""

    def __init__(self, model: MemoryTimeline, reserved: bool, group: Any) -> None:
        self.model, self.reserved, self.group = model, reserved, group

    def max_batch(self, limit: int, *, lo: int, hi: int) -> int:
        best = self.model.max_batch(limit, lo=lo, hi=hi, allocator=self.reserved)
        return best if self.group is None else int(self.group.min([best])[0])

    def peak(self, batch: int) -> int:
        peak = self.model.peak(batch, allocator=self.reserved)
        return peak if self.group is None else int(self.group.max([peak])[0])
