"""What :class:`~autobatch.integrations.transformers.AutoBatchTrainer` reads from the Trainer's arguments
and batches: what it refuses, the loop's arguments, how a micro-loss weighs, and one step's samples.

Imports transformers only through the trainer object it is handed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from autobatch._tree import batch_size_of, map_tensors
from autobatch.errors import UsageValueError
from autobatch.step.data import StepData

__all__ = [
    "StepSamples",
    "check_arguments",
    "loop_arguments",
    "loss_uses_num_items",
    "mean_items",
    "probe_data",
    "tokens_counted",
]


def check_arguments(args: Any) -> None:
    """Refuse the ``TrainingArguments`` a Trainer cannot take one exact step at a time with: each reason
    says what to change."""
    reasons = []
    if args.auto_find_batch_size:
        reasons.append(
            "`auto_find_batch_size=True`: AutoBatchTrainer finds the micro-batch itself and keeps the "
            "effective batch, which auto_find_batch_size shrinks. Drop it"
        )
    if getattr(args, "deepspeed", None):
        reasons.append("DeepSpeed (`deepspeed=`): its engine runs the backward and the accumulation itself")
    if getattr(args, "fsdp", None):
        reasons.append("FSDP (`fsdp=`): its sharded gradients are reduced by FSDP, not per step by autobatch")
    if getattr(args, "parallelism_config", None) is not None or (getattr(args, "tp_size", 0) or 0) > 1:
        reasons.append("tensor, context or sequence parallelism: autobatch runs data parallelism only")
    if args.n_gpu > 1:
        reasons.append(
            f"`DataParallel` over the {args.n_gpu} GPUs of one process: launch one process per GPU with "
            "torchrun"
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if "lomo" in optim or "layerwise" in optim:
        reasons.append(f"`optim={optim!r}`: it steps inside the backward, so a step cannot be redone")
    if getattr(args, "past_index", -1) >= 0:
        reasons.append("`past_index`: the model's memories carry from one batch to the next")
    if getattr(getattr(args, "accelerator_config", None), "split_batches", False):
        reasons.append("`accelerator_config.split_batches=True`: autobatch gives each rank its share itself")
    if reasons:
        raise UsageValueError(f"AutoBatchTrainer cannot train with {reasons[0]}.")


def loop_arguments(args: Any, per_rank: int) -> Any:
    """A copy of ``args`` for the Trainer's loop: one loader item of ``per_rank`` samples per optimizer
    step, no accumulation of its own; the step's items counted over the ranks by autobatch itself, and the
    input tokens counted per micro-batch by it too (the loader's items are not batches)."""
    loop = copy.copy(args)
    loop.per_device_train_batch_size = per_rank
    loop.gradient_accumulation_steps = 1
    if hasattr(loop, "average_tokens_across_devices"):
        loop.average_tokens_across_devices = False
    seen = loop.include_num_input_tokens_seen
    loop.include_num_input_tokens_seen = False if isinstance(seen, bool) else "no"
    return loop


def tokens_counted(batch: Any, mode: Any, main_input: str, pad_id: int | None) -> int:
    """The input tokens of a collated micro-batch, as ``include_num_input_tokens_seen`` counts them (``True``
    or ``"all"``: every position; ``"non_padding"``: the attention mask's, else the non-pad ids)."""
    inputs = batch.get(main_input) if isinstance(batch, Mapping) else None
    if mode in (False, "no", None) or not isinstance(inputs, torch.Tensor):
        return 0
    if mode == "non_padding":
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        if pad_id is not None:
            return int((inputs != pad_id).sum())
    return inputs.numel()


class StepSamples(StepData):
    """One optimizer step's samples: each micro-batch collated on its own by the Trainer's collator, and
    what the last attempt's micro-batches held recorded (their sizes, FLOPs and input tokens)."""

    def __init__(self, trainer: Any, samples: list[Any]) -> None:
        super().__init__(None, samples, len(samples))  # type: ignore[arg-type]
        self.trainer = trainer
        self._seen: list[tuple[int, float, int]] = []
        model = trainer.model
        self._tokens = (
            trainer.user_args.include_num_input_tokens_seen,
            getattr(model, "main_input_name", "input_ids"),
            getattr(trainer.processing_class, "pad_token_id", None),
        )

    def collate(self, start: int, stop: int) -> Any:
        batch = self.trainer.data_collator(self.samples[start:stop])
        if start == 0:  # an attempt begins (a redone step collates its micro-batches again)
            self._seen = []
        flos = float(self.trainer.floating_point_ops(batch))
        self._seen.append((stop - start, flos, tokens_counted(batch, *self._tokens)))
        return batch

    def sizes(self) -> tuple[int, ...]:
        return tuple(n for n, _, _ in self._seen)

    def flos(self) -> float:
        return math.fsum(f for _, f, _ in self._seen)

    def tokens(self) -> int:
        return sum(t for _, _, t in self._seen)


def _is_causal(module: nn.Module) -> bool:
    """Whether the Trainer treats ``module`` as a causal LM (its loss shifts the labels)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(module).__name__.startswith("Peft"):
        module = getattr(getattr(module, "base_model", module), "model", module)
    return module._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def mean_items(module: nn.Module) -> Callable[[Any], int]:
    """``num_items`` for a loss that is a mean over its own micro-batch: the labels that are not -100
    (shifted for a causal LM, as its loss shifts them; ``shift_labels`` where the collator made them),
    else the samples (float labels: a regression or multi-label loss averages over samples)."""
    causal = _is_causal(module)

    def items(batch: Any) -> int:
        labels = None
        if isinstance(batch, Mapping):
            if isinstance(batch.get("shift_labels"), torch.Tensor):
                return int(batch["shift_labels"].ne(-100).sum())
            labels = batch.get("labels")
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point():
            return batch_size_of(batch)
        if causal and labels.ndim >= 2:
            labels = labels[..., 1:]
        return int(labels.ne(-100).sum())

    return items


def loss_uses_num_items(
    trainer: Any, module: nn.Module, batch: Any, count: float, device: torch.device
) -> bool:
    """Whether the Trainer's loss of ``batch`` divides by ``num_items_in_batch``: it is computed with
    ``count`` and with twice it (no gradients, the same random numbers). Half the loss: it divides; the
    same: it ignores it (``False`` too where the loss is 0 or not finite, and nothing can be told).

    Raises:
        UsageValueError: the loss changes otherwise (a ``compute_loss`` that scales it another way).
    """
    if not count > 0:
        return False
    inputs = map_tensors(lambda t: t.to(device), batch)
    losses = []
    with torch.no_grad(), trainer.compute_loss_context_manager():
        for n in (count, 2 * count):
            with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device.index or 0]):
                torch.manual_seed(0)
                items = torch.tensor(n, device=device)
                losses.append(float(trainer.compute_loss(module, dict(inputs), num_items_in_batch=items)))
    if not all(math.isfinite(v) and v != 0 for v in losses):
        return False
    ratio = losses[0] / losses[1]
    if math.isclose(ratio, 2.0, rel_tol=1e-3):
        return True
    if math.isclose(ratio, 1.0, rel_tol=1e-3):
        return False
    raise UsageValueError(
        f"Expected the loss to ignore `num_items_in_batch` or to divide by it, but doubling it changed the "
        f"loss by a factor {1 / ratio:.4g}: AutoBatchTrainer cannot weigh such a loss exactly. Make "
        "compute_loss divide its sum by num_items_in_batch, or ignore it and return a mean."
    )


class _Collate:
    """The probe's collate: the train loader's own (column removal), then the Trainer's collator."""

    def __init__(self, collator: Callable[[list[Any]], Any], pick: Callable[[list[Any]], Any]) -> None:
        self.collator, self.pick = collator, pick

    def __call__(self, samples: list[Any]) -> Any:
        return self.collator(self.pick(samples))


def probe_data(loader: Any, collator: Callable[[list[Any]], Any], first: list[Any]) -> DataLoader[Any]:
    """What the probe reads its largest samples from: the train loader's dataset (with its column
    removal), or the first step's samples when the dataset cannot be indexed (an iterable one)."""
    dataset = getattr(loader, "dataset", None)
    indexable = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    if dataset is not None and indexable and not isinstance(dataset, IterableDataset):
        return DataLoader(dataset, collate_fn=_Collate(collator, loader.collate_fn))
    return DataLoader(first, collate_fn=_Collate(collator, list))  # type: ignore[arg-type]
