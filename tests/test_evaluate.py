"""Tests for autobatch.evaluate: predictions, sklearn's classification report, evaluation back-off."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import classification_report
from torch import nn

from autobatch.data import as_source
from autobatch.errors import NoBatchFitsError
from autobatch.evaluate import evaluate, predict, score
from autobatch.memory import DeviceMemory
from autobatch.result import EvalReport

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
