"""The probe: find the largest micro-batch whose training survives, from a few real training steps.

Every trial is one optimizer step of :func:`~autobatch.step.transaction.run_step` (the step the training loop
runs) on the worst-case batch of that size (:mod:`autobatch.probing.trials`). Two small traced steps — the
first step from a cold start, and a step at steady state — give the timelines of a
:class:`~autobatch.memory.survival.StepModel`, whose replay over consecutive steps
(:mod:`autobatch.memory.survival`) predicts the largest batch that survives training; the batch and the one
above it are then tested, each by the one step of its training run that the replay says decides it, run for
real where the replay of the steps before it leaves the allocator. The search itself is the pure
:func:`~autobatch.probing.search.search`. Whatever happens, everything the steps change is restored bit for
bit (:mod:`autobatch.step.state`) before the probe returns or raises; reading samples for the cache key
happens inside that snapshot too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch

from autobatch.errors import NoBatchFitsError
from autobatch.memory.alloc_conf import AllocatorConfig
from autobatch.memory.footprint import ModelState, model_state
from autobatch.memory.oom import frozen_heap, release_memory
from autobatch.memory.runtime import held_outside
from autobatch.memory.survival import SurvivalPredictor
from autobatch.probing.fake import ShapeOnlyScaler
from autobatch.probing.search import OutOfMemory, Peaks, Predictor, SearchOutcome, Trial, run_trial, search
from autobatch.probing.trials import Trials, Verdict
from autobatch.result import ProbeResult
from autobatch.session import Session
from autobatch.step.state import snapshot
from autobatch.step.stepper import Stepper
from autobatch.units import format_bytes

__all__ = ["ADVISORY_SCAN_PREDICTED", "Prober", "apply_margin"]

logger = logging.getLogger("autobatch.probe")

ADVISORY_SCAN_PREDICTED = 16
"""Batches a prediction replays for holes below its advisory figures (what one step alone fits, what
expandable segments would buy), in strides beyond: the answer's own scan is the probe's, and these replays
are all a prediction's call costs (the expandable allocator's 3 × slower)."""


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

    Args:
        session: the started session.
        chunks: the micro-batches a plan cuts a micro-batch into (``fit`` knows its target): training
            at a micro-batch survives when the steps of that plan do. ``None``: two micro-steps of it (one
            without ``accumulate``).
        values: whether the steps may read values; ``False`` on fake tensors (a prediction), where the
            GradScaler is a :class:`~autobatch.probing.fake.ShapeOnlyScaler`.
        kernels: the :class:`~autobatch.step.cudakernels.KernelPolicy` the forward runs under, or ``None``.
        runtime: tensors the runtime holds on the device from the start (a GPU's cuBLAS workspaces).
    """

    def __init__(
        self,
        session: Session,
        chunks: Callable[[int], Sequence[int]] | None = None,
        *,
        values: bool = True,
        kernels: Any = None,
        runtime: Sequence[torch.Tensor] = (),
    ) -> None:
        self.session = session
        self.memory = session.memory.guarded()
        step = session.options.step
        optimizer = session.optimizer
        if optimizer is None:  # probe and try_batch: the optimizer training would default to
            optimizer = torch.optim.AdamW([p for p in session.model.parameters() if p.requires_grad], lr=1e-3)
        self.optimizer = optimizer
        scaler = (torch.amp.GradScaler if values else ShapeOnlyScaler)(
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
            values=values,
            kernels=kernels,
            runtime=runtime,
        )
        self.floor = session.floor
        capacity = self.memory.capacity
        self.outside = 0
        """On CUDA, what the caching allocator holds outside the step's tensors (cuBLAS's workspaces, other
        tensors on the card): the cap counts it, the traces do not (:mod:`autobatch.memory.runtime`)."""
        if self.memory.is_cuda and not runtime:  # a prediction's runtime tensors are its workspaces
            self.outside = held_outside(session.device, self.stepper.state_tensors(), session.precision)
            capacity = None if capacity is None else max(0, capacity - self.outside)
        if session.group is not None and capacity is not None:
            # Ranks with different limits must still search alike: all predict from the smallest.
            capacity = int(session.group.min([capacity])[0])
        self.capacity = capacity
        self.trials = Trials(self, chunks)
        self._predictor: SurvivalPredictor | None = None
        # Batches below the advisory figures replayed for holes: as many as for their own searches, or
        # fewer where the replay is all a call costs (a prediction).
        self.advisory_scan: int | None = None if values else ADVISORY_SCAN_PREDICTED

    @property
    def steps(self) -> int:
        """Optimizer steps run so far."""
        return self.trials.steps

    @property
    def samples(self) -> int:
        """Samples of training work so far."""
        return self.trials.samples

    def padded(self, batch_size: int) -> bool:
        """Whether a batch of ``batch_size`` has a mixed case other than its longest one."""
        return self.session.source.mixed_indices(batch_size, self.session.options.probe.size_fn) is not None

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

    strategy = "timeline"
    """``"timeline"``: predict from the trials' memory timelines; ``"bisect"``: the search without them,
    from batch ``floor`` (what autobatch did before; the probe benchmark compares the two)."""

    # -- verdicts -----------------------------------------------------------------------------------
    def predictor(self, case: str = "longest") -> Predictor | None:
        """The survival model of the traces so far, the same on every rank (``None`` while there is none).

        The longest and the mixed case each have their own: a padded batch may take other paths.
        """
        model = self.trials.model(case)
        group = self.session.group
        if group is not None and int(group.min([0.0 if model is None else 1.0])[0]) == 0:
            return None  # every rank predicts, or none does: the searches stay in lockstep
        if model is None:
            return None
        if self._predictor is None or self._predictor.model is not model:  # its replays are remembered
            self._predictor = SurvivalPredictor(
                model,
                allocator=self.memory.counts_reserved,
                chunks=self.trials.chunks,
                config=self.memory.alloc_config,
            )
        return _Agreed(self._predictor, group)

    def verdict(self, batch_size: int, case: str = "longest") -> Peaks:
        """Whether training at ``batch_size`` survives (raises :class:`OutOfMemory` when it does not): by
        the survival model where it has one fitted on two batches, else from this batch's own steps."""
        return self._verdict(batch_size, case).peaks

    def _verdict(self, batch_size: int, case: str) -> Verdict:
        self.session.model.train()
        model = self.trials.model(case)
        line = model is not None and model.micro.points[0] != model.micro.points[1]
        group = self.session.group
        if group is not None:
            line = bool(group.min([1.0 if line else 0.0])[0])
        if line and model is not None:
            return self.trials.verdict(batch_size, case, model)
        return self.trials.at(batch_size, case)

    def survives(self, batch_size: int) -> Verdict:
        """Whether training at ``batch_size`` survives, on both cases (the mixed one where there is one),
        from this batch's own steps: what ``try_batch`` and the cache's verification ask."""
        with self.memory.capped():
            self.session.model.train()
            verdict = self.trials.exact(batch_size)
            if self.padded(batch_size):
                mixed = self.trials.exact(batch_size, "mixed")
                verdict = dataclasses.replace(verdict, peaks=_highest_peaks(verdict.peaks, mixed.peaks))
        return verdict

    # -- the search ---------------------------------------------------------------------------------
    def search(self, cap: int, hint: int | None = None) -> ProbeResult:
        """The search up to ``cap``; raises NoBatchFitsError when nothing fits.

        The search runs on batches of the largest samples. Where the data's samples differ in size, its
        answer is then confirmed on the mixed case of that size; when that does not fit, a second search
        on mixed batches, below it, finds the size to take. ``hint`` (a cached answer) is the batch the
        second traced step runs at, so that a right hint costs two steps and one verdict.
        """
        started = time.perf_counter()
        with self.memory.capped():
            self.session.model.train()
            outcome = self._search_case("longest", cap, hint)
            mixed = None
            if outcome.best > 0 and self.padded(outcome.best):
                mixed = self._confirm_mixed(outcome.best)
            state = model_state(self.session.model, self.optimizer)
        if outcome.best == 0 or (mixed is not None and mixed.best == 0):
            raise self.nothing_fits()
        trials = outcome.trials
        if mixed is not None:
            trials = trials + mixed.trials
            if mixed.best < outcome.best:  # the mixed case decides: its failure and its memory model
                outcome = dataclasses.replace(mixed, trials=trials)
        outcome.trials = trials
        return self.result(outcome, state, cap, started)

    def _confirm_mixed(self, best: int) -> SearchOutcome:
        """Confirm ``best`` on its mixed case: its steady step traced, then the replay's decisive step (one
        step, or two); where it does not survive, search the mixed case below it."""
        on_trial = self.session.options.probe.on_trial
        confirm = run_trial(
            partial(self.verdict, case="mixed"),
            best,
            clock=time.perf_counter,
            on_trial=on_trial,
            case="mixed",
        )
        if confirm.fitted:
            return SearchOutcome(best, None, [confirm])
        if best - 1 < self.floor:
            return SearchOutcome(0, best, [confirm])
        below = self._search_case("mixed", best - 1)
        first_failure = best if below.first_failure is None else below.first_failure
        return SearchOutcome(below.best, first_failure, [confirm, *below.trials], below.model)

    def _search_case(self, case: str, cap: int, hint: int | None = None) -> SearchOutcome:
        """The largest batch in ``[floor, cap]`` whose training survives, on one case.

        The longest case traces a cold step at the smallest batch (2, or the floor) and a steady one at
        the batch above it (or at ``hint``); the mixed case traces two steady steps (a cold step's
        optimizer step is the same whatever the batch). Where the model they make exists, the search
        starts at its prediction; where a traced step runs out of memory, or no model lines up, it runs
        on this batch's own steps, from the floor.
        """
        on_trial = self.session.options.probe.on_trial
        run = partial(run_trial, clock=time.perf_counter, on_trial=on_trial, case=case)
        timeline = self.strategy == "timeline"
        first = min(max(2, self.floor), cap)
        hint = hint if hint is not None and self.floor <= hint <= cap else None
        traced: list[Trial] = []
        if timeline:
            trace_first = self.trials.trace_cold if case == "longest" else self.trials.warm
            role = "cold" if case == "longest" else "steady"
            traced.append(run(partial(trace_first, case=case), first, role=role))
            for second in (self._traced_hint(hint), first + 1):  # the hint, or the batch after the first
                if second is not None and first < second <= cap and traced[0].fitted:
                    traced.append(run(partial(self.trials.warm, case=case), second, role="steady"))
                    if traced[-1].fitted:
                        break
        failed = [t.batch for t in traced if not t.fitted]
        upper = min([cap, *(b - 1 for b in failed)])
        if upper < self.floor:
            return SearchOutcome(0, min(failed), traced)
        predictor = self.predictor(case) if timeline else None
        start, expected = self.floor, None
        if predictor is not None and self.capacity is not None:
            start = max(self.floor, min(upper, predictor.max_batch(self.capacity, lo=self.floor, hi=upper)))
            expected = True
        if hint is not None and start == hint:  # the cached answer is the model's: one verdict settles it
            trial = run(partial(self.verdict, case=case), hint)
            traced.append(trial)
            if trial.fitted:
                return SearchOutcome(hint, hint + 1 if hint < cap else None, traced)
            upper = hint - 1
            start = self.floor if upper < self.floor else start
        outcome = search(
            partial(self.verdict, case=case),
            cap=upper,
            limit=self.capacity,
            start=min(start, upper),
            on_trial=on_trial,
            floor=self.floor,
            predictor=partial(self.predictor, case) if timeline else None,
            case=case,
            start_expected=expected if start <= upper else None,
        )
        if outcome.first_failure is None and failed:
            outcome.first_failure = min(failed)
        outcome.trials = traced + outcome.trials
        return outcome

    def _traced_hint(self, hint: int | None) -> int | None:
        """The batch a hint's steady step is traced at: the hint, or where a plan cuts steps into chunks,
        the largest chunk the plan at the hint runs (a step at the hint itself is no step training runs)."""
        if hint is None or self.trials.chunks is None:
            return hint
        return max(self.trials.chunks(hint))

    def _memory_line(self, case: str, best: int, line: Any) -> dict[str, Any]:
        """``fixed_bytes + bytes_per_sample × batch``: the line through the replayed peaks of training at
        the smallest traced batch and at the answer (the measured trials' line where there is no model).
        Training's back-off measures what a failed micro-batch needs against it."""
        model = self.trials.model(case)
        low = min(max(2, self.floor), best)
        if model is None or best <= low:
            return {
                "fixed_bytes": line.fixed_bytes if line else None,
                "bytes_per_sample": line.bytes_per_sample if line else None,
            }
        predictor = SurvivalPredictor(
            model, allocator=self.memory.counts_reserved, chunks=None, config=self.memory.alloc_config
        )
        p1, p2 = predictor.peak(low), predictor.peak(best)
        slope = (p2 - p1) / (best - low)
        # What the allocator holds outside the steps counts against the cap, as training's back-off sees it.
        return {"fixed_bytes": p1 - slope * low + self.outside, "bytes_per_sample": slope}

    def survival_facts(self, case: str, best: int, cap: int) -> dict[str, Any]:
        """What the answer holds for over consecutive steps (:class:`ProbeResult`'s survival fields)."""
        model = self.trials.model(case)
        if model is None or self.capacity is None or best < self.floor:
            return {}
        config = self.memory.alloc_config
        reserved = self.memory.counts_reserved
        predictor = SurvivalPredictor(model, allocator=reserved, chunks=self.trials.chunks, config=config)
        survival = predictor.survival(best, self.capacity)
        if survival.growth > 0:
            logger.warning(
                "probe: what the device holds between training steps grows by %s every step (the model "
                "keeps a tensor from each step?): training will run out of memory, whatever the batch",
                format_bytes(survival.growth),
            )
        fixed = list(survival.fixed_point.values())
        scan = {} if self.advisory_scan is None else {"scan_limit": self.advisory_scan}
        single = predictor.single_step_max(self.capacity, lo=self.floor, hi=cap, **scan)
        facts: dict[str, Any] = {
            "fixed_point_steps": None if not fixed or None in fixed else max(fixed),  # type: ignore[type-var]
            "decided_by": survival.binding.describe() if survival.binding is not None else None,
            "single_step_batch": single or None,
        }
        if reserved:
            described = config.alloc_conf or "default"
            if config.unmodelled:
                described += f" (not modelled: {', '.join(config.unmodelled)})"
            facts["alloc_conf"] = described
            if not config.expandable_segments:
                expandable = AllocatorConfig(expandable_segments=True)
                other = SurvivalPredictor(model, allocator=True, chunks=self.trials.chunks, config=expandable)
                best_expandable = other.max_batch(self.capacity, lo=self.floor, hi=cap, **scan)
                facts["expandable_batch"] = best_expandable or None
        return facts

    def result(self, outcome: SearchOutcome, state: ModelState, cap: int, started: float) -> ProbeResult:
        session, probe = self.session, self.session.options.probe
        best, model = outcome.best, outcome.model
        case = outcome.trials[-1].case if outcome.trials else "longest"
        micro = apply_margin(best, probe.margin, probe.multiple_of)
        chunks = self.trials.chunks
        if chunks is not None and micro >= 1:
            # A plan's micro-batches are near-equal: a smaller micro-batch may give the very same ones
            # (57 at 28 is 19 + 19 + 19); the answer is their largest, which gives them again.
            largest = max(chunks(micro))
            if tuple(chunks(largest)) == tuple(chunks(micro)):
                micro = largest
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
            **self._memory_line(case, best, model),
            model_state_bytes=state.total,
            weights_bytes=state.weights,
            gradients_bytes=state.gradients,
            optimizer_state_bytes=state.optimizer,
            optimizer_steps=self.steps,
            ooms=sum(not t.fitted for t in outcome.trials),
            margin=probe.margin,
            multiple_of=probe.multiple_of,
            **self.survival_facts(case, best, cap),
            optimizer=type(self.optimizer).__name__,
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
        """The most memory training at the floor batch takes on this device without the limit (the
        smallest limit that would do), or ``None`` where there is no roomier memory to measure on (or it
        ran out there too)."""
        roomy = self.memory.roomy(host_bound=self.stepper.values)  # fake tensors hold no host memory
        group = self.session.group
        if group is not None and int(group.min([0.0 if roomy is None else 1.0])[0]) == 0:
            return None  # every rank measures, or none does
        if roomy is None:
            return None
        saved = self.stepper.memory, self.trials.memory, self.capacity
        self.stepper.memory = self.trials.memory = roomy
        self.capacity = None
        try:
            with roomy.capped():
                verdict = self.trials.exact(self.floor)
        except OutOfMemory:
            return None
        finally:
            self.stepper.memory, self.trials.memory, self.capacity = saved
        if verdict.survival is not None:
            return verdict.survival.peak + self.outside
        peaks = verdict.peaks
        return peaks.reserved_bytes if roomy.counts_reserved else peaks.step_bytes


def _highest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _highest_peaks(a: Peaks, b: Peaks) -> Peaks:
    return Peaks(
        _highest(a.step_bytes, b.step_bytes),
        _highest(a.backward_bytes, b.backward_bytes),
        _highest(a.reserved_bytes, b.reserved_bytes),
    )


class _Agreed:
    """A rank's survival model, its answers agreed across ranks (the smallest maximum, the largest peak)."""

    def __init__(self, model: SurvivalPredictor, group: Any) -> None:
        self.model, self.group = model, group

    def max_batch(self, limit: int, *, lo: int, hi: int) -> int:
        best = self.model.max_batch(limit, lo=lo, hi=hi)
        return best if self.group is None else int(self.group.min([best])[0])

    def peak(self, batch: int) -> int:
        peak = self.model.peak(batch)
        return peak if self.group is None else int(self.group.max([peak])[0])
