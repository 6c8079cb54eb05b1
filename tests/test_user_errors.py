"""Clear errors where the user's model or functions give autobatch something it cannot use.

Lazy modules (their parameters have no shape before a first forward), and a ``step_fn`` or ``loss_fn``
whose loss cannot be backpropagated: each is refused with a usage error that names the argument, what
was expected and what was got, instead of a raw torch error from deep inside a step.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.parameter import is_lazy

import autobatch
from autobatch.errors import UsageTypeError, UsageValueError

torch.set_num_threads(1)

X, Y = torch.randn(64, 6), torch.randint(0, 3, (64,))
OPTIONS = {"memory_limit": "1MiB", "device": "cpu", "precision": "fp32"}


def lazy_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))


def call(entry: str, model: nn.Module, **options: Any) -> Any:
    if entry == "fit":
        return autobatch.fit(model, (X, Y), target_batch=32, progress=False, **OPTIONS, **options)
    if entry == "probe":
        return autobatch.probe(model, (X, Y), **OPTIONS, **options)
    return autobatch.try_batch(model, (X, Y), 8, **OPTIONS, **options)


@pytest.mark.parametrize("entry", ["fit", "probe", "try_batch"])
def test_a_model_with_lazy_modules_is_refused_with_the_fix_and_left_as_it_was(entry: str) -> None:
    model = lazy_mlp()
    rng = torch.get_rng_state()
    with pytest.raises(UsageValueError) as caught:
        call(entry, model)
    message = str(caught.value)
    assert "Expected `model` to have initialised parameters" in message
    assert (
        "(0.weight, 0.bias)" in message
        and "Run one forward on a sample first" in message
        and "model(sample)" in message
    )
    assert is_lazy(model[0].weight), "a refused call changes nothing: the model is still lazy"
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_fix_the_error_names_works() -> None:
    model = lazy_mlp()
    model(X[:2])  # the dry run the message asks for
    assert autobatch.probe(model, (X, Y), **OPTIONS).micro_batch >= 1


def test_a_step_fn_that_returns_an_integer_tensor_is_refused_naming_it() -> None:
    def count_correct(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return (model(x).argmax(-1) == y).sum()  # an int64 count, not a loss

    with pytest.raises(UsageTypeError) as caught:
        call("probe", nn.Linear(6, 3), step_fn=count_correct)
    message = str(caught.value)
    assert "Expected `step_fn` to return a floating-point loss" in message and "torch.int64" in message


def test_a_loss_fn_whose_loss_does_not_require_grad_is_refused_naming_it() -> None:
    def detached(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets).detach()

    with pytest.raises(
        UsageValueError, match=r"Expected `loss_fn` to return a loss that depends on the model"
    ):
        call("fit", nn.Linear(6, 3), loss_fn=detached, micro_batch=8)


def test_a_step_fn_that_returns_no_scalar_is_refused_naming_it() -> None:
    def per_sample(model: nn.Module, batch: Any) -> torch.Tensor:
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    with pytest.raises(
        UsageValueError, match=r"`step_fn` to return the loss as a scalar tensor, .* shape \(\d+,\)"
    ):
        call("try_batch", nn.Linear(6, 3), step_fn=per_sample)
