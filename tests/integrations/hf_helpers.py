"""Tiny Hugging Face models from configs (dropout off, for exact comparisons), quiet CPU arguments, and
callbacks that watch a Trainer from outside: shared by the tests and their ranks.

Imports transformers: import it where transformers is installed only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainingArguments

from tests.hf_fixtures import bert_classifier, gpt2_lm

LIMIT = "8MiB"
"""Where a step of 32 of the skewed samples does not fit whole (BERT probes 9, GPT-2 2)."""


def bert(seed: int = 0) -> nn.Module:
    """A 2-layer, 32-wide BERT classifier (its loss ignores ``num_items_in_batch``), dropout off."""
    return bert_classifier(seed=seed, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer, 32-wide GPT-2 causal LM (its loss divides by ``num_items_in_batch`` from transformers 4.48;
    before, its forward takes no loss keywords and the Trainer passes none), dropout off."""
    return gpt2_lm(seed=seed, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def arguments(output_dir: Path, per_device: int = 8, accumulation: int = 4, **overrides: Any) -> Any:
    """TrainingArguments for an exact, quiet CPU run: SGD at a constant rate, no clipping, no saving, a log
    line per step, 2 epochs."""
    settings: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        num_train_epochs=2,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Watch(TrainerCallback):
    """Counts, from outside the trainer, the samples of the forwards with gradients that each applied
    optimizer step took (a probe's steps and the forwards without gradients are not counted), and the
    callbacks the Trainer calls."""

    def __init__(self) -> None:
        self.step_samples: list[int] = []
        self.step_ends = self.optimizer_steps = self.begins = 0
        self._pending: list[int] = []
        self._closed: list[int] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begins += 1
        model, optimizer = kwargs["model"], kwargs["optimizer"]
        model.register_forward_pre_hook(self._forward, with_kwargs=True)
        getattr(optimizer, "optimizer", optimizer).register_step_post_hook(self._stepped)

    def _forward(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if torch.is_grad_enabled() and module.training:
            self._pending.append(int(kwargs["input_ids"].shape[0]))

    def _stepped(self, *_: Any) -> None:  # any step of the torch optimizer: the probe's too
        self._closed, self._pending = self._pending, []

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.optimizer_steps += 1  # the Trainer's own steps only
        self.step_samples.append(sum(self._closed))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_ends += 1


def inject_oom(trainer: Any, step: int, call: int = 2, rank: int | None = None) -> dict[str, int]:
    """Make the trainer's loss run out of memory once: at its ``call``-th micro-batch with gradients
    during optimizer step ``step`` (0-based global step), on ``rank`` only when given."""
    original, fired = trainer.compute_loss, {"calls": 0, "fired": 0}

    def compute_loss(model: nn.Module, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        here = rank is None or torch.distributed.get_rank() == rank
        if here and trainer.state.global_step == step and torch.is_grad_enabled() and not fired["fired"]:
            fired["calls"] += 1
            if fired["calls"] == call:
                fired["fired"] = 1
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return fired


def losses(trainer: Any) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
