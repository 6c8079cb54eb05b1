"""A Lightning module around the tiny BERT of :mod:`tests.integrations.hf_helpers`, and a callback that
counts each optimizer step's samples from outside: shared by the tests and their ranks.

Imports lightning (and transformers, for the model): import it where both are installed only.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover
    import pytorch_lightning as pl  # type: ignore[no-redef]

from tests.hf_fixtures import padding_collator
from tests.integrations.hf_helpers import bert

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)


class BertModule(pl.LightningModule):
    """BERT on a list of samples, SGD; its train loader reads ``self.batch_size``. ``oom_at``: its
    training_step runs out of memory at the second micro-batch of that (0-based) optimizer step."""

    def __init__(self, samples: list[Any], batch_size: int = 32, oom_at: int | None = None, **loader: Any):
        super().__init__()
        self.model = bert()
        self.samples, self.batch_size, self.oom_at, self.loader = samples, batch_size, oom_at, loader

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.oom_at is not None and self.trainer.global_step == self.oom_at and batch_idx % 2 == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        options = {"shuffle": False, **self.loader}
        return torch.utils.data.DataLoader(
            self.samples, batch_size=self.batch_size, collate_fn=padding_collator(), **options
        )


class StepSamples(pl.Callback):
    """The samples of every optimizer step, counted in the batches the loop hands the module."""

    def __init__(self) -> None:
        self.pending, self.steps = 0, []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.pending += len(batch["labels"])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps.append(self.pending)
        self.pending = 0


def trainer(callbacks: list[Any], accumulate: int = 1, **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    settings.update(kwargs)
    return pl.Trainer(**settings)
