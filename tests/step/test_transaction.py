"""Tests for autobatch.step.transaction: one optimizer step, all or nothing, with faults in every phase.

The ranks' side of it (agreement, one rank failing) is in test_distributed.py; here one process.
"""

from __future__ import annotations

import importlib
from typing import Any
from unittest import mock

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import autobatch
from autobatch.errors import OptimizerStepError
from autobatch.memory.device import DeviceMemory
from autobatch.step.stepper import Stepper
from autobatch.step.transaction import run_step, run_update

CPU = torch.device("cpu")


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def data(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, **options: Any) -> autobatch.FitResult:
    options = {"target_batch": 32, "micro_batch": 8, "shuffle": False, "epochs": 2, **options}
    options = {"precision": "fp32", "device": "cpu", "progress": False, **options}
    return autobatch.fit(model, data(), optimizer=optimizer, **options)


def oom_in_adam_state_init(times: int) -> Any:
    """Adam's lazy state initialisation runs out of memory ``times`` times: before anything changed."""
    real = torch.optim.Adam._init_group
    left = [times]

    def init_group(self: Any, *args: Any, **kwargs: Any) -> Any:
        if left[0]:
            left[0] -= 1
            raise torch.OutOfMemoryError("injected in Adam's state initialisation")
        return real(self, *args, **kwargs)

    return init_group


# -- out of memory inside optimizer.step --------------------------------------------------------------


@pytest.mark.parametrize("foreach", [False, True])
def test_an_optimizer_step_that_changed_nothing_is_tried_again_and_applied_once(foreach: bool) -> None:
    reference = mlp()
    train(reference, torch.optim.Adam(reference.parameters(), lr=1e-2, foreach=foreach))
    model = mlp()
    with mock.patch.object(torch.optim.Adam, "_init_group", oom_in_adam_state_init(1)):
        result = train(model, torch.optim.Adam(model.parameters(), lr=1e-2, foreach=foreach))
    assert result.optimizer_steps == 4 and result.skipped_steps == 0 and result.backoffs == []
    for name, value in weights(reference).items():
        assert torch.equal(weights(model)[name], value), name  # bit-identical: the update applied once


def test_an_optimizer_step_that_never_fits_stops_with_nothing_applied() -> None:
    model = mlp()
    before = weights(model)
    with (
        mock.patch.object(torch.optim.Adam, "_init_group", oom_in_adam_state_init(2)),
        pytest.raises(
            OptimizerStepError, match=r"step 1, also when tried again .* nothing .* was applied"
        ) as excinfo,
    ):
        train(model, torch.optim.Adam(model.parameters(), lr=1e-2))
    assert excinfo.value.partial is False and excinfo.value.step == 1
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())


def half_sgd(module: Any, real: Any) -> Any:
    """SGD that updates its first parameter, then runs out of memory (once)."""
    fired = [False]

    def step(
        params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[Any], *a: Any, **k: Any
    ) -> Any:
        if fired[0]:
            return real(params, grads, bufs, *a, **k)
        fired[0] = True
        real(params[:1], grads[:1], bufs[:1], *a, **k)
        raise torch.OutOfMemoryError("injected half-way through SGD")

    return step


def test_an_optimizer_step_that_updated_part_of_the_model_is_never_applied_twice() -> None:
    model = mlp()
    before = weights(model)
    sgd = importlib.import_module("torch.optim.sgd")
    with (
        mock.patch.object(sgd, "_single_tensor_sgd", half_sgd(sgd, sgd._single_tensor_sgd)),
        pytest.raises(OptimizerStepError, match=r"step 1, after it had begun to update") as excinfo,
    ):
        train(model, torch.optim.SGD(model.parameters(), lr=0.1, foreach=False))
    assert excinfo.value.partial is True
    after = weights(model)
    # The first parameter took the one update; a redo would have applied it twice.
    single = mlp()
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    F.cross_entropy(single(data()[0][:32]), data()[1][:32]).backward()
    opt.step()
    assert torch.allclose(after["0.weight"], weights(single)["0.weight"], atol=1e-6)
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert all(torch.equal(after[k], before[k]) for k in ("0.bias", "2.weight", "2.bias"))


def test_adam_counts_its_steps_before_its_fused_update_so_a_failure_there_is_partial() -> None:
    """The fused kernel does not bump the parameters' version counters; the step counters show it ran."""
    adam = importlib.import_module("torch.optim.adam")
    real = adam._fused_adam

    def failing(*args: Any, **kwargs: Any) -> None:
        real(*args, **kwargs)
        raise torch.OutOfMemoryError("injected after the fused update")

    model = mlp()
    with mock.patch.object(adam, "_fused_adam", failing), pytest.raises(OptimizerStepError) as excinfo:
        train(model, torch.optim.Adam(model.parameters(), lr=1e-2, fused=True))
    assert excinfo.value.partial is True


class RaisingSGD(torch.optim.SGD):
    """A step defined outside torch: autobatch cannot see what it changed, so any failure is partial."""

    def step(self, closure: Any = None) -> Any:
        raise torch.OutOfMemoryError("injected in a custom step")


def test_a_custom_optimizer_step_that_runs_out_of_memory_stops_training() -> None:
    model = mlp()
    with pytest.raises(OptimizerStepError, match="can be neither undone nor repeated") as excinfo:
        train(model, RaisingSGD(model.parameters(), lr=0.1))
    assert excinfo.value.partial is True


def test_an_oom_in_the_optimizer_step_of_a_probe_trial_is_a_batch_that_does_not_fit() -> None:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    with (
        mock.patch.object(torch.optim.Adam, "_init_group", oom_in_adam_state_init(10**6)),
        pytest.raises(autobatch.NoBatchFitsError),
    ):
        autobatch.probe(model, data(), optimizer=optimizer, memory_limit="1MiB")


def test_fp16_retry_does_not_unscale_twice() -> None:
    reference = mlp()
    options = {"precision": "fp16", "grad_clip": 10.0}
    expected = autobatch.fit(
        reference, data(), 32, optimizer=torch.optim.Adam(reference.parameters(), lr=1e-2), micro_batch=8,
        shuffle=False, device="cpu", progress=False, **options,
    )  # fmt: skip
    model = mlp()
    with mock.patch.object(torch.optim.Adam, "_init_group", oom_in_adam_state_init(1)):
        got = autobatch.fit(
            model, data(), 32, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), micro_batch=8,
            shuffle=False, device="cpu", progress=False, **options,
        )  # fmt: skip
    assert got.losses == expected.losses and got.skipped_steps == expected.skipped_steps
    for name, value in weights(reference).items():
        assert torch.equal(weights(model)[name], value), name


# -- the step itself ------------------------------------------------------------------------------------


def stepper(model: nn.Module, limit: int | None = None) -> Stepper:
    return Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), DeviceMemory(CPU, limit), "fp32")


def test_a_step_that_fits_reports_its_loss_and_peaks() -> None:
    model = mlp()
    X, y = data(8)
    outcome = run_step(stepper(model, 1 << 20), lambda: [((X[:4], y[:4]), 0.5), ((X[4:], y[4:]), 0.5)])
    assert outcome.fitted and outcome.applied and not outcome.nonfinite and outcome.phase is None
    assert outcome.loss == pytest.approx(float(F.cross_entropy(mlp()(X), y).detach()), rel=1e-5)
    assert outcome.backward_peak is not None and outcome.step_peak is not None
    assert outcome.step_peak >= outcome.backward_peak > 0


def test_a_micro_step_oom_drops_the_step_and_applies_nothing() -> None:
    model = mlp()
    before = weights(model)
    X, y = data(64)
    s = stepper(model, 12 * 1024)  # the parameters fit, a batch of 64 does not
    outcome = run_step(s, lambda: [((X, y), 1.0)])
    assert not outcome.fitted and outcome.phase == "micro-steps" and outcome.oom_ranks == (0,)
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())
    assert all(p.grad is None for p in model.parameters()) and s.pending_loss() == 0.0


def test_errors_in_reading_or_in_the_step_propagate_unchanged() -> None:
    s = stepper(mlp())

    def unreadable() -> list[Any]:
        raise KeyError("sample 7 is corrupt")

    with pytest.raises(KeyError, match="corrupt"):
        run_step(s, unreadable)
    with pytest.raises(RuntimeError, match="shapes"):
        run_step(s, lambda: [((torch.randn(4, 5), torch.zeros(4, dtype=torch.long)), 1.0)])


# -- a framework's own optimizer step (defer_update, run_update) ---------------------------------------


def halves(X: torch.Tensor, y: torch.Tensor) -> Any:
    return lambda: [((X[:4], y[:4]), 0.5), ((X[4:], y[4:]), 0.5)]


def test_a_deferred_step_sums_the_gradients_and_leaves_the_update_to_the_framework() -> None:
    model, reference = mlp(), mlp()
    X, y = data(8)
    s = stepper(model, 1 << 20)
    before = weights(model)
    outcome = run_step(s, halves(X, y), defer_update=True)
    assert outcome.fitted and outcome.deferred and not outcome.applied
    assert all(torch.equal(v, before[k]) for k, v in weights(model).items())  # nothing applied yet
    F.cross_entropy(reference(X), y).backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-6)
    calls = []

    def update() -> bool:  # the framework's step: it zeroes the gradients itself, after
        calls.append(1)
        s.optimizer.step()
        return True

    done = run_update(s, update, outcome.loss)
    assert done.fitted and done.applied and not done.deferred and calls == [1]
    assert done.loss == outcome.loss and s.pending_loss() == 0.0  # the next step starts from nothing
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    for name, value in weights(reference).items():
        assert torch.allclose(weights(model)[name], value, atol=1e-6), name


def test_a_framework_update_that_changed_nothing_is_tried_again_once() -> None:
    model = mlp()
    X, y = data(8)
    s = Stepper(model, torch.optim.Adam(model.parameters(), lr=1e-2), DeviceMemory(CPU, 1 << 20), "fp32")
    outcome = run_step(s, halves(X, y), defer_update=True)
    with mock.patch.object(torch.optim.Adam, "_init_group", oom_in_adam_state_init(1)):
        done = run_update(s, lambda: s.optimizer.step() or True, outcome.loss)
    assert done.fitted and done.retried and done.applied
    assert all(int(state["step"]) == 1 for state in s.optimizer.state.values())  # applied once


@pytest.mark.parametrize("fails", ["twice", "half-way"])
def test_a_framework_update_that_cannot_fit_reports_the_optimizer_step_phase(fails: str) -> None:
    model = mlp()
    X, y = data(8)
    s = Stepper(model, torch.optim.SGD(model.parameters(), lr=0.1), DeviceMemory(CPU, 1 << 20), "fp32")
    outcome = run_step(s, halves(X, y), defer_update=True)

    def update() -> bool:
        if fails == "half-way":
            with torch.no_grad():
                next(model.parameters()).add_(1.0)
        raise torch.OutOfMemoryError("injected in the framework's optimizer step")

    done = run_update(s, update, outcome.loss)
    assert not done.fitted and done.phase == "optimizer step" and done.partial is (fails == "half-way")
    assert all(p.grad is None for p in model.parameters())  # the step's gradients are dropped


# -- non-finite losses --------------------------------------------------------------------------------


def poisoned(steps: set[int]) -> Any:
    """A step_fn whose loss is NaN in the chosen optimizer steps (1-based; 4 micro-steps each)."""
    calls = [0]

    def step_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        calls[0] += 1
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if (calls[0] - 1) // 4 + 1 in steps else loss

    return step_fn


def test_a_nan_loss_skips_its_step_and_training_goes_on() -> None:
    model = mlp()
    result = train(model, torch.optim.SGD(model.parameters(), lr=0.1), step_fn=poisoned({2}))
    assert result.optimizer_steps == 4 and result.skipped_steps == result.nonfinite_steps == 1
    assert all(torch.isfinite(v).all() for v in weights(model).values())


def test_a_run_of_nan_losses_stops_training() -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        autobatch.NonFiniteLossError, match=r"5 optimizer steps in a row \(steps 2-6\)"
    ) as exc:
        train(model, optimizer, step_fn=poisoned(set(range(2, 99))), epochs=9)
    assert (exc.value.first_step, exc.value.steps) == (2, 5)
    assert all(torch.isfinite(v).all() for v in weights(model).values())
