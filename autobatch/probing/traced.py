"""The answer of a prediction from the probe's traced steps, replayed: no step at the answer runs.

:func:`replayed` runs what the probe's search starts with (a cold step at the smallest batch and a steady
step at the batch above it, for the longest samples and, where samples differ in size, for a padded batch)
and answers from their timelines alone: the largest batch whose training survives under the replay of
consecutive steps (:mod:`autobatch.memory.survival`), confirmed on the padded case as the probe confirms
it. Where the timelines do not line up, :func:`searched` runs the probe's own search, whose batches are
real host memory: it is capped to what the host holds. :mod:`autobatch.probing.prediction` runs both on fake
tensors, or on real ones.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial

from autobatch._tree import iter_tensors
from autobatch.memory.device import default_cpu_limit, tensor_bytes
from autobatch.memory.footprint import model_state
from autobatch.memory.survival import SurvivalPredictor
from autobatch.probing.prober import Prober
from autobatch.probing.search import SearchOutcome, Trial, run_trial
from autobatch.result import ProbeResult

__all__ = ["PREDICT_CAP", "replayed", "searched"]

PREDICT_CAP = 1 << 20
"""The largest micro-batch a prediction looks for without ``max_batch`` (the data's size does not cap it:
a few samples describe the batches of a card)."""


def _traced(prober: Prober, case: str, first: int, cap: int) -> list[Trial]:
    """The probe's traced steps of ``case``: at ``first`` (cold for the longest case, steady for the mixed
    one, as the probe traces them) and at the batch above it, where ``cap`` allows."""
    run = partial(run_trial, clock=time.perf_counter, case=case)
    longest = case == "longest"
    step = prober.trials.trace_cold if longest else prober.trials.warm
    trials = [run(partial(step, case=case), first, role="cold" if longest else "steady")]
    if trials[0].fitted and first < cap:
        trials.append(run(partial(prober.trials.warm, case=case), first + 1, role="steady"))
    return trials


def replayed(prober: Prober, notes: list[str]) -> ProbeResult | None:
    """The answer from two traced steps per case, replayed; ``None`` where their timelines do not line up."""
    started = time.perf_counter()
    session = prober.session
    cap = session.options.probe.max_batch or PREDICT_CAP
    first = min(max(2, prober.floor), cap)
    session.model.train()
    trials = _traced(prober, "longest", first, cap)
    if not trials[0].fitted:
        raise prober.nothing_fits()
    model = prober.trials.model("longest")
    if len(trials) < 2 or not trials[1].fitted or model is None:
        return None
    assert prober.capacity is not None  # a prediction always has a limit
    predictor = partial(
        SurvivalPredictor, allocator=prober.memory.counts_reserved, config=prober.memory.alloc_config
    )
    best = predictor(model).max_batch(prober.capacity, lo=prober.floor, hi=cap)
    if best < prober.floor:
        raise prober.nothing_fits()
    size = len(session.source)
    if prober.padded(best if best < size else first + 1):  # the padded case, confirmed as the probe does
        mixed_trials = _traced(prober, "mixed", first, cap)
        trials += mixed_trials
        mixed = prober.trials.model("mixed")
        if mixed is None or not all(t.fitted for t in mixed_trials):
            return None
        replay = predictor(mixed)
        if not replay.survival(best, prober.capacity).fits:
            notes.append(f"a padded batch of {best} does not survive: the padded case decides")
            best = replay.max_batch(prober.capacity, lo=prober.floor, hi=best - 1)
            if best < prober.floor:
                raise prober.nothing_fits()
    state = model_state(session.model, prober.optimizer)
    outcome = SearchOutcome(best, best + 1 if best < cap else None, trials)
    result = prober.result(outcome, state, cap, started)
    return dataclasses.replace(result, capped_by="max_batch" if best >= cap else None)


def searched(prober: Prober, notes: list[str], on: str) -> ProbeResult:
    """The probe's own search, from this batch's own steps (where the traced ones do not line up)."""
    session = prober.session
    cap = min(session.options.probe.max_batch or PREDICT_CAP, len(session.source))
    sample = session.source.worst_case(1, session.options.probe.size_fn)
    per_sample = max(1, tensor_bytes(iter_tensors(sample)))
    # The batches are real host memory (the collated batch, its copy onto the device, what is computed from
    # it alone): at most half of what the host has left.
    held = max(max(2, prober.floor) + 1, default_cpu_limit() // (4 * per_sample))
    why = "the two traced steps do not line up (control flow on the batch size?)"
    if held < cap:
        cap = held
        why += f"; the host holds batches of up to {held} samples"
    notes.append(f"{why}: searched as the probe does, on {on}, up to {cap}")
    return prober.search(cap)
