"""Tests for autobatch.training.evaluate: predictions, sklearn's classification report, evaluation
back-off."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report
from torch import nn

from autobatch.errors import NoBatchFitsError, UsageTypeError, UsageValueError
from autobatch.memory.device import DeviceMemory, Measurement
from autobatch.result import EvalReport
from autobatch.step.data import as_source
from autobatch.training.evalcheck import CHECKED_SAMPLES, check_eval_data
from autobatch.training.evaluate import evaluate, next_batch, predict, score
from autobatch.training.metrics import predict_counted

torch.set_num_threads(1)

CPU = torch.device("cpu")


def mlp(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, classes))


def data(n: int = 50, seed: int = 0, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, classes, (n,), generator=g)


@dataclass
class Output:
    logits: torch.Tensor


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        return Output(self.net(features))


def no_autocast() -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


# -- predict ----------------------------------------------------------------------------------------


def test_predict_tuple_batch_is_argmax_of_logits() -> None:
    model = mlp()
    x, y = data()
    predictions, labels = predict(model, (x, y))
    torch.testing.assert_close(predictions, model(x).argmax(-1))
    torch.testing.assert_close(labels, y)


def test_predict_dict_batch_reads_logits_and_labels() -> None:
    model = DictModel()
    x, y = data()
    predictions, labels = predict(model, {"features": x, "labels": y})
    torch.testing.assert_close(predictions, model.net(x).argmax(-1))
    torch.testing.assert_close(labels, y)

    class Mapped(nn.Module):
        def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": model.net(features)}

    predictions, _ = predict(Mapped(), {"features": x, "labels": y})
    torch.testing.assert_close(predictions, model.net(x).argmax(-1))


def test_predict_token_logits_drops_ignored_labels() -> None:
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(1))
    labels[0, 3:] = -100
    labels[2, 1:] = -100

    class Fixed(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return logits

    predictions, kept = predict(Fixed(), (torch.zeros(3, 5), labels))
    keep = labels != -100
    assert predictions.shape == kept.shape == (int(keep.sum()),)
    torch.testing.assert_close(predictions, logits.argmax(-1)[keep])
    torch.testing.assert_close(kept, labels[keep])
    assert bool((kept != -100).all())


def test_predict_without_logits_or_labels_is_a_helpful_error() -> None:
    class NoLogits(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "nothing"

    with pytest.raises(TypeError, match="predict_fn"):
        predict(NoLogits(), (torch.zeros(2, 6), torch.zeros(2)))
    with pytest.raises(ValueError, match="labels"):
        predict(mlp(), torch.zeros(2, 6))


# -- score ------------------------------------------------------------------------------------------


def test_score_equals_sklearn_classification_report() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 4, 200))

    result = score(y_true, y_pred)

    assert result.report == classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert result.text == classification_report(y_true, y_pred, digits=4, zero_division=0)
    assert result.accuracy == pytest.approx(float((y_true == y_pred).mean()))
    assert result.samples == 200


def test_score_with_target_names_lists_every_class() -> None:
    y_true = np.array([0, 1, 1, 0, 1])
    y_pred = np.array([0, 1, 0, 0, 1])  # class 2 is never seen
    names = ["cat", "dog", "bird"]

    result = score(y_true, y_pred, names)

    expected = classification_report(
        y_true, y_pred, labels=[0, 1, 2], target_names=names, output_dict=True, zero_division=0
    )
    assert result.report == expected
    assert {"cat", "dog", "bird"} <= set(result.report)
    assert result.report["bird"]["support"] == 0
    assert "bird" in result.text


@pytest.mark.parametrize("names", [["a"], ["a", "b"]])
def test_score_refuses_too_few_target_names(names: list[str]) -> None:
    with pytest.raises(ValueError, match=r"target_names.*0\.\.2"):
        score(np.array([0, 1, 2]), np.array([0, 1, 1]), names)


# -- evaluate ---------------------------------------------------------------------------------------


def expected_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        predictions = model(x).argmax(-1)
    return classification_report(y.numpy(), predictions.numpy(), output_dict=True, zero_division=0, **kwargs)


@pytest.mark.parametrize("batch_size", [7, 50, 1000])
def test_evaluate_scores_every_sample(batch_size: int) -> None:
    model = mlp()
    x, y = data()
    model.train()

    report = evaluate(model, as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=batch_size)

    assert isinstance(report, EvalReport)
    assert model.training, "the model's mode is restored"
    assert report.samples == 50 and report.batch_size == min(batch_size, 50)
    assert report.report == expected_report(model, x, y)


def test_evaluate_in_eval_mode_uses_running_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4))
    x, y = data()
    model.train()
    model(x * 3 + 1)  # move the running statistics away from the batch statistics
    report = evaluate(model, as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=5)
    assert report.report == expected_report(model, x, y)


def test_evaluate_backs_off_on_out_of_memory() -> None:
    model = mlp()
    x, y = data()
    sizes: list[int] = []

    def predict_fn(m: nn.Module, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(len(b[0]))
        if len(b[0]) > 6:
            raise torch.OutOfMemoryError("injected")
        return predict(m, b)

    report = evaluate(
        model, as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=32, predict_fn=predict_fn
    )

    assert report.backoffs == [(32, 16), (16, 8), (8, 4)]
    assert report.batch_size == 4
    assert report.samples == 50
    assert report.report == expected_report(model, x, y)
    assert max(sizes[4:]) <= 4


def test_evaluate_under_an_emulated_limit_backs_off() -> None:
    model = nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 4))
    x, y = data(64)
    memory = DeviceMemory(CPU, 150_000)  # parameters ≈ 16 KB; 64 × 512 activations ≈ 131 KB each

    report = evaluate(model, as_source((x, y)), memory, no_autocast, batch_size=64, target_names=list("abcd"))

    assert report.backoffs and report.batch_size < 64
    assert report.samples == 64
    assert report.report == expected_report(model, x, y, labels=[0, 1, 2, 3], target_names=list("abcd"))


def test_evaluate_raises_when_nothing_fits() -> None:
    def predict_fn(m: nn.Module, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise torch.OutOfMemoryError("injected")

    model = mlp()
    model.train()
    with pytest.raises(NoBatchFitsError, match="evaluation"):
        evaluate(
            model,
            as_source(data()),
            DeviceMemory(CPU, None),
            no_autocast,
            batch_size=4,
            predict_fn=predict_fn,
        )
    assert model.training


def test_eval_report_to_dict() -> None:
    report = score(np.array([0, 1, 1]), np.array([0, 1, 0]), epoch=2)
    out = report.to_dict()
    assert out["epoch"] == 2 and out["samples"] == 3
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["report"] == report.report


def test_a_backed_off_evaluation_pads_each_piece_to_its_own_longest_sample() -> None:
    from tests.models import SequenceDataset, TransformerClassifier, pad_collate

    dataset = SequenceDataset(24, min_len=2, max_len=40, seed=5)
    widths: list[tuple[int, int]] = []

    def predict_fn(m: nn.Module, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = b[0]
        widths.append((tokens.shape[1], int((tokens != 0).sum(1).max())))
        if len(tokens) > 4:
            raise torch.OutOfMemoryError("injected")
        return predict(m, b)

    source = as_source(torch.utils.data.DataLoader(dataset, collate_fn=pad_collate))
    report = evaluate(
        TransformerClassifier(),
        source,
        DeviceMemory(CPU, None),
        no_autocast,
        batch_size=8,
        predict_fn=predict_fn,
    )
    assert report.backoffs == [(8, 4)] and report.samples == 24 and report.kind == "classification"
    assert all(width == longest for width, longest in widths)  # never wider than its own samples need


# -- what the evaluation needs of its data: checked from a few samples before training ----------------


class Samples(torch.utils.data.Dataset[Any]):
    """``n`` samples made by ``make(i)``, counting the reads."""

    def __init__(self, n: int, make: Any) -> None:
        self.n, self.make, self.reads = n, make, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        self.reads += 1
        return self.make(i)


def feature(i: int) -> torch.Tensor:
    return torch.full((6,), float(i % 7))


ACCEPTED = {
    "int tensors": (lambda: as_source(data()), "classification"),
    "bool labels": (lambda: as_source((data()[0], data()[1] > 1)), "classification"),
    "python ints": (lambda: as_source(Samples(10, lambda i: (feature(i), i % 3))), "classification"),
    "numpy ints": (lambda: as_source(Samples(10, lambda i: (feature(i), np.int64(i % 3)))), "classification"),
    "token labels": (
        lambda: as_source(Samples(10, lambda i: (torch.zeros(5), torch.tensor([1, 2, -100, 0, 3])))),
        "classification",
    ),
    "dicts with labels": (
        lambda: as_source(Samples(10, lambda i: {"x": feature(i), "labels": 1})),
        "classification",
    ),
    "token ids": (lambda: as_source((torch.zeros(8, 5), torch.randint(0, 9, (8, 5)))), "causal_lm"),
    "dicts of input_ids": (
        lambda: as_source(
            Samples(10, lambda i: {"input_ids": torch.arange(5), "attention_mask": torch.ones(5)})
        ),
        "masked_lm",
    ),
    "anything, with a predict_fn": (
        lambda: as_source(Samples(10, lambda i: (feature(i), "cat"))),
        "predict_fn",
    ),
}


@pytest.mark.parametrize(("make", "kind"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_check_eval_data_accepts_what_the_evaluation_can_score(make: Any, kind: str) -> None:
    check_eval_data(make(), kind)


REFUSED = {
    "strings": (
        lambda i: (feature(i), ["cat", "dog"][i % 2]),
        "classification",
        UsageTypeError,
        r"integer class indices.*but got strings \('cat'\): map them to class indices",
    ),
    "floats": (
        lambda i: (feature(i), 0.5 * i),
        "classification",
        UsageTypeError,
        r"but got float64 labels: regression targets, or class indices stored as floats",
    ),
    "multi-hot floats": (
        lambda i: (feature(i), torch.tensor([1.0, 0.0, 1.0])),
        "classification",
        UsageTypeError,
        r"float32 labels of shape \[3\] per sample, multi-hot: multilabel targets",
    ),
    "label lists": (
        lambda i: (feature(i), [1, 0, 1]),
        "classification",
        UsageTypeError,
        r"but got a list of 3 values \(Tensor\): a list of labels per sample, as multilabel targets are",
    ),
    "dicts without labels": (
        lambda i: {"x": feature(i), "target": 1},
        "classification",
        UsageValueError,
        r"dicts to hold `labels` for the classification evaluation, but got keys \['target', 'x'\]",
    ),
    "language model dicts without tokens": (
        lambda i: {"x": feature(i)},
        "causal_lm",
        UsageValueError,
        r"dicts to hold `labels` \(or `input_ids`, for a language model\) for the causal_lm evaluation",
    ),
    "float token labels": (
        lambda i: (torch.zeros(5), torch.rand(5)),
        "masked_lm",
        UsageTypeError,
        r"token ids \[batch, tokens\] \(an integer tensor\), but got float32 labels of shape \[5\] per "
        r"sample",
    ),
}


@pytest.mark.parametrize(("make", "kind", "error", "match"), REFUSED.values(), ids=REFUSED.keys())
def test_check_eval_data_refuses_labels_the_evaluation_cannot_score(
    make: Any, kind: str, error: type[Exception], match: str
) -> None:
    dataset = Samples(100_000, make)
    with pytest.raises(error, match=match) as caught:
        check_eval_data(as_source(dataset, name="eval_data"), kind)
    assert str(caught.value).startswith("Expected `eval_data` ")
    assert "predict_fn=lambda model, batch: (predictions, labels)" in str(caught.value)
    assert "leave out `eval_data`" in str(caught.value)
    assert dataset.reads <= CHECKED_SAMPLES, "a large dataset is checked on a few samples"


def test_check_eval_data_reads_samples_spread_over_the_data() -> None:
    # Only the last sample is bad: the check reads the first and the last, and those between.
    dataset = Samples(1_000, lambda i: (feature(i), 0.5 if i == 999 else 1))
    with pytest.raises(UsageTypeError, match="float"):
        check_eval_data(as_source(dataset, name="eval_data"), "classification")
    assert dataset.reads == CHECKED_SAMPLES


def test_predict_refuses_labels_that_are_not_one_class_per_output() -> None:
    model = mlp()
    x = data()[0][:5]
    with pytest.raises(
        UsageValueError, match=r"logits \(5, 4\) and labels \(5, 4\) \(multilabel targets\?\)"
    ):
        predict(model, (x, torch.ones(5, 4, dtype=torch.long)))
    with pytest.raises(UsageTypeError, match=r"float32 labels: regression targets"):
        predict(model, (x, torch.rand(5)))
    predictions, labels = predict(model, (x, torch.arange(5).reshape(5, 1)))  # [B, 1] labels are one a row
    assert predictions.shape == labels.shape == (5,)


# -- NaN and infinite outputs ------------------------------------------------------------------------


class Poisoned(nn.Module):
    """The MLP, with NaN logits for samples whose first feature is above 1 and infinite ones below -1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x).masked_fill(x[:, :1] > 1, float("nan"))
        return out.masked_fill(x[:, :1] < -1, float("-inf"))


def test_nonfinite_outputs_are_counted_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    x, y = data(80)
    expected = int(((x[:, 0] > 1) | (x[:, 0] < -1)).sum())
    assert 0 < expected < 80
    with caplog.at_level(logging.WARNING, logger="autobatch.training.evaluate"):
        report = evaluate(
            Poisoned(), as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=7, epoch=2
        )
    assert report.nonfinite == expected and report.samples == 80
    assert report.headline().endswith(f"NaN/inf outputs in {expected} samples")
    assert f"NaN or infinite outputs in {expected} samples" in report.text
    assert report.to_dict()["nonfinite"] == expected
    (warning,) = caplog.records  # once, though 12 batches ran
    assert warning.getMessage().startswith(
        f"evaluation after epoch 3: the model's outputs were NaN or infinite in {expected} samples"
    )


def test_finite_outputs_say_nothing_and_a_predict_fn_is_not_counted() -> None:
    x, y = data()
    clean = evaluate(mlp(), as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=16)
    assert clean.nonfinite == 0 and "NaN" not in clean.headline() + clean.text
    own = evaluate(
        Poisoned(), as_source((x, y)), DeviceMemory(CPU, None), no_autocast, batch_size=16, predict_fn=predict
    )
    assert own.nonfinite is None and own.to_dict()["nonfinite"] is None


def test_nan_logits_at_ignored_positions_are_not_counted() -> None:
    logits = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 5, (3, 4), generator=torch.Generator().manual_seed(1))
    labels[0, 2:] = -100
    logits[0, 3] = float("nan")  # padding: not scored
    logits[1, 1, 2] = float("inf")  # scored: sample 1 counts once, though two positions are bad
    logits[1, 3, 0] = float("nan")

    class Fixed(nn.Module):
        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return logits[: len(tokens)]

    _, kept, nonfinite = predict_counted(Fixed(), (torch.zeros(3, 4), labels))
    assert int(nonfinite.sum()) == 1 and len(kept) == 10


def test_nonfinite_token_losses_of_a_language_model_are_counted() -> None:
    vocabulary, bad = 7, 3

    class Bigram(nn.Module):
        """Logits of the next token from the current one; token 3's row is NaN."""

        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.table = nn.Embedding(vocabulary, vocabulary)
            with torch.no_grad():
                self.table.weight[bad] = float("nan")

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.table(tokens)

    tokens = torch.randint(0, vocabulary, (12, 6), generator=torch.Generator().manual_seed(2))
    labels = tokens.clone()
    labels[:3, 4:] = -100
    # The logits at t score the label at t + 1: a NaN loss wherever token t is `bad` and t + 1 is labelled.
    expected = int(((tokens[:, :-1] == bad) & (labels[:, 1:] != -100)).sum())
    assert expected > 0
    report = evaluate(
        Bigram(),
        as_source((tokens, labels)),
        DeviceMemory(CPU, None),
        no_autocast,
        batch_size=5,
        kind="causal_lm",
    )
    assert report.nonfinite == expected and report.tokens == int((labels[:, 1:] != -100).sum())
    assert math.isnan(report.loss) and math.isnan(report.perplexity)  # the loss is what it is
    assert f"non-finite      {expected} tokens" in report.text
    assert report.headline().endswith(f"NaN/inf outputs in {expected} tokens")


# -- the evaluation batch: from the memory model -----------------------------------------------------


def test_next_batch_is_the_line_through_the_resident_bytes_and_the_peak() -> None:
    memory = DeviceMemory(CPU, 100_000)
    measured = Measurement(peak_bytes=30_000, resident_bytes=10_000)  # 2,500 bytes a sample at 8
    assert next_batch(memory, measured, 8, cap=10_000) == 36  # (100,000 - 10,000) / 2,500
    assert next_batch(memory, measured, 8, cap=20) == 20  # capped by the data
    assert next_batch(memory, Measurement(peak_bytes=99_000, resident_bytes=10_000), 8, cap=99) == 8
    unmeasured = DeviceMemory(CPU, None)
    assert next_batch(unmeasured, Measurement(), 8, cap=1_000) == 4 * 8  # nothing measured


def test_evaluate_grows_from_a_measured_first_batch_without_running_out_of_memory(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Sequential(nn.Linear(6, 512), nn.ReLU(), nn.Linear(512, 4))
    x, y = data(400)
    memory = DeviceMemory(CPU, 150_000)  # parameters ≈ 16 KB; 512 activations of 4 bytes a sample
    with caplog.at_level(logging.DEBUG, logger="autobatch.training.evaluate"):
        report = evaluate(model, as_source((x, y)), memory, no_autocast, first_batch=4)
    assert report.backoffs == []
    assert 4 < report.batch_size < 400
    assert report.samples == 400 and report.report == expected_report(model, x, y)
    assert f"batch 4 measured; continuing with {report.batch_size}" in caplog.text
    # The size the memory model chose fits, and is near the largest that does.
    fits = evaluate(model, as_source((x, y)), memory, no_autocast, batch_size=report.batch_size)
    assert fits.backoffs == []
    larger = evaluate(model, as_source((x, y)), memory, no_autocast, batch_size=2 * report.batch_size)
    assert larger.backoffs
