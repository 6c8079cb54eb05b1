"""``AutoBatch``: a Lightning callback that probes the module's own step before training, then sets its
batch size and ``accumulate_grad_batches`` so that every optimizer step sees exactly the target batch.

In ``on_fit_start`` — after the strategy set up the model on its device (wrapped for DDP), called
``configure_optimizers`` and connected the precision plugin, before the fit loop asks for the train
loader — the callback probes the ``LightningModule``'s ``training_step`` with the Trainer's optimizer, its
precision plugin's autocast and GradScaler and its gradient clipping, on the largest samples of the train
loader's dataset. Under DDP every rank probes its own copy and all agree on the tightest rank's answer.
It then sets ``batch_size`` (on the module, its hparams or the datamodule) to the largest divisor of the
per-rank target not above the probed micro-batch, and ``trainer.accumulate_grad_batches`` to the rest:
Lightning divides every micro-loss by the accumulation, which is the big batch's gradient only for equal
micro-batches of a mean loss.

An out-of-memory in the middle of training cannot be redone through Lightning's hooks: the micro-batches
accumulated before it were consumed by earlier iterations of its loop. The error propagates, as Lightning
tears down, with a note that says which micro-batch and accumulation to resume with (the callback's
``micro_batch=``). :class:`~autobatch.integrations.transformers.AutoBatchTrainer` and
:class:`autobatch.TrainStep` redo such a step.

Imports ``lightning.pytorch``, or ``pytorch_lightning`` where only that is installed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import parsing
except ImportError:  # pragma: no cover - the older package name, where only it is installed
    import pytorch_lightning as pl  # type: ignore[no-redef]
    from pytorch_lightning.utilities import parsing  # type: ignore[no-redef]

from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.oom import is_oom
from autobatch.options import Options, entry_point
from autobatch.probing.cached import planned_chunks, probe_session
from autobatch.result import ProbeResult
from autobatch.session import resolve
from autobatch.validate import check_positive_int

__all__ = ["AutoBatch", "largest_divisor"]

logger = logging.getLogger(__name__)


def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of ``n`` that is at most ``at_most`` (at least 1).

    Example:
        >>> largest_divisor(32, 7), largest_divisor(16, 16), largest_divisor(30, 7)
        (4, 16, 6)
    """
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


class AutoBatch(pl.Callback):
    """Probe the ``LightningModule``'s step before training; set ``batch_size`` and
    ``accumulate_grad_batches`` so that every optimizer step sees exactly ``target_batch`` samples.

    Args:
        target_batch: the samples of every optimizer step over all ranks (default: the module's
            ``batch_size × accumulate_grad_batches × world_size`` as written: the settings for the GPU you
            wish you had).
        batch_arg_name: the attribute that holds the batch size (module, hparams or datamodule), which the
            train loader reads.

    Example:
        >>> import lightning.pytorch as pl
        >>> from autobatch.integrations.lightning import AutoBatch
        >>> callback = AutoBatch(target_batch=32, memory_limit="2GiB")
        >>> trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", logger=False)  # doctest: +SKIP
    """

    @entry_point("AutoBatch")
    def __init__(
        self, target_batch: int | None = None, batch_arg_name: str = "batch_size", **options: Any
    ) -> None:
        self.options = Options.parse("AutoBatch", options)
        self._given = dict(options)
        self.target_batch = None if target_batch is None else check_positive_int(target_batch, "target_batch")
        if not isinstance(batch_arg_name, str):
            raise UsageTypeError(
                f"Expected `batch_arg_name` to be a str, but got {type(batch_arg_name).__name__}."
            )
        self.batch_arg_name = batch_arg_name
        self.probe_result: ProbeResult | None = None
        """The probe's result (``None`` with ``micro_batch=``)."""
        self.micro_batch: int | None = None
        """The batch size the train loader runs with: a divisor of the per-rank target."""
        self.accumulate: int | None = None
        """``trainer.accumulate_grad_batches`` as set: micro_batch × accumulate × world_size == target."""
        self._per_rank = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check what the callback needs before anything runs: every refusal says what to change."""
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise UsageValueError(
                "AutoBatch needs automatic optimization: it sets Lightning's gradient accumulation, which "
                "manual optimization does not run. Use autobatch.TrainStep inside your training_step instead."
            )
        rivals = [
            type(cb).__name__
            for cb in getattr(trainer, "callbacks", [])
            if isinstance(cb, (pl.callbacks.BatchSizeFinder, pl.callbacks.GradientAccumulationScheduler))
        ]
        if rivals:
            raise UsageValueError(
                f"AutoBatch sets the batch size and accumulate_grad_batches itself, which {rivals[0]} "
                "changes too: drop one of them."
            )
        source = getattr(trainer.fit_loop, "_data_source", None)  # what BatchSizeFinder checks too
        if source is not None and not source.is_module():
            raise UsageValueError(
                "AutoBatch cannot set the batch size of dataloaders passed to trainer.fit(): build the train "
                f"loader in a train_dataloader() method that reads `{self.batch_arg_name}` (the module's or "
                "a LightningDataModule's)."
            )
        if not parsing.lightning_hasattr(pl_module, self.batch_arg_name):
            raise UsageValueError(
                f"AutoBatch sets `{self.batch_arg_name}` for the train loader, but neither the module, its "
                "hparams nor the datamodule has it: add it and read it in train_dataloader(), or pass "
                "batch_arg_name=."
            )
        world = trainer.world_size
        target = self.target_batch
        if target is None:
            written: Any = parsing.lightning_getattr(pl_module, self.batch_arg_name)
            target = int(written) * trainer.accumulate_grad_batches
            target *= world
        if target % world:
            raise UsageValueError(
                f"Expected `target_batch` to be a multiple of the {world} ranks (every rank takes an equal "
                f"share of each step), but got {target}."
            )
        self.target_batch, self._per_rank = target, target // world

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the module's step (unless ``micro_batch=`` was given); set the batch and accumulation."""
        micro = self.options.train.micro_batch
        if micro is None:
            self.probe_result = self._probe(trainer, pl_module)
            micro = self.probe_result.micro_batch
        self.micro_batch = largest_divisor(self._per_rank, micro)
        self.accumulate = self._per_rank // self.micro_batch
        parsing.lightning_setattr(pl_module, self.batch_arg_name, self.micro_batch)
        trainer.accumulate_grad_batches = self.accumulate
        logger.info(
            "AutoBatch: micro-batch %d × %d accumulated × %d rank(s) = %d per optimizer step%s",
            self.micro_batch,
            self.accumulate,
            trainer.world_size,
            self.target_batch,
            f" (probed {micro}: the largest divisor of {self._per_rank} below it)"
            if micro != self.micro_batch
            else "",
        )

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeResult:
        datamodule = getattr(trainer, "datamodule", None)
        source = datamodule if datamodule is not None else pl_module
        loader = source.train_dataloader()
        if not isinstance(loader, torch.utils.data.DataLoader):
            raise UsageTypeError(
                f"Expected train_dataloader() to return a DataLoader (AutoBatch probes its dataset), but it "
                f"returned {type(loader).__name__}."
            )
        plugin = trainer.precision_plugin
        if len(trainer.optimizers) != 1:
            raise UsageValueError(
                f"Expected configure_optimizers() to return one optimizer, but it returned "
                f"{len(trainer.optimizers)}: automatic optimization steps one."
            )

        def step_fn(model: Any, batch: Any) -> torch.Tensor:
            with plugin.train_step_context():
                output = model.training_step(batch, 0)
            loss = output.get("loss") if isinstance(output, Mapping) else output
            if loss is None:
                raise UsageValueError("Expected training_step to return the loss (or a dict with 'loss').")
            return loss

        options = {k: v for k, v in self._given.items() if k != "micro_batch"}
        options.update(
            optimizer=trainer.optimizers[0],
            step_fn=step_fn,
            precision="fp32",  # the plugin's autocast runs inside step_fn
            grad_clip=trainer.gradient_clip_val or None,
        )
        scaler = getattr(plugin, "scaler", None)
        if scaler is not None:
            options["scaler"] = scaler
        data = torch.utils.data.DataLoader(loader.dataset, collate_fn=loader.collate_fn)
        session = resolve(pl_module, data, Options.parse("probe", options))
        with _silenced(pl_module), session.start():
            return probe_session(
                session, cap=self._per_rank, chunks=planned_chunks(self._per_rank, session.floor)
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Say where the last step of an epoch is not exact: Lightning divides a short step's micro-losses
        by the full accumulation too."""
        batches = trainer.num_training_batches
        if self.accumulate and isinstance(batches, int) and batches % self.accumulate:
            whole = batches - batches % self.accumulate
            pl.utilities.rank_zero.rank_zero_warn(
                f"AutoBatch: an epoch of {batches} micro-batches of {self.micro_batch} is not a multiple of "
                f"the {self.accumulate} accumulated per step: Lightning divides the last step's "
                f"{batches % self.accumulate} micro-loss(es) by {self.accumulate} too, so that step's "
                "gradient is not its samples' mean. For exact steps, give each rank a multiple of "
                f"{self._per_rank} samples, or train on whole steps only: "
                f"Trainer(limit_train_batches={whole})."
            )

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """An out-of-memory during training: add a note saying what to resume with."""
        if not is_oom(exception) or self.micro_batch is None:
            return
        smaller = largest_divisor(self._per_rank, max(1, self.micro_batch - 1))
        note = (
            f"autobatch: training ran out of memory at micro-batch {self.micro_batch} × "
            f"{self.accumulate} accumulated (step {trainer.global_step + 1}). Lightning cannot redo a step "
            "whose micro-batches it has already consumed. Resume from your last checkpoint with "
            f"AutoBatch(target_batch={self.target_batch}, micro_batch={smaller}) (accumulate_grad_batches="
            f"{self._per_rank // smaller}), or probe with a margin (AutoBatch(..., margin=0.1))."
        )
        if hasattr(exception, "add_note"):
            exception.add_note(note)
        else:  # Python 3.10
            logger.error(note)


@contextlib.contextmanager
def _silenced(module: Any) -> Iterator[None]:
    """``self.log`` raises outside Lightning's loop: the probe runs ``training_step`` with it silenced."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)
