"""The training loop of :func:`autobatch.fit`: epochs of optimizer steps of exactly the target batch.

Each epoch orders the samples (shuffled, or the DataLoader's sampler), cuts them into optimizer steps of
the target batch and, under torchrun, each step into per-rank shares; each step's samples are read once
(:mod:`autobatch.step.reading`: a failure there is tried again and never backs the micro-batch off) and run
by the :class:`~autobatch.training.runner.StepRunner`, which accumulates the step's micro-batches, backs off
and redoes it on out-of-memory, and regrows after clean steps.

BatchNorm models never get a micro-batch, nor a rank's share, of one sample (BatchNorm cannot train on
one): a lone last sample of an epoch joins the step before it, and a chunk of one joins its neighbour.
"""

from __future__ import annotations

import time
import warnings

import torch

from autobatch import distributed
from autobatch.planner import Plan
from autobatch.result import Backoff
from autobatch.session import Session
from autobatch.step.reading import StepReader
from autobatch.step.stepper import Stepper, batchnorm_layers
from autobatch.training.progress import batch_label, epoch_bar
from autobatch.training.runner import NONFINITE_STREAK, StepRunner

__all__ = ["NONFINITE_STREAK", "TrainLoop", "epoch_steps", "warn_batchnorm"]


def epoch_steps(order: list[int], target: int, *, drop_last: bool, floor: int) -> list[list[int]]:
    """The optimizer steps of one epoch: ``target`` indices each, every index once.

    A last step below ``floor`` (a lone sample of a BatchNorm model) joins the step before it.

    Example:
        >>> [len(s) for s in epoch_steps(list(range(65)), 32, drop_last=False, floor=2)]
        [32, 33]
    """
    steps = [order[i : i + target] for i in range(0, len(order), target)]
    if drop_last and steps and len(steps[-1]) < target:
        steps.pop()
    if len(steps) >= 2 and len(steps[-1]) < floor:
        last = steps.pop()
        steps[-1] = steps[-1] + last
    return steps


class TrainLoop:
    """Runs epochs of accumulated optimizer steps; used by :func:`autobatch.fit`.

    Args:
        session: the started session (model, data, group, scheduler, options).
        stepper: the step function, bound to model, optimizer, scaler and device memory.
        micro_batch: the micro-batch to start with (the probed one); never exceeded.
        fixed_bytes: the memory a step needs whatever its batch, from the probe's memory model (``None``:
            the model state is taken instead); back-offs are measured with it.
    """

    def __init__(
        self, session: Session, stepper: Stepper, micro_batch: int, fixed_bytes: float | None = None
    ) -> None:
        train = session.options.train
        self.session = session
        self.stepper = stepper
        self.group = session.group
        self.world_size = session.group.world_size if session.group is not None else 1
        self.target_batch = train.target_batch
        self.floor = session.floor
        self.runner = StepRunner(
            stepper,
            session.memory,
            micro_batch,
            floor=session.floor,
            group=session.group,
            ddp=session.ddp,
            sync_buffers=session.sync_buffers,
            num_items=train.num_items,
            regrow_after=train.regrow_after,
            fixed_bytes=fixed_bytes,
            scheduler=session.scheduler,
            target_batch=train.target_batch,
            # A failure from the first fitted step on leaves the model where training left it.
            on_step=session.training_began,
        )

    @property
    def plan(self) -> Plan:
        """The plan in force now (the chunks a full step runs)."""
        return self.runner.plan()

    @property
    def micro(self) -> int:
        """The micro-batch in force now."""
        return self.runner.micro

    @property
    def steps(self) -> int:
        return self.runner.steps

    @property
    def samples(self) -> int:
        return self.runner.samples

    @property
    def skipped_steps(self) -> int:
        return self.runner.skipped_steps

    @property
    def nonfinite_steps(self) -> int:
        return self.runner.nonfinite_steps

    @property
    def backoffs(self) -> list[Backoff]:
        return self.runner.backoffs

    @property
    def regrowths(self) -> list[Backoff]:
        return self.runner.regrowths

    # -- epochs ------------------------------------------------------------------------------------
    def run_epoch(self, epoch: int, epochs: int) -> list[float]:
        """Train one epoch (every sample once); returns the epoch's per-step losses."""
        session, train = self.session, self.session.options.train
        self.runner.epoch = epoch
        generator = torch.Generator().manual_seed(session.order_seed + epoch)
        order = session.source.epoch_order(train.shuffle, generator, epoch)
        steps = epoch_steps(order, self.target_batch, drop_last=train.drop_last, floor=self.floor)
        session.model.train()
        sizes = [len(step) for step in steps]
        if self.group is not None:
            steps = [distributed.share(s, self.group.rank, self.world_size, self.floor) for s in steps]
        losses: list[float] = []
        started = time.perf_counter()
        samples = 0
        progress = train.progress if session.is_main else False
        with epoch_bar(len(steps), f"epoch {epoch + 1}/{epochs}", progress) as bar:
            reader = StepReader(session.source, [step for step in steps if step])
            for index, (step, size) in enumerate(zip(steps, sizes, strict=True)):
                data, failure = None, None
                if step:
                    try:
                        data = reader.read(self.runner.where())
                    except Exception as exc:  # a failing dataset on one rank must stop every rank
                        failure = exc
                losses.append(self.runner.optimizer_step(data, size, failure))
                del data
                samples += size
                bar.update(1)
                if not bar.disable and (index % 10 == 0 or index == len(steps) - 1):
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(
                        batch=batch_label(self.plan),
                        loss=f"{losses[-1]:.4f}",
                        samples_s=f"{samples / elapsed:,.0f}",
                        oom=len(self.backoffs),
                        refresh=False,
                    )
        return losses


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
