"""Evaluation: an inference pass over the evaluation data, scored as :mod:`autobatch.metrics` says.

The pass runs under ``torch.inference_mode`` and the training precision's autocast, with an evaluation
batch of its own: with no gradients or optimizer state to hold it can be larger than the training
micro-batch, and it shrinks on out-of-memory through the same back-off as training. Each batch's samples
are read once and every piece that runs is collated on its own (padded to its own longest sample).
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
from autobatch.data import DataSource
from autobatch.distributed import Group
from autobatch.memory import DeviceMemory
from autobatch.metrics import EvalKind, lm_sums, predict, score, score_lm
from autobatch.oom import release_memory, run_shrinking
from autobatch.result import EvalReport

__all__ = ["evaluate", "predict", "score"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def evaluate(
    model: nn.Module,
    source: DataSource,
    memory: DeviceMemory,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    batch_size: int,
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
        batch_size: the evaluation batch to try first; halved on out-of-memory.
        target_names: class names for the classification report.
        predict_fn: ``predict_fn(model, batch) -> (predictions, labels)``; :func:`predict` by default.
        kind: the evaluation (:func:`autobatch.metrics.eval_kind`): ``"classification"`` and
            ``"predict_fn"`` score predictions with sklearn, ``"causal_lm"`` and ``"masked_lm"`` sum
            token losses.
        epoch: recorded in the report.
        group: the data-parallel ranks: each scores every ``world_size``-th sample and the results of
            all ranks are gathered before scoring, so every rank returns the same report.
    """
    lm = kind in ("causal_lm", "masked_lm")
    if lm:
        shift = kind == "causal_lm"

        def fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, ...]:
            return (lm_sums(model, batch, shift=shift),)

    else:
        fn = predict_fn or predict  # type: ignore[assignment]
    order = list(range(len(source)))
    if group is not None:
        order = order[group.rank :: group.world_size]
    parts: list[tuple[np.ndarray, ...]] = []
    backoffs: list[tuple[int, int]] = []
    was_training = model.training
    model.eval()
    size = min(batch_size, len(source))
    failure: BaseException | None = None
    try:
        position = 0
        while position < len(order):
            data = source.fetch(order[position : position + size])

            def run(n: int, data: Any = data) -> tuple[torch.Tensor, ...]:
                outs = []
                resident = [*model.parameters(), *model.buffers()]
                with torch.inference_mode(), autocast():
                    for start in range(0, len(data), n):
                        # One measured region per piece: its results then leave the device, as .cpu()
                        # does on CUDA (on an emulated CPU device .cpu() is no copy, and the gathered
                        # results would otherwise count against the limit).
                        with memory.measure(resident):
                            piece = memory.transfer(data.collate(start, start + n))
                            outs.append(tuple(t.cpu() for t in fn(model, piece)))
                return tuple(torch.cat(column) for column in zip(*outs, strict=True))

            def shrunk(old: int, new: int) -> None:
                backoffs.append((old, new))
                logger.warning("evaluation ran out of memory at batch %d; retrying with %d", old, new)

            out, size = run_shrinking(
                run, size, release=lambda: release_memory(model), on_shrink=shrunk, what="evaluation"
            )
            parts.append(tuple(t.numpy() for t in out))
            position += len(data)
    except Exception as exc:
        if group is None:
            raise
        failure = exc  # every rank must learn of it, or the others would wait at the gather forever
    finally:
        model.train(was_training)
    distributed.agree(group, failure, "in evaluation")
    columns = 1 if lm else 2
    merged = [np.concatenate([p[i] for p in parts]) if parts else np.zeros(0) for i in range(columns)]
    sequences = len(order)
    if group is not None:
        gathered = group.gather((merged, sequences))
        merged = [np.concatenate([g[0][i] for g in gathered]) for i in range(columns)]
        sequences = sum(g[1] for g in gathered)
    if lm:
        return score_lm(
            merged[0], kind=kind, sequences=sequences, batch_size=size, epoch=epoch, backoffs=backoffs
        )
    y_pred, y_true = (m if m.size else np.zeros(0, dtype=np.int64) for m in merged)
    return score(y_true, y_pred, target_names, batch_size=size, epoch=epoch, backoffs=backoffs, kind=kind)
