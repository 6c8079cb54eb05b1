"""What an evaluation needs of its data, checked from a few samples before anything trains.

The evaluation after each epoch of :func:`autobatch.fit` scores a classification with sklearn's
``classification_report`` of the logits' argmax, and a language model on its token ids
(:mod:`autobatch.training.metrics`). Data it cannot score (string labels, float regression or multi-hot
targets, dicts without ``labels``) would fail only after the first epoch had trained: :func:`check_eval_data`
finds it in :func:`autobatch.session.resolve`, which changes nothing. The messages name ``eval_data``, what
was expected, what was got and the fix; :func:`autobatch.training.metrics.predict` raises the same where a
batch shows it only at evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autobatch.errors import UsageTypeError, UsageValueError

if TYPE_CHECKING:
    from autobatch.step.data import DataSource

__all__ = [
    "CHECKED_SAMPLES",
    "FIXES",
    "as_labels",
    "check_eval_data",
    "class_label_message",
    "class_label_problem",
]

CHECKED_SAMPLES = 4
"""Samples of ``eval_data`` that :func:`check_eval_data` reads, spread over the dataset (it may be large)."""

FIXES = (
    "Pass `predict_fn=lambda model, batch: (predictions, labels)` to score them your own way, "
    "`eval_task='classification'`, `'causal_lm'` or `'masked_lm'` for the evaluation that fits the model, "
    "or leave out `eval_data`."
)


def check_eval_data(source: DataSource, kind: str) -> None:
    """Refuse ``eval_data`` that the evaluation of ``kind`` cannot score, before anything trains.

    Reads :data:`CHECKED_SAMPLES` samples spread over the data, each collated alone by the data's own
    collate function (so what is checked is what the evaluation gets). A classification needs integer
    class indices, a language model integer token ids ``[batch, tokens]``; dict batches need ``labels``
    (or, for a language model, ``input_ids``). A ``predict_fn``'s batches are its own: not checked.

    Raises:
        UsageValueError: batches without labels.
        UsageTypeError: labels that are not class indices (strings; floats, as regression or multi-hot
            multilabel targets are) or not token ids.
    """
    if kind == "predict_fn":
        return
    last = len(source) - 1
    for index in sorted({i * last // (CHECKED_SAMPLES - 1) for i in range(CHECKED_SAMPLES)}):
        _check_batch(source.batch([index]), kind, source.name)


def _check_batch(batch: Any, kind: str, name: str) -> None:
    lm = kind in ("causal_lm", "masked_lm")
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if labels is None and lm:
            labels = batch.get("input_ids")
        if labels is None:
            rename = " (rename `label` to `labels`, as Hugging Face's collators do)" * ("label" in batch)
            raise UsageValueError(
                f"Expected `{name}` batches that are dicts to hold `labels`"
                + (" (or `input_ids`, for a language model)" if lm else "")
                + f" for the {kind} evaluation, but got keys {sorted(map(str, batch))}{rename}. {FIXES}"
            )
    elif isinstance(batch, Sequence) and len(batch) >= 2:
        labels = batch[-1]
    else:
        raise UsageValueError(
            f"Expected `{name}` batches to be (inputs, labels) or dicts with `labels`, but got "
            f"{type(batch).__name__}. {FIXES}"
        )
    labels = as_labels(labels)
    if not lm:
        got = class_label_problem(labels)
        if got is not None:
            raise UsageTypeError(class_label_message(got, name))
        return
    if not _integer(labels) or labels.dtype == torch.bool or labels.dim() < 2:
        one = isinstance(labels, torch.Tensor) and labels.dim() < 2
        raise UsageTypeError(
            f"Expected `{name}` labels for the {kind} evaluation to be token ids [batch, tokens] (an integer "
            f"tensor), but got {_describe(labels)}{', one per sample (class labels?)' if one else ''}. "
            + FIXES
        )


def as_labels(labels: Any) -> Any:
    """NumPy arrays of numbers as tensors; anything else as it is."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "biuf":
        return torch.as_tensor(labels)
    return labels


def _integer(labels: Any) -> bool:
    return isinstance(labels, torch.Tensor) and not (labels.is_floating_point() or labels.is_complex())


def _describe(labels: Any) -> str:
    """What a batch's labels are, for a message: ``'float32 labels of shape [3] per sample'``."""
    if isinstance(labels, torch.Tensor):
        what = f"{str(labels.dtype).removeprefix('torch.')} labels"
        return what + (f" of shape {list(labels.shape[1:])} per sample" if labels.dim() > 1 else "")
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(v, str) for v in labels):
        shown = ", ".join(repr(v) for v in labels[:3]) + (", …" if len(labels) > 3 else "")
        return f"strings ({shown})"
    if isinstance(labels, (list, tuple)):
        kinds = "/".join(sorted({type(v).__name__ for v in labels}))
        return f"a {type(labels).__name__} of {len(labels)} values" + (f" ({kinds})" if kinds else "")
    return f"a {type(labels).__name__}"


def class_label_problem(labels: Any) -> str | None:
    """What is wrong with ``labels`` as class indices (``None``: nothing), said as what was got."""
    if _integer(labels):
        return None
    got = _describe(labels)
    if isinstance(labels, torch.Tensor) and labels.dim() > 1 and bool(((labels == 0) | (labels == 1)).all()):
        return got + ", multi-hot: multilabel targets"
    if isinstance(labels, torch.Tensor):
        return got + ": regression targets, or class indices stored as floats (convert those with `.long()`)"
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        return got + ": map them to class indices first, and pass the names as `target_names`"
    if isinstance(labels, (list, tuple)):
        return got + ": a list of labels per sample, as multilabel targets are"
    return got


def class_label_message(got: str, name: str = "eval_data") -> str:
    return (
        f"Expected `{name}` labels to be integer class indices (one per sample, or per token) for the "
        f"classification evaluation (sklearn's classification_report of the logits' argmax), but got "
        f"{got}. {FIXES}"
    )
