"""Evaluation: an inference pass over the evaluation data, scored as :mod:`autobatch.training.metrics` says.

The pass runs under ``torch.inference_mode`` and the training precision's autocast, with an evaluation
batch of its own. Inference holds no gradients, optimizer state or autograd graph, so it fits batches
larger than the training micro-batch: unless told a size, the pass measures its first batch (the training
micro-batch's size) and continues with the largest batch that the line through the memory resident before
it and its peak puts under the device's capacity (:func:`next_batch`). Where a size still runs out of
memory it shrinks through the same back-off as training (an expected retry: logged at debug level).
Each batch's samples are read once and every piece that runs is collated on its own (padded to its own
longest sample).

Outputs that are NaN or infinite are counted (:attr:`~autobatch.result.EvalReport.nonfinite`) and
warned about once per evaluation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch import distributed
from autobatch.distributed import Group
from autobatch.memory.device import DeviceMemory, Measurement
from autobatch.memory.oom import release_memory, run_shrinking
from autobatch.result import EvalReport
from autobatch.step.backoff import largest_fitting
from autobatch.step.data import DataSource
from autobatch.training.metrics import EvalKind, lm_sums, predict, predict_counted, score, score_lm

__all__ = ["evaluate", "next_batch", "predict", "score"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]

UNMEASURED_GROWTH = 4
"""Where nothing can be measured (the CPU without a limit), evaluation continues with this many times its
first batch."""


def next_batch(memory: DeviceMemory, measured: Measurement, batch: int, cap: int) -> int:
    """The evaluation batch to continue with after ``batch`` samples ran within ``measured``.

    The largest batch that the line through the bytes resident when the batch began and its peak puts
    under the capacity (:func:`autobatch.step.backoff.largest_fitting`): the line charges the batch with all
    of the growth, workspace included, so it errs small. On CUDA the peak is the allocated one: the
    training's cached blocks are free for inference to reuse. Never below ``batch``, never above ``cap``
    (the samples there are); :data:`UNMEASURED_GROWTH` times ``batch`` where nothing was measured.

    Example:
        >>> m = Measurement(peak_bytes=3_000, resident_bytes=1_000)  # 1,000 resident, 250 bytes a sample
        >>> next_batch(DeviceMemory(torch.device("cpu"), 11_000), m, 8, cap=1_000)
        40
    """
    need, resident = measured.peak_bytes, measured.resident_bytes
    fits = None if resident is None else largest_fitting(batch, need, memory.capacity, resident)
    return max(1, min(cap, max(batch, fits if fits is not None else UNMEASURED_GROWTH * batch)))


def evaluate(
    model: nn.Module,
    source: DataSource,
    memory: DeviceMemory,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    batch_size: int | None = None,
    first_batch: int = 1,
    target_names: Sequence[str] | None = None,
    predict_fn: PredictFn | None = None,
    kind: EvalKind = "classification",
    epoch: int | None = None,
    group: Group | None = None,
) -> EvalReport:
    """Run the model over every sample of ``source`` and score it.

    Args:
        model: the model; put in eval mode for the pass and back in its previous mode after.
        source: the evaluation data.
        memory: the device (emulated or capped) to run on.
        autocast: returns the autocast context of the training precision.
        batch_size: the evaluation batch to run (a user's ``eval_batch``, or the size that fitted last
            time); shrunk on out-of-memory. ``None``: run a first batch of ``first_batch`` samples,
            measured, then continue with :func:`next_batch`.
        first_batch: the measured first batch when ``batch_size`` is ``None`` (the training micro-batch:
            its inference fits where its training step did).
        target_names: class names for the classification report.
        predict_fn: ``predict_fn(model, batch) -> (predictions, labels)``; :func:`predict` by default.
        kind: the evaluation (:func:`autobatch.training.metrics.eval_kind`): ``"classification"`` and
            ``"predict_fn"`` score predictions with sklearn, ``"causal_lm"`` and ``"masked_lm"`` sum
            token losses.
        epoch: recorded in the report.
        group: the data-parallel ranks: each scores every ``world_size``-th sample and the results of
            all ranks are gathered before scoring, so every rank returns the same report.
    """
    lm = kind in ("causal_lm", "masked_lm")
    fn: Callable[[nn.Module, Any], tuple[torch.Tensor, ...]]
    if lm:
        shift = kind == "causal_lm"

        def fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
            return (lm_sums(model, batch, shift=shift),)

    else:
        fn = predict_fn or predict_counted
    order = list(range(len(source)))
    if group is not None:
        order = order[group.rank :: group.world_size]
    parts: list[tuple[np.ndarray, ...]] = []
    backoffs: list[tuple[int, int]] = []
    was_training = model.training
    model.eval()
    size = max(1, min(batch_size or first_batch, len(order)))
    sized = batch_size is not None
    failure: BaseException | None = None
    try:
        position = 0
        while position < len(order):
            data = source.fetch(order[position : position + size])
            peaks: list[Measurement] = []

            def run(n: int, data: Any = data, peaks: list[Measurement] = peaks) -> tuple[torch.Tensor, ...]:
                outs = []
                peaks.clear()
                resident = [*model.parameters(), *model.buffers()]
                with torch.inference_mode(), autocast():
                    for start in range(0, len(data), n):
                        # One measured region per piece: its results then leave the device, as .cpu()
                        # does on CUDA (on an emulated CPU device .cpu() is no copy: the copy is made
                        # after the region, and the device's results freed).
                        with memory.measure(resident) as measured:
                            piece = memory.transfer(data.collate(start, start + n))
                            results = tuple(torch.as_tensor(t) for t in fn(model, piece))
                            del piece
                        outs.append(tuple(memory.to_host(t) for t in results))
                        del results
                        peaks.append(measured)
                return tuple(torch.cat(column) for column in zip(*outs, strict=True))

            def shrunk(old: int, new: int) -> None:
                backoffs.append((old, new))
                logger.debug("evaluation ran out of memory at batch %d; retrying with %d", old, new)

            out, size = run_shrinking(
                run, size, release=lambda: release_memory(model), on_shrink=shrunk, what="evaluation"
            )
            parts.append(tuple(t.numpy() for t in out))
            position += len(data)
            if not sized:  # the first batch was the measurement
                highest = max(peaks, key=lambda m: m.peak_bytes or 0)
                size, sized = next_batch(memory, highest, size, cap=len(order)), True
                logger.debug("evaluation: batch %d measured; continuing with %d", len(data), size)
    except Exception as exc:
        if group is None:
            raise
        failure = exc  # every rank must learn of it, or the others would wait at the gather forever
    finally:
        model.train(was_training)
    distributed.agree(group, failure, "in evaluation")
    columns = 1 if lm else 2 if predict_fn is not None else 3
    merged = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(columns)]
    sequences = len(order)
    if group is not None:
        gathered = group.gather((merged, sequences, size))
        merged = [np.concatenate([g[0][i] for g in gathered]) for i in range(columns)]
        sequences = sum(g[1] for g in gathered)
        # The batch that fits on every rank that had samples: one report for all.
        size = min([g[2] for g in gathered if g[1]] or [size])
    if lm:
        report = score_lm(
            merged[0], kind=kind, sequences=sequences, batch_size=size, epoch=epoch, backoffs=backoffs
        )
    else:
        y_pred, y_true = (m if m.size else np.zeros(0, dtype=np.int64) for m in merged[:2])
        nonfinite = int(merged[2].sum()) if columns == 3 else None
        report = score(
            y_true,
            y_pred,
            target_names,
            batch_size=size,
            epoch=epoch,
            backoffs=backoffs,
            kind=kind,
            nonfinite=nonfinite,
        )
    if report.nonfinite:
        logger.warning(
            "evaluation%s: the model's outputs were NaN or infinite in %d %s; the report counts them "
            "(EvalReport.nonfinite), and %s",
            "" if epoch is None else f" after epoch {epoch + 1}",
            report.nonfinite,
            "tokens" if lm else "samples",
            "the loss and perplexity are NaN or infinite" if lm else "their predictions mean nothing",
        )
    return report
