"""Tests for autobatch.demo: the digits CNN on an emulated small device, and the full demo run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from autobatch.cli import main
from autobatch.demo import DEMO_MEMORY_LIMIT, DigitsCNN, load_digits_data
from autobatch.units import parse_memory_limit

torch.set_num_threads(1)

DEMO_SECONDS = 60.0
"""The issue's budget for the whole demo on 2 CPU cores."""


def test_digits_data_is_split_stratified_and_scaled() -> None:
    digits = load_digits_data(seed=0)
    X_train, y_train = digits.train
    X_test, y_test = digits.test
    assert X_train.shape[1:] == X_test.shape[1:] == (1, 8, 8)
    assert len(y_train) + len(y_test) == 1797 and len(y_test) == 450
    assert float(X_train.min()) >= 0.0 and float(X_train.max()) <= 1.0
    assert digits.target_names == [str(i) for i in range(10)]
    assert torch.bincount(y_test).min() >= 43  # every class held out in proportion
    again = load_digits_data(seed=0)
    assert torch.equal(again.test[1], y_test)


def test_digits_cnn_shapes() -> None:
    model = DigitsCNN()
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert parse_memory_limit(DEMO_MEMORY_LIMIT) == 640 * 1024


@pytest.mark.slow
def test_full_demo(capsys: pytest.CaptureFixture[str]) -> None:
    """The default demo (4 epochs): held-out accuracy ≥ 0.95 with accumulation, in under 60 s."""
    started = time.perf_counter()
    with pytest.warns(UserWarning, match="BatchNorm"):
        code = main(["demo", "--json"])
    seconds = time.perf_counter() - started
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    accuracy = out["evals"][-1]["accuracy"]
    print(
        f"full demo: {seconds:.1f} s wall, fit {out['seconds']:.1f} s, accuracy {accuracy:.4f}"
    )  # -rP shows it

    assert out["epochs"] == 4 and len(out["evals"]) == 4
    assert out["probe"]["micro_batch"] < 32
    assert out["plan"]["accumulation_steps"] > 1 and out["plan"]["effective_batch"] == 32
    assert out["evals"][-1]["accuracy"] >= 0.95
    assert out["evals"][-1]["samples"] == 450
    assert seconds < DEMO_SECONDS, f"the demo took {seconds:.1f} s"
