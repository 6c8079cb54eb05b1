"""One probe session: a validated setup that runs the real training step at any batch size.

A :class:`Session` binds the model, optimizer, data and device memory to one
:class:`~autobatch.step.Stepper`, the step the training loop runs. :meth:`Session.try_step` runs it on the
worst-case batch of a size and measures its peaks, under torchrun in lockstep with the other ranks;
:meth:`Session.steady_state` snapshots everything, runs the warm-up step that creates the optimizer
state, and restores it all bit for bit afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autobatch import distributed
from autobatch.data import SizeFn, as_source
from autobatch.errors import NoBatchFitsError
from autobatch.memory import DeviceMemory, resolve_memory_limit, tensor_bytes
from autobatch.oom import frozen_heap, is_oom, release_memory
from autobatch.search import OutOfMemory, Peaks
from autobatch.state import snapshot
from autobatch.step import LossFn, StepFn, Stepper, resolve_precision, smallest_batch
from autobatch.validate import check_model_and_optimizer, resolve_device

__all__ = ["Session"]

logger = logging.getLogger("autobatch.probe")


class Session:
    """The validated setup shared by :func:`probe` and :func:`try_batch`: one step function, one device."""

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        optimizer: torch.optim.Optimizer | None,
        loss_fn: LossFn | None,
        step_fn: StepFn | None,
        precision: str,
        memory_limit: int | str | None,
        device: torch.device | str | None,
        size_fn: SizeFn | None,
        grad_clip: float | None,
        scaler: torch.amp.GradScaler | None,
        accumulate: bool,
    ) -> None:
        limit = resolve_memory_limit(memory_limit)
        self.accumulate = bool(accumulate)
        model, _ = distributed.unwrap(model)  # every rank probes its own copy of the module
        self.device = resolve_device(device, model)
        self.group = distributed.setup(self.device)
        self.precision = resolve_precision(precision, self.device)
        self.model = model
        self.optimizer = check_model_and_optimizer(model, optimizer)
        self.source = as_source(data)
        if step_fn is None:
            self.source.check_labelled()
        self.size_fn = size_fn
        self.user_scaler = scaler
        self.memory = DeviceMemory(self.device, limit, emulate=self.device.type != "cuda")
        self.predict_limit = self.memory.limit
        if self.predict_limit is None and self.device.type == "cuda":
            self.predict_limit = torch.cuda.get_device_properties(self.device).total_memory
        if self.group is not None and self.predict_limit is not None:
            # Ranks with different limits must still search alike: all predict from the smallest.
            self.predict_limit = int(self.group.min([self.predict_limit])[0])
        # The probe steps with a scaler of its own whose scale starts at 1: a first step skipped for
        # inf gradients would not create the optimizer state that steady state needs.
        fp16 = self.precision == "fp16"
        probe_scaler = torch.amp.GradScaler(self.device.type, init_scale=1.0, enabled=fp16)
        self.stepper = Stepper(
            model,
            self.optimizer,
            self.memory,
            self.precision,
            loss_fn=loss_fn,
            step_fn=step_fn,
            grad_clip=grad_clip,
            scaler=probe_scaler,
        )
        self.model_state_bytes = tensor_bytes(self.stepper.state_tensors())
        self.steps = 0
        self.floor = min(smallest_batch(model), len(self.source))

    def try_step(self, batch_size: int) -> Peaks:
        """One full training step on the worst-case batch; raises OutOfMemory when it does not fit."""
        batch = self.source.worst_case(batch_size, self.size_fn)
        self.steps += 1
        out_of_memory = False
        backward_peak: int | None = None
        try:
            with self.memory.measure(self.stepper.state_tensors()) as measured:
                if self.accumulate:
                    # A micro-step after the first adds onto existing gradients: measure that one too.
                    self.stepper.backward(batch, 0.5)
                self.stepper.backward(batch, 0.5 if self.accumulate else 1.0)
                backward_peak = measured.peak_so_far()
                self.stepper.step()
        except Exception as exc:
            if not is_oom(exc):
                raise
            out_of_memory = True
        backward_peak = None if out_of_memory else backward_peak
        step_peak = None if out_of_memory else measured.peak_bytes
        if self.group is not None:
            # Every rank takes the branch of the worst rank: the search stays in lockstep.
            flag, step_max, backward_max = self.group.max(
                [float(out_of_memory), _or_minus_one(step_peak), _or_minus_one(backward_peak)]
            )
            out_of_memory = flag > 0
            step_peak = None if step_max < 0 else int(step_max)
            backward_peak = None if backward_max < 0 else int(backward_max)
        # Memory is released only here, outside the except block, whose traceback holds the failed
        # step's tensors.
        if out_of_memory:
            del batch
            self.stepper.reset_after_oom()
            release_memory(self.model, self.optimizer)
            raise OutOfMemory
        if measured.resident_bytes is not None:
            self.model_state_bytes = max(self.model_state_bytes, measured.resident_bytes)
        logger.debug("probe: batch %d fits, peak %s", batch_size, step_peak)
        return Peaks(step_peak, backward_peak)

    @contextlib.contextmanager
    def steady_state(self) -> Iterator[bool]:
        """Snapshot, cap memory and run the warm-up step; yields whether the smallest batch fitted;
        restores all."""
        with frozen_heap():
            snap = snapshot(self.model, self.optimizer, self.user_scaler)
            try:
                self.model.train()
                with self.memory.capped():
                    try:
                        # Creates the optimizer state: the trials then run at steady state.
                        self.try_step(self.floor)
                    except OutOfMemory:
                        yield False
                    else:
                        yield True
            finally:
                snap.restore()
                release_memory(self.model, self.optimizer)

    def nothing_fits(self) -> NoBatchFitsError:
        return NoBatchFitsError.at_batch_one(
            limit=self.memory.limit,
            precision=self.precision,
            model_state_bytes=self.model_state_bytes,
            batch=self.floor,
        )


def _or_minus_one(value: int | None) -> float:
    return -1.0 if value is None else float(value)
