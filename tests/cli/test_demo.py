"""Tests for autobatch.demo: the digits CNN on an emulated small device, and the full demo run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from autobatch.cli import main
from autobatch.demo import DEMO_MEMORY_LIMIT, DigitsCNN, load_digits_data
from autobatch.units import parse_memory_limit

torch.set_num_threads(1)


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
    """The default demo (4 epochs): held-out accuracy ≥ 0.95 with accumulation, and no warning noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["demo", "--json"])
    assert code == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "BatchNorm" in captured.err and "Warning" not in captured.err

    assert out["epochs"] == 4 and len(out["evals"]) == 4
    assert out["probe"]["micro_batch"] < 32
    assert out["plan"]["accumulation_steps"] > 1 and out["plan"]["effective_batch"] == 32
    assert out["evals"][-1]["accuracy"] >= 0.95
    assert out["evals"][-1]["samples"] == 450


def _demo_threads(user_env: dict[str, str], **env: str) -> int:
    """The CPU threads ``autobatch demo`` trained on, run as a user runs it: the console script."""
    import shutil
    import subprocess

    script = shutil.which("autobatch")
    assert script is not None
    done = subprocess.run(
        [script, "demo", "--epochs", "1", "--no-cache", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=user_env | env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(json.loads(done.stdout)["cpu_threads"])


@pytest.mark.slow
def test_the_demo_runs_on_one_cpu_thread_in_a_users_environment(user_env: dict[str, str]) -> None:
    """The thread policy as a newcomer meets it: no thread pinning anywhere, and still one thread."""
    assert _demo_threads(user_env) == 1


@pytest.mark.slow
def test_a_thread_count_the_user_chose_is_kept(user_env: dict[str, str]) -> None:
    assert _demo_threads(user_env, OMP_NUM_THREADS="2") == 2


def test_the_demo_shows_the_probe_and_the_plan_before_it_trains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In the README's order: the probe, the plan and what BatchNorm means, then training, then the report."""
    from autobatch.training.loop import TrainLoop

    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path))
    train = TrainLoop.run_epoch

    def run_epoch(self: TrainLoop, epoch: int, epochs: int) -> list[float]:
        print(f"<<training epoch {epoch + 1}>>")  # where training begins, among the demo's output
        return train(self, epoch, epochs)

    monkeypatch.setattr(TrainLoop, "run_epoch", run_epoch)
    assert main(["demo", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    stages = [
        "autobatch probe",  # the probe's trials
        "(largest fitting ",  # its verdict
        "plan: ",
        "About BatchNorm",
        "<<training epoch 1>>",
        "autobatch fit",  # the summary of training
        "held-out classification report",
    ]
    assert all(stage in out for stage in stages), out
    assert [out.index(stage) for stage in stages] == sorted(out.index(stage) for stage in stages), out
