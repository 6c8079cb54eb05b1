"""How far training backs off after an out-of-memory: to the largest micro-batch that the memory model,
corrected by what the failure measured, says fits.

A step's peak is modelled as ``fixed + batch × per_sample``. ``fixed`` is what the step needs whatever
its batch: the probe's memory model, or the model state where no probe ran. ``per_sample`` comes from the
micro-batch that failed, measured one of two ways:

* **Its peak, measured without the limit** (:func:`peak_without_limit`): the failed micro-batch's forward
  and backward run once more on the same device without the cap (an emulated device counts without its
  limit; CUDA with a ``memory_limit`` below the card lifts the cap), and its gradients are dropped. Exact,
  for the price of one forward and backward per back-off.
* **A lower bound read from the error**, where nothing is roomier (CUDA at its full capacity): the memory
  in use when the allocation failed plus the allocation (:func:`autobatch.memory.oom.demand_bytes`).

Where neither exists the micro-batch is halved. However it was found, the new size is below the failed one
and never below the floor; regrowth after clean steps (:mod:`autobatch.training.loop`) still tries larger
sizes.
"""

from __future__ import annotations

import math
from typing import Any

from autobatch.memory.device import DeviceMemory
from autobatch.memory.oom import is_oom, release_memory
from autobatch.step.stepper import Stepper

__all__ = ["largest_fitting", "peak_without_limit"]


def largest_fitting(failed: int, need: int | None, capacity: int | None, fixed: float) -> int | None:
    """The largest batch the line through ``(0, fixed)`` and ``(failed, need)`` puts under ``capacity``;
    ``None`` when nothing was measured (the caller halves). Not clamped: the caller keeps it in
    ``[floor, failed)``.

    Example:
        >>> largest_fitting(20, need=3_000, capacity=2_000, fixed=1_000)  # 100 bytes a sample
        10
        >>> largest_fitting(20, need=None, capacity=2_000, fixed=1_000) is None
        True
    """
    if need is None or capacity is None or need <= fixed:
        return None
    per_sample = (need - fixed) / failed
    return math.floor((capacity - fixed) / per_sample)


def peak_without_limit(stepper: Stepper, batch: Any, memory: DeviceMemory) -> int | None:
    """The peak of one forward and backward of ``batch`` on ``memory`` without its limit, in the units of
    the limit; ``None`` where there is nothing roomier, or it does not fit there either.

    It is measured with every gradient already held, as it is for every micro-batch of a step but the
    first. It runs on this rank alone, through the bare module (no DDP wrapper, so no collective): a model
    with SyncBatchNorm, whose forward is one, must not be measured so under a process group. The gradients
    are dropped and the normalisation layers' running statistics put back: the step is redone afterwards,
    and nothing of this run may stay.
    """
    roomy = memory.roomy()
    if roomy is None:
        return None
    saved = stepper.memory, stepper.forward_module
    statistics = stepper.save_statistics()
    stepper.memory, stepper.forward_module = roomy, stepper.model
    peak = None
    try:
        # With gradients already held, as for every micro-batch of a step but its first.
        stepper.materialise_gradients()
        with roomy.capped(), roomy.measure(stepper.state_tensors) as measured:
            stepper.forward_backward(batch, 1.0)
        peak = measured.reserved_bytes if roomy.counts_reserved else measured.peak_bytes
    except Exception as exc:
        if not is_oom(exc):
            raise
    finally:
        stepper.memory, stepper.forward_module = saved
    # Outside the except clause: its traceback would keep the failed run's tensors alive.
    stepper.discard_step()
    release_memory(stepper.model, stepper.optimizer)
    stepper.restore_statistics(statistics)
    return peak
