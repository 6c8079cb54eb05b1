"""``AutoBatchTrainer``: the Hugging Face ``Trainer``, every optimizer step exactly the target batch, in
micro-batches that fit.

Write the ``TrainingArguments`` for the GPU you wish you had: the target is ``per_device_train_batch_size
× gradient_accumulation_steps × world_size`` (or ``target_batch=``). The Trainer's loop then runs with one
optimizer step per item of its train loader — its own loader (sampler, seed, workers, sharding across
ranks, column removal) handing over each step's samples uncollated, ``gradient_accumulation_steps=1`` —
so that everything it does per step (callbacks, ``global_step``, ``epoch``, the scheduler, logging,
checkpoints, ``max_steps``, skipping data on resume) happens exactly once per step. ``training_step`` runs
the step's micro-batches through autobatch's transaction (:class:`~autobatch.training.runner.StepRunner`):
each collated on its own by the Trainer's collator (padding per micro-batch), the loss from the Trainer's
``compute_loss`` (its accelerator's autocast; its GradScaler for the backward), accumulated with the
weights of one big batch; an out-of-memory backs off and redoes the step. The Trainer's loop then clips,
steps its optimizer (guarded by the transaction's last phase: an out-of-memory that changed nothing is
tried once more) and its scheduler, and logs, once.

The gradient is the one big batch's whether or not the model's loss uses ``num_items_in_batch`` (it is
tried once, with the step's count and twice it): a loss that divides by it is given the step's count over
every rank, the Trainer's way of counting; a mean over its own micro-batch is weighted by its share of the
step's items (labels that are not -100, shifted for causal LMs; else samples). The Trainer's own
accumulation does not guarantee it (a BERT classifier gets k times the update at k accumulation steps).

The micro-batch is probed at the first step, from the Trainer's prepared model and optimizer and the
largest samples of its train dataset (the prepared step: gradient checkpointing, NEFTune and the
accelerator's autocast are on by then), or given (``micro_batch=``), or read from the checkpoint a run
resumes from (:class:`AutoBatchState`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import logging
import types
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from autobatch import distributed
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.integrations._hf import (
    StepSamples,
    check_arguments,
    loop_arguments,
    loss_uses_num_items,
    mean_items,
    probe_data,
)
from autobatch.memory.device import DeviceMemory, resolve_memory_limit
from autobatch.memory.threads import cpu_threads
from autobatch.options import Options, entry_fields, entry_point
from autobatch.probing.cached import planned_chunks, probe_session
from autobatch.result import Backoff, ProbeResult
from autobatch.session import resolve
from autobatch.step.stepper import Stepper, smallest_batch
from autobatch.training.runner import StepRunner
from autobatch.validate import check_positive_int

__all__ = ["AutoBatchState", "AutoBatchTrainer"]

logger = logging.getLogger(__name__)

_OPTIONS = frozenset(f.name for f in entry_fields("AutoBatchTrainer"))
_TRAINER_PARAMETERS = frozenset(inspect.signature(Trainer.__init__).parameters) - {"self"}
_TRAINING_ONLY = frozenset({"micro_batch", "num_items", "regrow_after"})
"""AutoBatchTrainer's options that its probe does not take."""


class _Step(list):
    """The samples of one optimizer step, as the train loader hands them over (collated per micro-batch)."""


def _as_step(samples: list[Any]) -> _Step:
    """The train loader's collate function: the step's samples, uncollated."""
    return _Step(samples)


class AutoBatchState(TrainerCallback, ExportableState):
    """The micro-batch of an :class:`AutoBatchTrainer`, saved in its checkpoints' trainer state: a run that
    resumes from one trains on with it instead of probing again."""

    def __init__(
        self,
        micro_batch: int | None = None,
        max_micro_batch: int | None = None,
        per_rank: int | None = None,
        fixed_bytes: float | None = None,
    ) -> None:
        self.micro_batch, self.max_micro_batch = micro_batch, max_micro_batch
        self.per_rank, self.fixed_bytes = per_rank, fixed_bytes

    def state(self) -> dict[str, Any]:
        return {"args": dict(vars(self)), "attributes": {}}


class AutoBatchTrainer(Trainer):
    """The Hugging Face ``Trainer``, every optimizer step exactly the target batch in micro-batches that fit.

    Takes the ``Trainer``'s arguments, ``target_batch`` and autobatch's options. Everything else is the
    Trainer's: its loss (``compute_loss``), optimizer and scheduler, precision, collator, clipping,
    logging and checkpoints.

    Args:
        target_batch: the samples of every optimizer step over all ranks (default: the arguments'
            ``per_device_train_batch_size × gradient_accumulation_steps × world_size``).

    Raises:
        UsageValueError: arguments it cannot train with (``auto_find_batch_size``, DeepSpeed, FSDP,
            tensor or sequence parallelism, ``DataParallel``, an optimizer that steps inside the
            backward, a target the ranks cannot share).

    Example:
        >>> import tempfile, torch, transformers
        >>> from autobatch.integrations.transformers import AutoBatchTrainer
        >>> config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                                  num_attention_heads=2, intermediate_size=32)
        >>> model = transformers.BertForSequenceClassification(config)
        >>> data = [{"input_ids": torch.randint(5, 50, (12,)), "labels": i % 2} for i in range(64)]
        >>> args = transformers.TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=8,
        ...     gradient_accumulation_steps=4, num_train_epochs=1, report_to="none", use_cpu=True,
        ...     save_strategy="no", disable_tqdm=True)
        >>> trainer = AutoBatchTrainer(model, args, train_dataset=data, memory_limit="2MiB")
        >>> trainer.target_batch, trainer.args.gradient_accumulation_steps
        (32, 1)
        >>> result = trainer.train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> result.global_step, sum(trainer.micro_batches)
        (2, 32)
    """

    @entry_point("AutoBatchTrainer")
    def __init__(
        self,
        model: nn.Module | None = None,
        args: TrainingArguments | None = None,
        *trainer_args: Any,
        target_batch: int | None = None,
        **kwargs: Any,
    ) -> None:
        unknown = [name for name in kwargs if name not in _OPTIONS and name not in _TRAINER_PARAMETERS]
        if unknown:  # before the Trainer's own TypeError: the nearest name of either
            near = difflib.get_close_matches(unknown[0], sorted(_OPTIONS | _TRAINER_PARAMETERS), n=1)
            hint = f" Did you mean `{near[0]}`?" if near else ""
            raise UsageTypeError(
                f"AutoBatchTrainer() got an unexpected keyword argument `{unknown[0]}`.{hint}"
            )
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in _OPTIONS}
        self.options = Options.parse("AutoBatchTrainer", options)
        self._given = options
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        if not isinstance(args, TrainingArguments):
            raise UsageTypeError(f"Expected `args` to be a TrainingArguments, but got {type(args).__name__}.")
        world = int(args.world_size)
        if target_batch is None:
            target = args.per_device_train_batch_size * args.gradient_accumulation_steps * world
        else:
            target = check_positive_int(target_batch, "target_batch")
        if target % world:
            raise UsageValueError(
                f"Expected `target_batch` to be a multiple of the {world} ranks (every rank takes an equal "
                f"share of each step), but got {target}."
            )
        check_arguments(args)
        self.target_batch = target
        """The samples of every optimizer step, over all ranks."""
        self.per_rank = target // world
        self.user_args = args
        """The arguments as given; ``self.args`` are the loop's (one step per loader item)."""
        super().__init__(model, loop_arguments(args, self.per_rank), *trainer_args, **kwargs)
        self.add_callback(AutoBatchState(per_rank=self.per_rank))
        self.probe_result: ProbeResult | None = None
        """The probe's result, where this trainer probed."""
        self.loss_uses_num_items: bool | None = None
        """Whether the loss divides by ``num_items_in_batch`` (tried at the first step)."""
        self.micro_batches: tuple[int, ...] = ()
        """The micro-batches of this rank's last optimizer step, e.g. ``(11, 11, 10)``."""
        self._runner: StepRunner | None = None
        self._micro: int | None = self.options.train.micro_batch
        self._fixed_bytes: float | None = None
        self._train_loader: Any = None
        self._flos = 0.0
        self._held = contextlib.ExitStack()

    # -- what it trains with ----------------------------------------------------------------------------
    @property
    def micro_batch(self) -> int | None:
        """The micro-batch in force (``None`` until the first step); it shrinks on a back-off and regrows."""
        return self._runner.micro if self._runner is not None else self._micro

    @property
    def backoffs(self) -> list[Backoff]:
        """The out-of-memory back-offs of this ``train()`` (each step was redone after its)."""
        return list(self._runner.backoffs) if self._runner is not None else []

    # -- the Trainer's hooks ------------------------------------------------------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's ``train``, on autobatch's CPU threads, with the CUDA cap and the emulated device's
        memory held from step to step."""
        self._runner = None
        device = torch.device(self.args.device.type)
        with self._held, cpu_threads(self.options.memory.cpu_threads, device):
            try:
                return super().train(*args, **kwargs)
            finally:
                self._held = contextlib.ExitStack()

    def get_train_dataloader(self) -> Any:
        """The Trainer's train loader, whose items are the samples of one optimizer step, uncollated."""
        collator = self.data_collator
        self.data_collator = cast(Any, _as_step)
        try:
            self._train_loader = super().get_train_dataloader()
        finally:
            self.data_collator = collator
        return self._train_loader

    def floating_point_ops(self, inputs: Any) -> int:
        """The step's floating-point operations: the sum over its micro-batches, as collated."""
        if isinstance(inputs, _Step):
            return int(self._flos)
        return int(super().floating_point_ops(inputs))

    def training_step(self, model: nn.Module, inputs: Any, num_items_in_batch: Any = None) -> torch.Tensor:
        """One optimizer step's micro-steps, in micro-batches that fit; the Trainer's loop then clips,
        steps the optimizer and the scheduler, and logs."""
        if not isinstance(inputs, _Step):  # a batch this trainer's loader did not cut: the Trainer's step
            return super().training_step(model, inputs, num_items_in_batch)
        samples = list(inputs)
        model.train()
        train = getattr(self.optimizer, "train", None)
        if callable(train):
            train()  # schedule-free optimizers, as the Trainer does
        runner = self._runner if self._runner is not None else self._start(model, samples)
        runner.epoch = int(self.state.epoch or 0)  # for the back-offs' records and messages
        total = len(samples) if runner.group is None else int(runner.group.sum([len(samples)])[0])
        data = StepSamples(self, samples)
        loss = runner.optimizer_step(data, total)
        self.micro_batches = data.sizes()
        self._flos = data.flos()
        mode = self.user_args.include_num_input_tokens_seen
        if mode not in (False, "no", None):
            tokens = [data.tokens()]
            self.state.num_input_tokens_seen += int(
                runner.group.sum(tokens)[0] if runner.group else tokens[0]
            )
        return torch.tensor(loss, device=self.args.device)

    # -- the first step -------------------------------------------------------------------------------
    def _start(self, model: nn.Module, samples: list[Any]) -> StepRunner:
        """Probe (unless the micro-batch is known), tell how the loss weighs, build the runner."""
        module, ddp = distributed.unwrap(model)
        device = next(module.parameters()).device
        group = distributed.setup(device)
        # The torch optimizer inside accelerate's wrapper: the probe and the transaction's guard read it.
        optimizer = cast(torch.optim.Optimizer, getattr(self.optimizer, "optimizer", self.optimizer))
        scaler = getattr(self.accelerator, "scaler", None)
        memory = DeviceMemory(
            device, resolve_memory_limit(self.options.memory.memory_limit), self.options.memory.emulation
        )
        micro = self._micro_batch(module, optimizer, scaler, samples)
        first = self.data_collator(samples[: min(micro, len(samples))])
        count = self._trainer_items(first)
        uses = count is not None and loss_uses_num_items(self, module, first, float(count), device)
        if group is not None:
            uses = bool(group.max([float(uses)])[0])
        self.loss_uses_num_items = uses
        stepper = Stepper(
            module,
            optimizer,
            memory,
            "fp32",  # the accelerator's autocast runs inside the (prepared) model's forward
            forward=ddp,
            step_fn=self._micro_loss,
            scaler=scaler,
            skip_nonfinite=False,  # the Trainer applies every step; its logging filters NaN losses
        )
        train = self.options.train
        self._runner = StepRunner(
            stepper,
            memory,
            micro,
            floor=smallest_batch(module),
            group=group,
            ddp=ddp,
            sync_buffers=group is not None and (ddp is None or distributed.syncs_buffers(ddp)),
            num_items=self._trainer_items if uses else (train.num_items or mean_items(module)),
            regrow_after=train.regrow_after,
            fixed_bytes=self._fixed_bytes,
            target_batch=self.target_batch,
            loss_over_step_items=uses,
            defer_update=True,
        )
        self._held.enter_context(memory.capped())
        self._held.enter_context(memory.carried())  # memory carries from step to step, as a GPU's
        self._guard_optimizer_step()
        return self._runner

    def _micro_batch(self, module: nn.Module, optimizer: Any, scaler: Any, samples: list[Any]) -> int:
        """Given, from an earlier ``train()`` or the checkpoint resumed from, else probed."""
        if self._micro is not None:
            return min(self._micro, self.per_rank)
        stored: Any = self.state.stateful_callbacks or {}
        saved = stored.get(AutoBatchState.__name__) if isinstance(stored, Mapping) else None
        saved = saved[0] if isinstance(saved, list) else saved
        args = saved.get("args", {}) if isinstance(saved, Mapping) else {}
        if args.get("micro_batch") and args.get("per_rank") == self.per_rank:
            self._micro, self._fixed_bytes = int(args["micro_batch"]), args.get("fixed_bytes")
            logger.info("resuming with micro-batch %d from the checkpoint's trainer state", self._micro)
            return self._micro
        self.probe_result = self._probe(module, optimizer, scaler, samples)
        self._micro, self._fixed_bytes = self.probe_result.micro_batch, self.probe_result.fixed_bytes
        return self._micro

    def _probe(self, module: nn.Module, optimizer: Any, scaler: Any, samples: list[Any]) -> ProbeResult:
        """The probe of the Trainer's step: its loss, optimizer, clipping and the accelerator's precision,
        on the largest samples of its train dataset (or of the first step, for an iterable one)."""
        options = {k: v for k, v in self._given.items() if k not in _TRAINING_ONLY}
        options.update(
            optimizer=optimizer,
            step_fn=self._probe_loss,
            precision="fp32",  # the accelerator's autocast runs inside the model's forward
            grad_clip=self.args.max_grad_norm or None,
        )
        if scaler is not None:
            options["scaler"] = scaler
        data = probe_data(self._train_loader, self.data_collator, samples)
        session = resolve(module, data, Options.parse("probe", options))
        with session.start():
            result = probe_session(
                session, cap=self.per_rank, chunks=planned_chunks(self.per_rank, session.floor)
            )
        # It measured the accelerator's precision (the model's forward autocasts), not autobatch's.
        precision = "fp16" if self.args.fp16 else "bf16" if self.args.bf16 else "fp32"
        return dataclasses.replace(result, precision=precision)

    # -- the loss of a micro-batch ----------------------------------------------------------------------
    def _micro_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The Trainer's loss of one micro-batch; divided by the step's items where the loss takes them."""
        items = None
        runner = self._runner
        if runner is not None and runner.loss_over_step_items and runner.step_items is not None:
            items = torch.tensor(runner.step_items, device=runner.memory.device)
        with self.compute_loss_context_manager():
            loss = cast(torch.Tensor, self.compute_loss(model, batch, num_items_in_batch=items))
        return loss

    def _probe_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        with self.compute_loss_context_manager():
            loss = cast(torch.Tensor, self.compute_loss(model, batch))
        return loss

    def _trainer_items(self, batch: Any) -> Any:
        """``num_items_in_batch`` of one micro-batch, counted the Trainer's way (``None``: it counts none)."""
        extra = (
            (self.args.device,) if "device" in inspect.signature(self.get_batch_samples).parameters else ()
        )
        return self.get_batch_samples(iter([batch]), 1, *extra)[1]

    # -- the optimizer step ---------------------------------------------------------------------------
    def _guard_optimizer_step(self) -> None:
        """Run the loop's ``optimizer.step()`` as the transaction's last phase (measured, agreed, tried
        once more where nothing changed) and keep the checkpoint's state up to date."""
        optimizer: Any = self.optimizer
        original = getattr(optimizer, "_autobatch_original_step", None) or optimizer.step
        trainer = self

        def step(_: Any, *args: Any, **kwargs: Any) -> Any:
            runner = trainer._runner
            if runner is None or not runner.pending:
                return original(*args, **kwargs)
            returned: list[Any] = []

            def update() -> bool:
                returned.append(original(*args, **kwargs))
                return not trainer.accelerator.optimizer_step_was_skipped

            runner.update(update)
            trainer._remember(runner)
            return returned[-1]

        if hasattr(original, "_wrapped_by_lr_sched"):  # it calls the step an LR scheduler wrapped: say so
            step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        # A bound method: LR schedulers read `optimizer.step.__func__`.
        optimizer.step = types.MethodType(step, optimizer)
        optimizer._autobatch_original_step = original

    def _remember(self, runner: StepRunner) -> None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, AutoBatchState):
                callback.micro_batch, callback.max_micro_batch = runner.micro, runner.max_micro
                callback.per_rank, callback.fixed_bytes = self.per_rank, self._fixed_bytes


def _signature() -> inspect.Signature:
    """The Trainer's parameters, then ``target_batch`` and the options: what ``help()`` and IDEs show."""
    own = [
        p
        for p in inspect.signature(Trainer.__init__).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    extra = [inspect.Parameter("target_batch", inspect.Parameter.KEYWORD_ONLY, default=None)]
    extra += [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
        for f in entry_fields("AutoBatchTrainer")
    ]
    return inspect.Signature([*own, *extra])


AutoBatchTrainer.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
