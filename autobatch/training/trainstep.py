"""``autobatch.TrainStep``: one exact optimizer step of your own loop, in micro-batches that fit.

Your loop keeps its data, logging, checkpoints, scheduler and evaluation; each call
``step(batch)`` runs one optimizer step over exactly the samples of ``batch`` (the short last one too),
through the same :class:`~autobatch.training.runner.StepRunner` that :func:`autobatch.fit` runs: the batch
cut into near-equal micro-batches that fit, autocast with a GradScaler (or bf16), each micro-loss weighted
by its share of the batch (or of its items, with ``num_items``), unscale before clipping, one
``optimizer.step`` and ``scaler.update``, gradients set to ``None``. An out-of-memory in any phase backs
off and redoes the step from its first sample; the micro-batch regrows after clean steps.

The micro-batch is probed on the first call, from that batch's own samples (the largest first; the probe
replays the plan that cuts that batch), or beforehand: :meth:`TrainStep.probe` on a dataset, a
:class:`~autobatch.result.ProbeResult`, or ``micro_batch=``. Under torchrun it takes a plain module (rank
0's weights are copied to every rank on the first call, as DDP's construction does) or your own
``DistributedDataParallel``: each rank passes its share of the step, and the gradients are summed across
ranks once every rank's micro-steps fitted.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from autobatch import distributed
from autobatch._tree import batch_size_of, iter_tensors, slice_batch
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.device import DeviceMemory
from autobatch.memory.threads import cpu_threads
from autobatch.options import Options, entry_point
from autobatch.probing.cached import planned_chunks, probe_session
from autobatch.result import Backoff, ProbeResult
from autobatch.session import bind_scheduler, resolve, resolve_model
from autobatch.step.data import StepData, as_source
from autobatch.step.stepper import Stepper, smallest_batch
from autobatch.training.runner import StepRunner, chunk_bounds
from autobatch.validate import check_sample_dimension

__all__ = ["StepReport", "TrainStep"]

logger = logging.getLogger(__name__)

_TRAINING_ONLY = frozenset({"micro_batch", "num_items", "regrow_after", "scheduler"})
"""TrainStep's options that its probe does not take."""


@dataclass(frozen=True)
class StepReport:
    """What one call of a :class:`TrainStep` did. It reads as its loss: ``float(report)``,
    ``f"{report:.4f}"`` and ``report.item()`` give the step's loss.

    Attributes:
        loss: the step's loss over all its samples (every rank's), weighted as its gradient is; NaN or
            infinite for a skipped non-finite step.
        micro_batches: the micro-batches this rank ran, e.g. ``(11, 11, 10)``.
        backoffs: the out-of-memory back-offs of this step (the step was redone after each).
        applied: the optimizer step was applied (``False``: skipped for a non-finite loss, or by the
            GradScaler for inf/NaN gradients).
    """

    loss: float
    micro_batches: tuple[int, ...]
    backoffs: tuple[Backoff, ...] = ()
    applied: bool = True

    def __float__(self) -> float:
        return self.loss

    def __format__(self, spec: str) -> str:
        return format(self.loss, spec)

    def item(self) -> float:
        """The loss, as ``tensor.item()`` gives it."""
        return self.loss


class _Samples(Dataset[Any]):
    """A collated batch seen as a dataset of its samples, for the probe to read worst cases from."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        return _unbatched(slice_batch(self.batch, index, index + 1))


def _unbatched(batch: Any) -> Any:
    """The one sample of a batch of one: tensors lose their first dimension, a list its only item."""
    if isinstance(batch, torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        return {k: _unbatched(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_unbatched(v) for v in batch)
    if isinstance(batch, list):
        nested = batch and all(isinstance(v, (torch.Tensor, dict, tuple, list)) for v in batch)
        return [_unbatched(v) for v in batch] if nested else batch[0]
    return batch


class _Batch(StepData):
    """One call's batch, as the runner reads a step: micro-batches are slices of it."""

    def __init__(self, batch: Any, n: int) -> None:
        super().__init__(None, batch, n)  # type: ignore[arg-type]

    def collate(self, start: int, stop: int) -> Any:
        return slice_batch(self.samples, start, stop)


class TrainStep:
    """One call, one exact optimizer step over the batch it is given, in micro-batches that fit.

    Args:
        model: the model, on the device to train on (or your ``DistributedDataParallel`` of it).
        optimizer: its optimizer.

    Example:
        >>> import torch, autobatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> step = autobatch.TrainStep(model, optimizer, memory_limit="64KiB", precision="fp32")
        >>> X, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
        >>> for i in range(0, 96, 32):
        ...     loss = step((X[i : i + 32], y[i : i + 32]))
        >>> sum(loss.micro_batches), step.steps
        (32, 3)
    """

    @entry_point("TrainStep")
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UsageTypeError(
                f"Expected `optimizer` to be a torch.optim.Optimizer, but got {type(optimizer).__name__}: "
                "TrainStep steps the optimizer of your loop, e.g. torch.optim.AdamW(model.parameters())."
            )
        self.options = Options.parse("TrainStep", options)
        self._given = dict(options)
        module, ddp, device, precision, limit = resolve_model(model, optimizer, self.options)
        train, step = self.options.train, self.options.step
        self.model, self.ddp, self.device, self.precision = module, ddp, device, precision
        self.optimizer = optimizer
        self.scheduler = bind_scheduler(train.scheduler, optimizer)
        self.memory = DeviceMemory(device, limit, self.options.memory.emulation)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        """The GradScaler of fp16 steps: its state is in :meth:`state_dict` (save it with a checkpoint)."""
        self.floor = smallest_batch(module)
        self.micro_batch: int | None = train.micro_batch
        """The micro-batch in force (``None`` until probed); it shrinks on a back-off and regrows."""
        self._max_micro: int | None = None  # the largest micro-batch a loaded checkpoint regrows to
        self._clean_steps = 0  # and its clean steps since the last back-off
        self.result: ProbeResult | None = None
        """The probe's result, where this step probed (or was given one)."""
        self._stepper = Stepper(
            module,
            optimizer,
            self.memory,
            precision,
            forward=ddp,
            loss_fn=step.loss_fn,
            step_fn=step.step_fn,
            grad_clip=step.grad_clip,
            scaler=self.scaler,
        )
        self._runner: StepRunner | None = None
        self._group: distributed.Group | None = None
        self._carried = contextlib.ExitStack()

    # -- the micro-batch ------------------------------------------------------------------------------
    def probe(self, data: Any, target_batch: int | None = None) -> ProbeResult:
        """Probe the micro-batch beforehand, on ``data`` (a Dataset, a DataLoader or tensors), for steps of
        ``target_batch`` samples over all ranks (default: the dataset's size); or take ``data``'s micro-batch
        where it is a :class:`~autobatch.result.ProbeResult` already.

        Raises:
            NoBatchFitsError: not even the smallest micro-batch fits.
        """
        if isinstance(data, ProbeResult):
            if data.precision != self.precision:
                logger.warning(
                    "TrainStep: the probe result was measured in %s, this step runs in %s",
                    data.precision,
                    self.precision,
                )
            return self._take(data)
        probe_options = {k: v for k, v in self._given.items() if k not in _TRAINING_ONLY}
        session = resolve(
            self.ddp or self.model,
            data,
            Options.parse("probe", {**probe_options, "optimizer": self.optimizer}),
        )
        world = distributed.expected_world_size()
        per_rank = (target_batch or len(session.source) * world) // world
        if target_batch is not None and per_rank < 1:
            raise UsageValueError(
                f"Expected `target_batch` to give every one of the {world} ranks a sample, but got "
                f"{target_batch}."
            )
        with session.start():
            result = probe_session(session, cap=per_rank, chunks=planned_chunks(per_rank, session.floor))
        return self._take(result)

    def _take(self, result: ProbeResult) -> ProbeResult:
        """Run at ``result``'s micro-batch from now on, regrowing to it after a back-off."""
        self.result, self.micro_batch, self._max_micro = result, result.micro_batch, None
        if self._runner is not None:
            self._runner.micro = self._runner.max_micro = result.micro_batch
        return result

    def _probe_batch(self, batch: Any, n: int) -> None:
        """The first call's probe: the batch's own samples, the largest first."""
        if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
            data: Any = tuple(batch)
        else:
            data = _Samples(batch, n)
        world = self._group.world_size if self._group is not None else 1
        self.probe(as_source(data), target_batch=n * world)

    # -- one step -------------------------------------------------------------------------------------
    def __call__(self, batch: Any) -> StepReport:
        """Run one optimizer step over exactly the samples of ``batch`` (this rank's share of the step).

        Returns:
            A :class:`StepReport`, which reads as the step's loss.

        Raises:
            NoBatchFitsError: not even the smallest micro-batch fits.
            OptimizerStepError: ``optimizer.step()`` ran out of memory after every micro-step fitted.
            NonFiniteLossError: the loss was NaN or infinite in several steps in a row.
        """
        try:
            n = batch_size_of(batch)
        except TypeError:
            raise UsageTypeError(
                f"Expected `batch` to be a collated batch (tensors, or a tuple or dict of them, samples "
                f"along the first dimension), but got {type(batch).__name__}."
            ) from None
        if n < 1:
            raise UsageValueError("Expected `batch` to hold at least one sample, but got an empty batch.")
        check_sample_dimension(list(iter_tensors(batch)), "batch", n)
        with cpu_threads(self.options.memory.cpu_threads, self.device, say=self._runner is None):
            runner = self._runner or self._start(batch, n)
            samples = n if self._group is None else int(self._group.sum([n])[0])
            before, skipped = len(runner.backoffs), runner.skipped_steps
            with self.memory.capped():
                loss = runner.optimizer_step(_Batch(batch, n), samples)
        self.micro_batch = runner.micro
        sizes = tuple(b - a for a, b in chunk_bounds(runner.last_micro, n, min(self.floor, n)))
        return StepReport(loss, sizes, tuple(runner.backoffs[before:]), runner.skipped_steps == skipped)

    def _start(self, batch: Any, n: int) -> StepRunner:
        """The first call: the process group, the probe (unless told the micro-batch), the runner."""
        self._group = distributed.setup(self.device)
        if self._group is not None and self.ddp is None:
            self._group.broadcast_parameters(self.model)  # every rank starts from rank 0's weights
        if self.micro_batch is None:
            self._probe_batch(batch, n)
        assert self.micro_batch is not None
        self._carried.enter_context(self.memory.carried())  # memory carries from step to step, as a GPU's
        self._runner = StepRunner(
            self._stepper,
            self.memory,
            self.micro_batch,
            floor=self.floor,
            group=self._group,
            ddp=self.ddp,
            sync_buffers=self._group is not None
            and (self.ddp is None or distributed.syncs_buffers(self.ddp)),
            num_items=self.options.train.num_items,
            regrow_after=self.options.train.regrow_after,
            fixed_bytes=self.result.fixed_bytes if self.result is not None else None,
            scheduler=self.scheduler,
        )
        if self._max_micro is not None:
            self._runner.max_micro = max(self._max_micro, self.micro_batch)
            self._runner.clean_steps = self._clean_steps
        return self._runner

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The GradScaler's state and the micro-batch (with the largest it regrows to, and the clean steps
        since its last back-off): what a checkpoint needs to resume this step as it would have gone on."""
        runner = self._runner
        if runner is None:
            largest, clean = self._max_micro or self.micro_batch, self._clean_steps
        else:
            largest, clean = runner.max_micro, runner.clean_steps
        return {
            "scaler": self.scaler.state_dict(),
            "micro_batch": runner.micro if runner is not None else self.micro_batch,
            "max_micro_batch": largest,
            "clean_steps": clean,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`'s ``state`` (the scaler's scale and growth, the micro-batch)."""
        if not isinstance(state, dict) or "scaler" not in state:
            raise UsageTypeError(
                "Expected `state` to be what TrainStep.state_dict() returned, but got "
                f"{type(state).__name__}."
            )
        self.scaler.load_state_dict(state["scaler"])
        micro, largest = state.get("micro_batch"), state.get("max_micro_batch")
        if micro is not None:
            self.micro_batch, self._max_micro = int(micro), int(largest or micro)
            self._clean_steps = int(state.get("clean_steps", 0))
            if self._runner is not None:
                self._runner.micro, self._runner.max_micro = self.micro_batch, self._max_micro
                self._runner.clean_steps = self._clean_steps

    @property
    def steps(self) -> int:
        """Optimizer steps run so far."""
        return self._runner.steps if self._runner is not None else 0

    @property
    def backoffs(self) -> list[Backoff]:
        """Every out-of-memory back-off so far (the step, the micro-batch from and to)."""
        return list(self._runner.backoffs) if self._runner is not None else []
