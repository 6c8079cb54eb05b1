"""Tests for autobatch.training.runner: a step whose optimizer step is a framework's own (``defer_update``)
and a loss divided by the whole step's items (``loss_over_step_items``), as the Hugging Face Trainer has them.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autobatch.errors import OptimizerStepError, UsageValueError
from autobatch.memory.device import DeviceMemory
from autobatch.step.data import DataSource, StepData
from autobatch.step.stepper import Stepper
from autobatch.training.runner import StepRunner

CPU = torch.device("cpu")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def tokens(n: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` samples of 5 positions each; labels -100 (ignored) at random positions."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 5, 6, generator=g), torch.randint(0, 3, (n, 5), generator=g)
    y[torch.rand(n, 5, generator=g) < 0.4] = -100
    return X, y


def step_data(X: torch.Tensor, y: torch.Tensor) -> StepData:
    return DataSource(torch.utils.data.TensorDataset(X, y), tensors=(X, y)).fetch(list(range(len(X))))


def items(batch: Any) -> int:
    return int(batch[1].ne(-100).sum())


def runner(model: nn.Module, micro: int, **kwargs: Any) -> StepRunner:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step_fn = kwargs.pop("step_fn", None)
    stepper = Stepper(model, optimizer, DeviceMemory(CPU, None), "fp32", step_fn=step_fn)
    return StepRunner(stepper, stepper.memory, micro, num_items=items, **kwargs)


def full_batch(X: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """One SGD step on the whole batch, the token-mean loss."""
    model = mlp()
    F.cross_entropy(model(X).flatten(0, 1), y.flatten(), ignore_index=-100).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    return model


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6)


def test_a_loss_divided_by_the_steps_items_weighs_one_and_gives_the_full_batch_gradient() -> None:
    X, y = tokens()
    model = mlp()
    seen: list[float] = []

    def summed(m: nn.Module, batch: Any) -> torch.Tensor:  # Hugging Face's loss with num_items_in_batch
        assert r.step_items is not None
        seen.append(r.step_items)
        logits = m(batch[0]).flatten(0, 1)
        return F.cross_entropy(logits, batch[1].flatten(), ignore_index=-100, reduction="sum") / r.step_items

    r = runner(model, 7, step_fn=summed, loss_over_step_items=True)
    loss = r.optimizer_step(step_data(X, y), len(X))
    assert seen == [float(y.ne(-100).sum())] * 4  # 4 micro-batches of 6, one count: the whole step's
    assert_same_weights(model, full_batch(X, y))
    expected = F.cross_entropy(mlp()(X).flatten(0, 1), y.flatten()).detach()
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_loss_over_step_items_needs_num_items() -> None:
    model = mlp()
    stepper = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), DeviceMemory(CPU, None), "fp32")
    with pytest.raises(UsageValueError, match="num_items"):
        StepRunner(stepper, stepper.memory, 4, loss_over_step_items=True)


def test_a_deferred_step_applies_nothing_until_the_framework_updates_once() -> None:
    X, y = tokens()
    model = mlp()

    def token_mean(m: nn.Module, batch: Any) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]).flatten(0, 1), batch[1].flatten(), ignore_index=-100)

    r = runner(model, 7, step_fn=token_mean, defer_update=True)
    before = [p.detach().clone() for p in model.parameters()]
    r.optimizer_step(step_data(X, y), len(X))
    assert r.pending and r.steps == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    with pytest.raises(RuntimeError, match="still pending"):
        r.optimizer_step(step_data(X, y), len(X))
    optimizer = r.stepper.optimizer
    outcome = r.update(lambda: optimizer.step() or True)
    optimizer.zero_grad(set_to_none=True)  # what the framework's loop does after its step
    assert outcome.applied and not r.pending and r.steps == 1 and r.samples == len(X)
    assert_same_weights(model, full_batch(X, y))
    with pytest.raises(RuntimeError, match="No step is waiting"):
        r.update(lambda: True)


def test_a_framework_update_that_runs_out_of_memory_after_changing_weights_stops_training() -> None:
    X, y = tokens()
    model = mlp()
    r = runner(model, 24, defer_update=True, step_fn=lambda m, b: m(b[0]).logsumexp(-1).mean())
    r.optimizer_step(step_data(X, y), len(X))

    def update() -> bool:
        with torch.no_grad():
            next(model.parameters()).mul_(0.5)
        raise torch.OutOfMemoryError("injected after the first parameter's update")

    with pytest.raises(OptimizerStepError, match="step 1, after it had begun") as excinfo:
        r.update(update)
    assert excinfo.value.partial and r.steps == 0
