"""Evaluation: an inference pass, predictions against labels, and sklearn's classification report.

The pass runs under ``torch.inference_mode`` and the training precision's autocast, with an evaluation
batch of its own: with no gradients or optimizer state to hold it can be larger than the training
micro-batch, and it shrinks on out-of-memory through the same back-off as training.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch import distributed
from autobatch._tree import batch_size_of, slice_batch
from autobatch.data import DataSource
from autobatch.distributed import Group
from autobatch.errors import UsageValueError
from autobatch.memory import DeviceMemory
from autobatch.oom import release_memory, run_shrinking
from autobatch.result import EvalReport

__all__ = ["evaluate", "predict", "score"]

logger = logging.getLogger(__name__)

PredictFn = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor]]


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise TypeError(
        f"Expected the model to return logits (a tensor, or an output with `.logits`), but got "
        f"{type(output).__name__}. Pass `predict_fn=lambda model, batch: (predictions, labels)`."
    )


def predict(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Class predictions and labels of one batch: ``argmax`` of the logits over the last dimension.

    ``(*inputs, labels)`` batches call ``model(*inputs)``; dict batches call ``model(**batch)`` with
    ``labels`` left in (Hugging Face models return ``.logits``). Token-level logits ``[B, T, C]`` are
    flattened, and labels equal to -100 (the ignore index) are dropped.
    """
    if isinstance(batch, Mapping):
        labels = batch["labels"]
        logits = _logits(model(**batch))
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        *inputs, labels = batch
        logits = _logits(model(*inputs))
    else:
        raise ValueError(
            f"Expected evaluation batches to be (inputs, labels) or dicts with `labels`, but got "
            f"{type(batch).__name__}."
        )
    predictions = logits.argmax(dim=-1).reshape(-1)
    labels = labels.reshape(-1)
    keep = labels != -100
    return predictions[keep], labels[keep]


def evaluate(
    model: nn.Module,
    source: DataSource,
    memory: DeviceMemory,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]],
    *,
    batch_size: int,
    target_names: Sequence[str] | None = None,
    predict_fn: PredictFn | None = None,
    epoch: int | None = None,
    group: Group | None = None,
) -> EvalReport:
    """Predict every sample of ``source`` and score the predictions with sklearn.

    Args:
        model: the model; put in eval mode for the pass and back in its previous mode after.
        source: the evaluation data.
        memory: the device (emulated or capped) to run on.
        autocast: returns the autocast context of the training precision.
        batch_size: the evaluation batch to try first; halved on out-of-memory.
        target_names: class names for the report.
        predict_fn: ``predict_fn(model, batch) -> (predictions, labels)``; :func:`predict` by default.
        epoch: recorded in the report.
        group: the data-parallel ranks: each predicts every ``world_size``-th sample and the predictions
            of all ranks are gathered before scoring, so every rank returns the same report.
    """
    fn = predict_fn or predict
    order = list(range(len(source)))
    if group is not None:
        order = order[group.rank :: group.world_size]
    predictions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    backoffs: list[tuple[int, int]] = []
    was_training = model.training
    model.eval()
    size = min(batch_size, len(source))
    failure: BaseException | None = None
    try:
        position = 0
        while position < len(order):
            host = source.batch(order[position : position + size])

            def run(n: int, host: Any = host) -> tuple[torch.Tensor, torch.Tensor]:
                outs = []
                resident = [*model.parameters(), *model.buffers()]
                with torch.inference_mode(), autocast():
                    for start in range(0, batch_size_of(host), n):
                        # One measured region per batch: its predictions then leave the device, as
                        # .cpu() does on CUDA (on an emulated CPU device .cpu() is no copy, and the
                        # gathered predictions would otherwise count against the limit).
                        with memory.measure(resident):
                            part = memory.transfer(slice_batch(host, start, start + n))
                            pred, label = fn(model, part)
                        outs.append((pred.cpu(), label.cpu()))
                return torch.cat([p for p, _ in outs]), torch.cat([y for _, y in outs])

            def shrunk(old: int, new: int) -> None:
                backoffs.append((old, new))
                logger.warning("evaluation ran out of memory at batch %d; retrying with %d", old, new)

            (pred, label), size = run_shrinking(
                run, size, release=lambda: release_memory(model), on_shrink=shrunk, what="evaluation"
            )
            predictions.append(pred.numpy())
            labels.append(label.numpy())
            position += batch_size_of(host)
    except Exception as exc:
        if group is None:
            raise
        failure = exc  # every rank must learn of it, or the others would wait at the gather forever
    finally:
        model.train(was_training)
    distributed.agree(group, failure, "in evaluation")
    y_pred = np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int64)
    y_true = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if group is not None:
        gathered = group.gather((y_true, y_pred))
        y_true = np.concatenate([t for t, _ in gathered])
        y_pred = np.concatenate([p for _, p in gathered])
    return score(y_true, y_pred, target_names, batch_size=size, epoch=epoch, backoffs=backoffs)


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    target_names: Sequence[str] | None = None,
    *,
    batch_size: int = 0,
    epoch: int | None = None,
    backoffs: list[tuple[int, int]] | None = None,
) -> EvalReport:
    """sklearn's classification report (dict and text) of labels against predictions.

    Classes are every label seen in either array, so that ``target_names`` lines up with them.
    """
    from sklearn.metrics import classification_report  # here: importing sklearn takes seconds

    classes = np.union1d(y_true, y_pred)
    names = list(target_names) if target_names is not None else None
    if names is not None:
        if len(names) < int(classes.max()) + 1:
            raise UsageValueError(
                f"Expected `target_names` to name every class 0..{int(classes.max())}, but got "
                f"{len(names)} names."
            )
        classes = np.arange(len(names))
    kwargs: dict[str, Any] = {"labels": classes, "target_names": names, "zero_division": 0}
    report = classification_report(y_true, y_pred, output_dict=True, **kwargs)
    text = classification_report(y_true, y_pred, digits=4, **kwargs)
    accuracy = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    return EvalReport(
        report=report,
        text=text,
        accuracy=accuracy,
        batch_size=batch_size,
        samples=len(y_true),
        epoch=epoch,
        backoffs=backoffs or [],
    )
