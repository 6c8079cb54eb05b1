"""``autobatch.fit``: probe, plan, train with AMP and accumulation, evaluate."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch import distributed
from autobatch.data import SizeFn, as_source
from autobatch.evaluate import PredictFn, evaluate
from autobatch.loop import NumItemsFn, TrainLoop, warn_batchnorm
from autobatch.memory import DeviceMemory, resolve_memory_limit
from autobatch.plan import plan
from autobatch.probe import probe
from autobatch.result import FitResult
from autobatch.step import LossFn, StepFn, Stepper, resolve_precision
from autobatch.validate import check_model_and_optimizer, check_positive_int, default_device, parse_device

__all__ = ["fit"]

logger = logging.getLogger(__name__)

SchedulerArg = Any  # an LRScheduler bound to `optimizer`, or a callable optimizer -> LRScheduler


def _check_number(value: Any, name: str, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Expected `{name}` to be a positive number or None, but got {value!r}.")


def _resolve_target_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device to train on (the model is moved there only after every check passed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    local = distributed.local_device()  # cuda:LOCAL_RANK under torchrun on a CUDA machine
    if device is None:
        return local or default_device()
    dev = parse_device(device)
    # A bare "cuda" means this rank's GPU, not whichever one is current before the group exists.
    bare = torch.device(device).index is None
    return local if local is not None and dev.type == "cuda" and bare else dev


def fit(
    model: nn.Module,
    data: Any,
    target_batch: int = 32,
    *,
    epochs: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    step_fn: StepFn | None = None,
    num_items: NumItemsFn | None = None,
    eval_data: Any = None,
    eval_batch: int | None = None,
    predict_fn: PredictFn | None = None,
    target_names: Sequence[str] | None = None,
    precision: str = "auto",
    memory_limit: int | str | None = None,
    device: torch.device | str | None = None,
    micro_batch: int | None = None,
    margin: float = 0.0,
    multiple_of: int = 1,
    size_fn: SizeFn | None = None,
    grad_clip: float | None = None,
    scheduler: SchedulerArg = None,
    shuffle: bool | None = None,
    seed: int | None = None,
    drop_last: bool = False,
    regrow_after: int = 50,
    progress: bool | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> FitResult:
    """Train ``model`` with an effective batch of exactly ``target_batch``, whatever the device holds.

    Probes the largest micro-batch that fits, plans gradient accumulation so that micro-batches add up
    to ``target_batch``, trains with autocast and a GradScaler, backs off and redoes a step that runs
    out of memory, and scores ``eval_data`` with sklearn's ``classification_report`` after each epoch.

    Args:
        model: the model; moved to ``device`` (nothing is changed when an argument is refused).
        data: a map-style Dataset, a DataLoader (its dataset, collate_fn, sampler and worker settings
            are kept, its batch size is not) or tensors ``(X, y)``. Batches are ``(*inputs, targets)``
            or dicts passed as ``model(**batch)`` whose output has ``.loss``.
        target_batch: the effective batch of every optimizer step.
        epochs: passes over the data; every sample is seen exactly once per epoch.
        optimizer: default AdamW (lr 1e-3) over the trainable parameters.
        loss_fn: ``loss_fn(outputs, targets)``, a mean over the batch; cross-entropy by default.
        step_fn: ``step_fn(model, batch) -> loss`` replaces forward and loss (the escape hatch).
        num_items: ``num_items(batch)`` counts what a micro-loss averages over (e.g. non-padding
            tokens); micro-losses are then weighted by items, not samples, for exact gradients.
        eval_data: data to evaluate after each epoch (same forms as ``data``).
        eval_batch: the evaluation batch to start from (default: 4 × the micro-batch); halved on OOM.
        predict_fn: ``predict_fn(model, batch) -> (predictions, labels)`` for evaluation.
        target_names: class names for the classification report.
        precision: ``"auto"`` (fp16 + GradScaler on CUDA, bf16 where supported, else fp32), ``"fp16"``,
            ``"bf16"`` or ``"fp32"``.
        memory_limit: bytes or e.g. ``"8GiB"``: on CUDA the allocator is capped to it for the whole
            call; on the CPU, probe and training run on an emulated device of that size.
        device: default CUDA, then MPS, else CPU.
        micro_batch: skip the probe and start from this micro-batch.
        margin: a fraction of the probed maximum to leave free.
        multiple_of: round the probed micro-batch down to a multiple of this.
        size_fn: ranks samples by size so the probe uses the largest (variable-length data).
        grad_clip: clip the global gradient norm to this value (after unscaling).
        scheduler: an LR scheduler of ``optimizer``, or ``lambda optimizer: scheduler``; stepped once
            per applied optimizer step, not on steps the GradScaler skipped.
        shuffle: shuffle each epoch (default: the DataLoader's sampler if one was given, else True).
        seed: seeds torch, Python and NumPy generators and the epoch order, for reproducible runs.
        drop_last: drop a last step smaller than ``target_batch``.
        regrow_after: clean steps after an OOM back-off before the micro-batch grows back.
        progress: tqdm progress bars (``None``: only on a TTY).
        cache: reuse a probe result of the same setup from the on-disk cache (and store new ones), so
            a second run starts training at once; ``False`` always probes.
        cache_dir: the cache directory (default: ``$AUTOBATCH_CACHE_DIR``, else the user cache directory).

    Returns:
        A :class:`~autobatch.result.FitResult`.

    Raises:
        NoBatchFitsError: not even a batch of one sample fits.
        TypeError, ValueError: a bad argument, named in the message; the model is left as it was.

    Example:
        >>> import torch, autobatch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> X, y = torch.randn(96, 8), torch.randint(0, 3, (96,))
        >>> result = autobatch.fit(model, (X, y), target_batch=32, memory_limit="256KiB",
        ...                        device="cpu", precision="fp32", seed=0, progress=False)
        >>> result.plan.effective_batch, result.samples
        (32, 96)
    """
    started = time.perf_counter()
    # Every check comes before the model is touched.
    check_positive_int(target_batch, "target_batch")
    check_positive_int(epochs, "epochs")
    check_positive_int(regrow_after, "regrow_after")
    if micro_batch is not None:
        check_positive_int(micro_batch, "micro_batch")
    _check_number(grad_clip, "grad_clip")
    limit = resolve_memory_limit(memory_limit)
    dev = _resolve_target_device(model, device)
    resolved = resolve_precision(precision, dev)
    module, ddp = distributed.unwrap(model)
    optimizer = check_model_and_optimizer(module, optimizer)
    if any(optimizer.state.values()) and any(p.device != dev for p in module.parameters()):
        raise ValueError(
            f"`optimizer` already holds state for parameters that are not on {dev}; move the model "
            "before creating its optimizer, or pass `device` matching the model."
        )
    source = as_source(data)
    if step_fn is None:
        source.check_labelled()
    eval_source = as_source(eval_data, name="eval_data") if eval_data is not None else None
    if eval_source is not None and predict_fn is None:
        eval_source.check_labelled("eval_data")
    if target_names is not None and (
        isinstance(target_names, str) or not all(isinstance(n, str) for n in target_names)
    ):
        raise TypeError(f"Expected `target_names` to be a sequence of str, but got {target_names!r}.")
    if eval_batch is not None:
        check_positive_int(eval_batch, "eval_batch")
    group = distributed.setup(dev)
    world_size = group.world_size if group is not None else 1
    plan(1, target_batch, world_size)  # a target the ranks cannot share fails before anything runs
    if len(source) < world_size:
        raise ValueError(
            f"Expected `data` to hold at least one sample per rank ({world_size}), but got {len(source)}."
        )

    if seed is not None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
    order_seed = seed if seed is not None else int(torch.randint(2**62, ()).item())
    module.to(dev)
    sync_buffers = False
    if group is not None:
        order_seed = group.broadcast(order_seed)
        if ddp is None:
            ddp = distributed.wrap(module, dev)
            sync_buffers = True  # what DDP's default broadcast_buffers=True gives, at a safe point
        else:
            sync_buffers = distributed.syncs_buffers(ddp)
    main = group is None or group.is_main
    sched = scheduler(optimizer) if callable(scheduler) and not hasattr(scheduler, "step") else scheduler

    probed = None
    if micro_batch is None:
        probed = probe(
            module,
            source,
            optimizer=optimizer,
            loss_fn=loss_fn,
            step_fn=step_fn,
            precision=resolved,
            memory_limit=limit,
            device=dev,
            max_batch=target_batch // world_size,  # a rank never needs more than its share
            margin=margin,
            multiple_of=multiple_of,
            size_fn=size_fn,
            grad_clip=grad_clip,
            cache=cache,
            cache_dir=cache_dir,
        )
        micro_batch = probed.micro_batch
    initial = plan(micro_batch, target_batch, world_size)
    if main:
        logger.info("plan: %s", initial.describe())
        warn_batchnorm(module, initial)

    memory = DeviceMemory(dev, limit)
    # Under DDP the forward runs through the wrapper (inside its no_sync()), as users' code does.
    stepper = Stepper(
        ddp if ddp is not None else module,
        optimizer,
        memory,
        resolved,
        loss_fn=loss_fn,
        step_fn=step_fn,
        grad_clip=grad_clip,
    )
    loop = TrainLoop(
        stepper,
        source,
        target_batch=target_batch,
        micro_batch=micro_batch,
        num_items=num_items,
        scheduler=sched,
        regrow_after=regrow_after,
        progress=progress if main else False,
        group=group,
        ddp=ddp,
        sync_buffers=sync_buffers,
    )
    result = FitResult(probe=probed, plan=initial, final_plan=initial)
    with memory.capped():
        for epoch in range(epochs):
            generator = torch.Generator().manual_seed(order_seed + epoch)
            order = source.epoch_order(shuffle, generator, epoch)
            t0 = time.perf_counter()
            result.losses += loop.run_epoch(epoch, epochs, order, drop_last=drop_last)
            result.train_seconds += time.perf_counter() - t0
            result.epochs = epoch + 1
            if eval_source is not None:
                report = evaluate(
                    module,
                    eval_source,
                    memory,
                    stepper.autocast,
                    # After the first evaluation, start from the batch size that fitted last time.
                    batch_size=result.evals[-1].batch_size if result.evals else eval_batch or 4 * loop.micro,
                    target_names=target_names,
                    predict_fn=predict_fn,
                    epoch=epoch,
                    group=group,
                )
                logger.info("epoch %d: accuracy %.4f", epoch + 1, report.accuracy)
                result.evals.append(report)
    result.final_plan = loop.plan
    result.skipped_steps = loop.skipped_steps
    result.backoffs = loop.backoffs
    result.regrowths = loop.regrowths
    result.steps = loop.steps
    result.samples = loop.samples
    result.seconds = time.perf_counter() - started
    return result
