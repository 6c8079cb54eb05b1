"""What an evaluation measures, per batch and over the whole set: classes, or a language model's tokens.

Three kinds of evaluation, told apart by :func:`eval_kind`:

* ``"classification"``: the argmax of the logits against the labels, scored by sklearn's
  ``classification_report`` (token-level logits are flattened, labels of -100 dropped).
* ``"causal_lm"``: what users of a language model read: the mean token loss (cross-entropy), its
  perplexity and the next-token accuracy. The logits at position ``t`` predict the label at ``t + 1``,
  the shift the model's own loss applies; without it, a model with tied embeddings would score its
  input's current token.
* ``"masked_lm"``: the same figures at the labelled positions, unshifted (BERT's masked tokens).

A user's ``predict_fn(model, batch) -> (predictions, labels)`` is scored as a classification.

Outputs that are NaN or infinite are counted, never scored silently: samples whose scored logits are not
finite, or tokens whose loss is not. What an evaluation needs of its data is checked before training by
:mod:`autobatch.training.evalcheck`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.result import EvalReport
from autobatch.training.evalcheck import FIXES, as_labels, class_label_message, class_label_problem

__all__ = ["EvalKind", "eval_kind", "lm_sums", "predict", "predict_counted", "score", "score_lm"]

EvalKind = str
"""``"classification"``, ``"causal_lm"``, ``"masked_lm"`` or ``"predict_fn"``."""

IGNORE_INDEX = -100
"""The label of positions no loss is taken on (padding), as in ``torch.nn.CrossEntropyLoss``."""


def eval_kind(model: nn.Module, task: str, predict_fn: Callable[..., Any] | None) -> EvalKind:
    """The evaluation that runs: ``predict_fn`` when given, else ``task``; ``"auto"`` reads the model.

    A Hugging Face decoder-only language model (a ``...ForCausalLM`` or ``...LMHeadModel``, or a model
    that can generate and is no encoder-decoder) is a causal LM, a ``...ForMaskedLM`` a masked LM;
    everything else is a classifier.
    """
    if predict_fn is not None:
        return "predict_fn"
    if task != "auto":
        return task
    module = getattr(model, "module", model)  # through a DDP wrapper
    name = type(module).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    config, can_generate = getattr(module, "config", None), getattr(module, "can_generate", None)
    if config is not None and callable(can_generate) and not getattr(config, "is_encoder_decoder", False):
        try:
            if can_generate():
                return "causal_lm"
        except Exception:  # an unusual model's can_generate(): it is no language model we know
            pass
    return "classification"


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


def _forward(model: nn.Module, batch: Any, *, lm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits and the labels of one batch: ``model(**batch)`` or ``model(*inputs)``.

    A language model's dict batch without ``labels`` is scored on its ``input_ids`` (padding, where the
    attention mask is 0, ignored).
    """
    if isinstance(batch, Mapping):
        labels = batch.get("labels")
        if labels is None and lm and "input_ids" in batch:
            labels = batch["input_ids"]
            mask = batch.get("attention_mask")
            if mask is not None:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        if labels is None:
            raise ValueError(
                f"Expected evaluation batches that are dicts to hold `labels`, but got keys {sorted(batch)}."
            )
        return _logits(model(**batch)), labels
    if isinstance(batch, Sequence) and len(batch) >= 2:
        *inputs, labels = batch
        return _logits(model(*inputs)), labels
    raise ValueError(
        f"Expected evaluation batches to be (inputs, labels) or dicts with `labels`, but got "
        f"{type(batch).__name__}."
    )


def predict(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Class predictions and labels of one batch: ``argmax`` of the logits over the last dimension.

    ``(*inputs, labels)`` batches call ``model(*inputs)``; dict batches call ``model(**batch)`` with
    ``labels`` left in (Hugging Face models return ``.logits``). Token-level logits ``[B, T, C]`` are
    flattened, and labels equal to -100 (the ignore index) are dropped.

    Raises:
        UsageTypeError: the labels are not integer class indices (strings, floats: regression or
            multi-hot targets).
        UsageValueError: the labels do not give one class per output (multilabel targets, say).
    """
    predictions, labels, _ = predict_counted(model, batch)
    return predictions, labels


def predict_counted(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`predict`, and ``[n]``: the samples whose scored logits hold NaN or infinity.

    Positions labelled -100 are not scored, so padding whose logits are NaN (a fully masked attention
    row) does not count.
    """
    logits, labels = _forward(model, batch)
    labels = as_labels(labels)
    problem = class_label_problem(labels)
    if problem is not None:
        raise UsageTypeError(class_label_message(problem))
    scored = logits.shape[:-1]  # one class index per output row
    if logits.dim() == 0 or labels.numel() != scored.numel():
        raise UsageValueError(
            "Expected the model's logits [batch, classes] (or [batch, tokens, classes]) and one class index "
            f"per row of them, but got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
            + (" (multilabel targets?)" if labels.numel() > scored.numel() else "")
            + f". {FIXES}"
        )
    labels = labels.reshape(scored)
    keep = labels != IGNORE_INDEX
    bad = ~torch.isfinite(logits).all(dim=-1) & keep
    nonfinite = bad.reshape(len(bad) if bad.dim() else 1, -1).any(dim=1).sum().reshape(1)
    predictions = logits.argmax(dim=-1)
    return predictions[keep], labels[keep], nonfinite


def lm_sums(model: nn.Module, batch: Any, *, shift: bool) -> torch.Tensor:
    """``[[summed token loss, correct tokens, tokens, non-finite token losses]]`` of one batch (float64,
    on the host).

    With ``shift`` (a causal LM) the logits at ``t`` are scored against the label at ``t + 1``. A NaN or
    infinite token loss stays in the sum (the mean loss is then NaN or infinite, as it is), and is counted.
    """
    logits, labels = _forward(model, batch, lm=True)
    if logits.dim() < 3 or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"Expected a language model's logits [batch, tokens, vocabulary] for labels [batch, tokens], "
            f"but got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}. Pass "
            "eval_task='classification' for a classifier."
        )
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    logits = logits.reshape(-1, logits.shape[-1])[keep].float()
    labels = labels[keep]
    losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    correct = (logits.argmax(dim=-1) == labels).sum()
    sums = torch.stack(
        [
            losses.double().sum(),
            correct.double(),
            torch.tensor(float(labels.numel()), dtype=torch.float64),
            (~torch.isfinite(losses)).sum().double(),
        ]
    )
    return sums.reshape(1, 4).cpu()


def score(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    target_names: Sequence[str] | None = None,
    *,
    batch_size: int = 0,
    epoch: int | None = None,
    backoffs: list[tuple[int, int]] | None = None,
    kind: EvalKind = "classification",
    nonfinite: int | None = None,
) -> EvalReport:
    """sklearn's classification report (dict and text) of labels against predictions.

    Classes are every label seen in either array, so that ``target_names`` lines up with them.
    ``nonfinite`` (the samples whose logits held NaN or infinity; ``None``: not counted) is noted in the
    text when there were any: their argmax predictions mean nothing.
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
    if nonfinite:
        text += (
            f"\nNaN or infinite outputs in {nonfinite:,} sample{'s' if nonfinite != 1 else ''}: their "
            "predictions are the argmax of NaN/inf logits and mean nothing.\n"
        )
    accuracy = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    return EvalReport(
        report=report,
        text=text,
        accuracy=accuracy,
        batch_size=batch_size,
        samples=len(y_true),
        epoch=epoch,
        backoffs=backoffs or [],
        kind=kind,
        nonfinite=nonfinite,
    )


def score_lm(
    sums: np.ndarray,
    *,
    kind: EvalKind,
    sequences: int,
    batch_size: int = 0,
    epoch: int | None = None,
    backoffs: list[tuple[int, int]] | None = None,
) -> EvalReport:
    """A language model's report from the summed ``[loss, correct, tokens, non-finite]`` of every batch
    (:func:`lm_sums`)."""
    columns = np.asarray(sums, dtype=np.float64).reshape(-1, 4).sum(0)
    loss_sum, correct, tokens, nonfinite = (float(v) for v in columns)
    if tokens == 0:
        raise UsageValueError(
            "Expected the evaluation data to hold labelled tokens, but every label was -100"
            + (" after the shift (sequences of one token predict nothing)" if kind == "causal_lm" else "")
            + "."
        )
    loss = loss_sum / tokens
    # exp overflows a float past ~709.78; a NaN loss (NaN outputs) has no perplexity either
    perplexity = math.nan if math.isnan(loss) else math.exp(loss) if loss < 709 else math.inf
    accuracy = correct / tokens
    what = "next-token (labels shifted by one)" if kind == "causal_lm" else "masked tokens"
    report = {"loss": loss, "perplexity": perplexity, "token_accuracy": accuracy, "tokens": int(tokens)}
    text = (
        f"{kind} evaluation, {what}: {int(tokens):,} tokens in {sequences:,} sequences\n"
        f"  loss            {loss:.4f}\n"
        f"  perplexity      {perplexity:.4f}\n"
        f"  token accuracy  {accuracy:.4f}\n"
    )
    if nonfinite:
        text += f"  non-finite      {int(nonfinite):,} tokens (NaN or infinite loss)\n"
    return EvalReport(
        report=report,
        text=text,
        accuracy=accuracy,
        batch_size=batch_size,
        samples=sequences,
        epoch=epoch,
        backoffs=backoffs or [],
        kind=kind,
        loss=loss,
        perplexity=perplexity,
        tokens=int(tokens),
        nonfinite=int(nonfinite),
    )
