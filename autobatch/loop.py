"""The training loop: optimizer steps of exactly the target batch, accumulated from micro-batches.

Each optimizer step holds its whole effective batch on the host, splits it into the plan's chunks and
runs :class:`~autobatch.step.Stepper` on each, weighting every micro-loss by its share of the batch (its
samples, or its items with ``num_items``), so that the accumulated gradient equals the gradient of the
whole batch even for uneven chunks. When a micro-step runs out of memory, the step's gradients are
dropped, the micro-batch is halved and the same step is redone from its first sample: nothing from the
partial step is applied, and no sample is lost or seen twice. After ``regrow_after`` clean steps the
micro-batch grows back towards the probed size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from autobatch import distributed
from autobatch.data import DataSource, batch_size_of, slice_batch
from autobatch.memory import DeviceMemory
from autobatch.oom import is_oom, release_memory, run_shrinking
from autobatch.plan import Plan, plan
from autobatch.result import Backoff
from autobatch.step import Stepper, batchnorm_layers, smallest_batch

__all__ = ["NumItemsFn", "TrainLoop"]

logger = logging.getLogger(__name__)

NumItemsFn = Callable[[Any], int | float | torch.Tensor]


@functools.lru_cache(maxsize=64)
def _chunk_bounds(micro: int, n: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of each micro-batch of a step of ``n`` samples (cached: the same every step)."""
    bounds, start = [], 0
    for size in plan(micro, n).chunks:
        bounds.append((start, start + size))
        start += size
    return tuple(bounds)


class TrainLoop:
    """Runs epochs of accumulated optimizer steps; used by :func:`autobatch.fit`.

    Args:
        stepper: the shared step function, bound to model, optimizer, scaler and device memory.
        source: the training data.
        target_batch: the effective batch of every optimizer step.
        micro_batch: the micro-batch to start with (the probed one); never exceeded.
        num_items: ``num_items(batch)`` counts the items a micro-loss averages over (e.g. non-padding
            tokens); micro-losses are then weighted by items instead of samples.
        scheduler: an LR scheduler stepped once per applied optimizer step.
        regrow_after: clean optimizer steps after a back-off before the micro-batch grows again.
        progress: tqdm bars: ``None`` shows them on a TTY only.
        group: the data-parallel ranks (``None`` in one process); see :mod:`autobatch.distributed`.
        ddp: the DDP wrapper whose ``no_sync()`` holds each micro-step's gradients local.
        sync_buffers: broadcast rank 0's buffers after every step (DDP's ``broadcast_buffers``).
    """

    def __init__(
        self,
        stepper: Stepper,
        source: DataSource,
        *,
        target_batch: int,
        micro_batch: int,
        num_items: NumItemsFn | None = None,
        scheduler: Any = None,
        regrow_after: int = 50,
        progress: bool | None = None,
        group: distributed.Group | None = None,
        ddp: Any = None,
        sync_buffers: bool = False,
    ) -> None:
        self.stepper = stepper
        self.group = group
        self.ddp = ddp
        self.sync_buffers = sync_buffers
        self.world_size = group.world_size if group is not None else 1
        self.source = source
        self.target_batch = target_batch
        self.max_micro = micro_batch
        self.micro = micro_batch
        self.num_items = num_items
        self.scheduler = scheduler
        self.regrow_after = regrow_after
        self.progress = progress
        self.skipped_steps = 0
        self.steps = 0
        self.samples = 0
        self.backoffs: list[Backoff] = []
        self.regrowths: list[Backoff] = []
        self._clean_steps = 0
        self._epoch = 0
        self._floor = smallest_batch(stepper.model)  # never back off below it

    @property
    def plan(self) -> Plan:
        """The plan in force now."""
        return plan(self.micro, self.target_batch, self.world_size)

    @property
    def memory(self) -> DeviceMemory:
        return self.stepper.memory

    # -- one optimizer step ------------------------------------------------------------------------
    def _weights(self, parts: list[Any], samples: int, items: float | None) -> list[float]:
        """Each micro-loss's share of the whole (global) step: its samples, or its items."""
        if self.num_items is None:
            return [batch_size_of(p) / samples for p in parts]
        assert items is not None  # counted by optimizer_step whenever num_items is set
        return [float(self.num_items(p)) / items for p in parts]

    def _count_items(self, host: Any) -> float:
        """The items (e.g. non-padding tokens) of the whole step, over all ranks."""
        assert self.num_items is not None
        items = float(self.num_items(host)) if host is not None else 0.0
        if self.group is not None:
            items = self.group.sum([items])[0]
        if items <= 0:
            raise ValueError(
                f"Expected `num_items` to count at least one item in a step, but it counted {items}."
            )
        return items

    def _accumulate(
        self, host: Any, micro: int, samples: int | None = None, items: float | None = None
    ) -> tuple[torch.Tensor, bool]:
        """Run one optimizer step over ``host`` in chunks of at most ``micro``; returns (loss, applied).

        ``samples`` and ``items`` count the whole step over all ranks; ``host`` is this rank's share
        (``None`` when the last, short step left this rank nothing).
        """
        n = batch_size_of(host) if host is not None else 0
        parts = [slice_batch(host, a, b) for a, b in _chunk_bounds(micro, n)] if n else []
        if self.num_items is not None and items is None:
            items = self._count_items(host)
        weights = self._weights(parts, samples if samples is not None else n, items)
        measure = (
            self.memory.measure(self.stepper.state_tensors())
            if self.memory.emulated
            else contextlib.nullcontext()
        )
        out_of_memory = False
        with measure:
            try:
                with distributed.no_sync(self.ddp):
                    for part, weight in zip(parts, weights, strict=True):
                        self.stepper.backward(part, weight)
            except Exception as exc:
                if self.group is None or not is_oom(exc):
                    raise
                out_of_memory = True  # raised again below, once every rank knows
            if self.group is not None:
                ooms, loss = self.group.sum([float(out_of_memory), self.stepper.pending_loss()])
                if ooms:
                    raise torch.OutOfMemoryError(
                        f"out of memory on {int(ooms)} of {self.group.world_size} ranks; all back off"
                    )
                self.group.sum_gradients([p for p in self.stepper.model.parameters() if p.requires_grad])
            applied = self.stepper.step()
        if self.group is not None:
            if self.sync_buffers:
                self.group.broadcast_buffers(self.stepper.model)
            return torch.tensor(loss), applied
        if self.stepper.last_loss is None:  # pragma: no cover - a step always has a micro-step here
            raise RuntimeError("the training step ran no micro-step")
        return self.stepper.last_loss, applied

    def _release(self) -> None:
        self.stepper.reset_after_oom()
        release_memory(self.stepper.model, self.stepper.optimizer)

    def _backed_off(self, old: int, new: int) -> None:
        self.backoffs.append(Backoff(self._epoch, self.steps, old, new))
        self._clean_steps = 0
        logger.warning(
            "out of memory at micro-batch %d (epoch %d, step %d): redoing the step with %d; plan %s",
            old,
            self._epoch + 1,
            self.steps + 1,
            new,
            plan(new, self.target_batch, self.world_size).describe(),
        )

    def optimizer_step(self, host: Any, samples: int | None = None) -> torch.Tensor:
        """One optimizer step over a whole effective batch, backing off on out-of-memory.

        Args:
            host: the step's batch on the host (this rank's share of it under DDP; may be ``None``).
            samples: the step's samples over all ranks (default: the size of ``host``).
        """
        n = samples if samples is not None else batch_size_of(host)
        items = self._count_items(host) if self.num_items is not None else None
        # Every rank starts from the same micro-batch, so that all back off alike.
        first_try = min(self.micro, -(-n // self.world_size))
        (loss, applied), used = run_shrinking(
            lambda micro: self._accumulate(host, micro, n, items),
            first_try,
            release=self._release,
            on_shrink=self._backed_off,
            what="training step",
            floor=min(self._floor, first_try),
        )
        if used < first_try:
            self.micro = used
        self.steps += 1
        self.samples += n
        if applied:
            if self.scheduler is not None:
                self.scheduler.step()
        else:
            self.skipped_steps += 1
        self._clean_steps += 1
        if self.micro < self.max_micro and self._clean_steps >= self.regrow_after:
            grown = min(self.max_micro, 2 * self.micro)
            self.regrowths.append(Backoff(self._epoch, self.steps, self.micro, grown))
            logger.info("micro-batch %d → %d after %d clean steps", self.micro, grown, self._clean_steps)
            self.micro, self._clean_steps = grown, 0
        return loss

    # -- epochs ------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int, epochs: int, order: list[int], *, drop_last: bool = False) -> list[float]:
        """Train one epoch over ``order`` (every index once); returns the epoch's per-step losses."""
        self._epoch = epoch
        steps = [order[i : i + self.target_batch] for i in range(0, len(order), self.target_batch)]
        if drop_last and steps and len(steps[-1]) < self.target_batch:
            steps.pop()
        self.stepper.model.train()
        sizes = [len(step) for step in steps]
        if self.group is not None:
            steps = [distributed.share(step, self.group.rank, self.world_size) for step in steps]
        losses: list[torch.Tensor] = []
        started = time.perf_counter()
        samples = 0
        with tqdm(
            total=len(steps),
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            disable=None if self.progress is None else not self.progress,
            leave=True,
        ) as bar:
            batches = self.source.loader([step for step in steps if step])
            for index, (step, size) in enumerate(zip(steps, sizes, strict=True)):
                host = next(batches) if step else None
                loss = self.optimizer_step(host, size)
                losses.append(loss)
                samples += size
                bar.update(1)
                if not bar.disable and (index % 10 == 0 or index == len(steps) - 1):
                    current = self.plan
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        batch=f"{current.micro_batch}×{current.accumulation_steps}={current.effective_batch}",
                        loss=f"{loss.item():.4f}",  # a device sync, only when the bar is shown
                        samples_s=f"{samples / elapsed:,.0f}",
                        oom=len(self.backoffs),
                        refresh=False,
                    )
        history = torch.stack(losses).tolist() if losses else []
        return [float(x) for x in history]


def warn_batchnorm(model: torch.nn.Module, current: Plan) -> None:
    """Warn once when BatchNorm layers will see micro-batches smaller than the effective batch."""
    if current.accumulation_steps <= 1:
        return
    norms = batchnorm_layers(model)
    if norms:
        warnings.warn(
            f"{len(norms)} BatchNorm layer(s) compute batch statistics over micro-batches of at most "
            f"{current.micro_batch} samples, not over the effective batch of {current.effective_batch}; "
            "gradients are exact, running statistics are not. Consider GroupNorm or LayerNorm if "
            "this matters.",
            UserWarning,
            stacklevel=3,
        )
