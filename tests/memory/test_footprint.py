"""Tests for autobatch.memory.footprint: "model state" is weights, gradients and optimizer state,
everywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autobatch.memory.footprint import model_state


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.BatchNorm1d(20), nn.Linear(20, 3))


def step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 10)).sum().backward()
    optimizer.step()


PARAMS = (10 * 20 + 20) + (20 + 20) + (20 * 3 + 3)  # the linear layers and BatchNorm's affine weights
BUFFERS = 20 + 20 + 1  # running mean and variance (fp32), the batch count (int64)


@pytest.mark.parametrize(
    ("make", "per_parameter"),
    [
        (lambda p: torch.optim.AdamW(p), 2),
        (lambda p: torch.optim.Adam(p, amsgrad=True), 3),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 1),
        (lambda p: torch.optim.RMSprop(p), 1),
    ],
    ids=["adamw", "amsgrad", "sgd-momentum", "rmsprop"],
)
def test_an_optimizer_without_state_is_estimated_and_the_estimate_is_what_it_makes(
    make: object, per_parameter: int
) -> None:
    model = net()
    optimizer = make(model.parameters())  # type: ignore[operator]
    before = model_state(model, optimizer)
    assert before.estimated and before.optimizer == per_parameter * 4 * PARAMS
    assert before.weights == 4 * PARAMS + 4 * 40 + 8 and before.gradients == 4 * PARAMS
    step(model, optimizer)
    after = model_state(model, optimizer)
    assert not after.estimated
    # Measured: the moments as estimated, plus the small `step` counters some optimizers keep.
    assert before.optimizer <= after.optimizer <= before.optimizer + 8 * 6
    assert after.total == after.weights + after.gradients + after.optimizer


def test_plain_sgd_holds_no_state_and_says_so_without_an_estimate() -> None:
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert model_state(model, optimizer).optimizer == 0
    step(model, optimizer)
    state = model_state(model, optimizer)
    assert state.optimizer == 0 and not state.estimated


def test_frozen_parameters_have_no_gradients_or_moments() -> None:
    model = net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    state = model_state(model, torch.optim.AdamW(p for p in model.parameters() if p.requires_grad))
    trainable = PARAMS - (10 * 20 + 20)
    assert state.gradients == 4 * trainable and state.optimizer == 2 * 4 * trainable


def test_describe_names_the_three_parts() -> None:
    text = model_state(net(), torch.optim.AdamW(net().parameters())).describe()
    assert all(word in text for word in ("weights", "gradients", "optimizer state", "estimated"))
