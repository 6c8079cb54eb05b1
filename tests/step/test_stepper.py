"""Tests for autobatch.step.stepper: precision, the loss of a batch, and the scaled optimizer step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from autobatch.memory.device import DeviceMemory
from autobatch.step.stepper import Stepper, StepResult, compute_loss, resolve_precision

torch.set_num_threads(1)

CPU = torch.device("cpu")


def linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


@dataclass
class Output:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


class DictModel(nn.Module):
    """Hugging Face style: ``model(**batch)`` returns an output with ``.loss`` when given labels."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = linear()

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.linear(features)
        return Output(logits, None if labels is None else F.cross_entropy(logits, labels))


def stepper(model: nn.Module, precision: str = "fp32", **kwargs: Any) -> Stepper:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Stepper(model, optimizer, DeviceMemory(CPU, None), precision, **kwargs)


# -- precision --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "expected"), [("auto", "bf16"), ("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32")]
)
def test_resolve_precision_on_cpu(precision: str, expected: str) -> None:
    assert resolve_precision(precision, CPU) == expected


@pytest.mark.parametrize("precision", ["float16", "FP16", "amp", "", None])
def test_resolve_precision_rejects_unknown(precision: Any) -> None:
    with pytest.raises(ValueError, match="precision"):
        resolve_precision(precision, CPU)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_runs_the_forward_in_low_precision(precision: str, dtype: torch.dtype) -> None:
    model = linear()
    with stepper(model, precision).autocast():
        assert model(batch()[0]).dtype == dtype
    with stepper(model, "fp32").autocast():
        assert model(batch()[0]).dtype == torch.float32


# -- compute_loss -----------------------------------------------------------------------------------


def test_compute_loss_of_a_tuple_batch_defaults_to_cross_entropy() -> None:
    model = linear()
    x, y = batch()
    expected = F.cross_entropy(model(x), y)
    torch.testing.assert_close(compute_loss(model, (x, y)), expected)
    torch.testing.assert_close(compute_loss(model, [x, y]), expected)
    mse = compute_loss(model, (x, torch.zeros(8, 3)), loss_fn=F.mse_loss)
    torch.testing.assert_close(mse, F.mse_loss(model(x), torch.zeros(8, 3)))


def test_compute_loss_passes_every_input_but_the_last() -> None:
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = linear()

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.linear(a + b)

    model = TwoInputs()
    x, y = batch()
    torch.testing.assert_close(compute_loss(model, (x, x, y)), F.cross_entropy(model.linear(2 * x), y))


def test_compute_loss_of_a_dict_batch_uses_the_model_loss() -> None:
    model = DictModel()
    x, y = batch()
    torch.testing.assert_close(
        compute_loss(model, {"features": x, "labels": y}), F.cross_entropy(model.linear(x), y)
    )

    class DictOut(nn.Module):
        def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"loss": features.sum() * 0 + 3.0}

    assert float(compute_loss(DictOut(), {"features": x, "labels": y})) == 3.0


def test_compute_loss_uses_step_fn_first() -> None:
    model = linear()
    seen: list[Any] = []

    def step_fn(m: nn.Module, b: Any) -> torch.Tensor:
        seen.append(b)
        return m(b["x"]).pow(2).mean()

    def loss_fn(outputs: Any, targets: Any) -> torch.Tensor:
        raise AssertionError("step_fn replaces loss_fn")

    x, _ = batch()
    loss = compute_loss(model, {"x": x}, loss_fn=loss_fn, step_fn=step_fn)
    torch.testing.assert_close(loss, model(x).pow(2).mean())
    assert len(seen) == 1


def test_dict_output_without_loss_is_a_helpful_error() -> None:
    model = DictModel()
    x, _ = batch()
    with pytest.raises(ValueError, match=r"loss.*step_fn"):
        compute_loss(model, {"features": x})


@pytest.mark.parametrize("bad", [torch.randn(8, 4), 3, "text", (torch.randn(8, 4),)])
def test_batch_without_targets_is_a_helpful_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="step_fn"):
        compute_loss(linear(), bad)


def test_non_scalar_loss_is_a_helpful_error() -> None:
    per_sample = stepper(linear(), loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))
    with pytest.raises(ValueError, match=r"scalar.*\(8,\)"):
        per_sample.forward_backward(batch())
    not_a_tensor = stepper(linear(), step_fn=lambda model, b: 1.0)
    with pytest.raises(ValueError, match=r"scalar.*float"):
        not_a_tensor.forward_backward(batch())


class _Outputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.linear, self.kind = linear(), kind

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.linear(x)
        if self.kind == "dict":
            return {"logits": logits, "aux": logits.sum()}
        if self.kind == "object":
            return Output(logits)
        return logits, logits.sum()


@pytest.mark.parametrize(
    ("kind", "says"),
    [("dict", r"dict with keys \['aux', 'logits'\].*outputs\['logits'\]"), ("object", "outputs.logits"),
     ("tuple", r"tuple of 2.*outputs\[0\]")],
)  # fmt: skip
def test_outputs_the_default_loss_cannot_read_say_what_to_pass(kind: str, says: str) -> None:
    with pytest.raises(TypeError, match=rf"The model returned .*{says}"):
        compute_loss(_Outputs(kind), batch())


# -- micro-steps and optimizer steps ---------------------------------------------------------------


def test_forward_backward_scales_by_weight_and_returns_the_unweighted_loss() -> None:
    model = linear()
    s = stepper(model)
    x, y = batch()
    loss = s.forward_backward((x, y), weight=0.25)
    reference = linear()
    (F.cross_entropy(reference(x), y) * 0.25).backward()
    assert not loss.requires_grad
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), y).detach())
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_optimizer_step_applies_and_zeroes_gradients() -> None:
    model = linear()
    s = stepper(model)
    before = [p.detach().clone() for p in model.parameters()]
    s.forward_backward(batch())
    assert s.optimizer_step().applied is True
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_fp16_step_with_inf_gradients_is_skipped() -> None:
    model = linear()
    s = stepper(model, "fp16", skip_nonfinite=False)
    assert s.scaler.is_enabled()
    before = [p.detach().clone() for p in model.parameters()]
    scale = s.scaler.get_scale()

    s.forward_backward(batch(), weight=float("inf"))
    assert s.optimizer_step().applied is False
    assert s.scaler.get_scale() < scale
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())

    s.forward_backward(batch())
    assert s.optimizer_step().applied is True
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_nonfinite_loss_is_skipped_and_said_so(precision: str) -> None:
    model = linear()
    s = stepper(model, precision)
    before = [p.detach().clone() for p in model.parameters()]
    scale = s.scaler.get_scale()
    s.forward_backward(batch(), weight=float("nan"))
    result = s.optimizer_step()
    assert result.applied is False and result.nonfinite is True
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert s.scaler.get_scale() == scale  # not the scaler's business: its scale is left alone
    s.forward_backward(batch())
    assert s.optimizer_step() == StepResult(applied=True)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_gradients_are_caught_by_clipping(precision: str) -> None:
    model = linear()
    s = stepper(model, precision, grad_clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]

    def sqrt_of_zero(model: nn.Module, b: Any) -> torch.Tensor:  # finite loss, NaN gradients
        return (model(b[0]) * 0).sum().sqrt()

    s.step_fn = sqrt_of_zero
    s.forward_backward(batch())
    assert s.optimizer_step() == StepResult(applied=False, nonfinite=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_probe_steps_whatever_the_loss(precision: str) -> None:
    s = stepper(linear(), precision, skip_nonfinite=False)
    s.forward_backward(batch(), weight=float("inf"))
    assert s.optimizer_step() == StepResult(applied=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grad_clip_bounds_the_update_after_unscaling(precision: str) -> None:
    model = linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    s = Stepper(model, optimizer, DeviceMemory(CPU, None), precision, grad_clip=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    s.forward_backward(batch())
    assert s.optimizer_step().applied is True
    update = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)])
    # Clipping the scaled gradients (before unscale_) would leave an update 65536× smaller.
    assert float(update.norm()) == pytest.approx(1e-3, rel=1e-2)


def oom_between_unscale_and_step(monkeypatch: pytest.MonkeyPatch, s: Stepper) -> None:
    """Run a step whose clipping (after unscale_, before scaler.step) runs out of memory."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip_once_oom(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("injected between unscale_ and step")
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_once_oom)
    s.forward_backward(batch())
    with pytest.raises(torch.OutOfMemoryError):
        s.optimizer_step()


def test_discard_step_lets_the_next_step_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model = linear()
    s = stepper(model, "fp16", grad_clip=1.0)
    oom_between_unscale_and_step(monkeypatch, s)

    s.discard_step()

    assert all(p.grad is None for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    s.forward_backward(batch())
    assert s.optimizer_step().applied is True
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_an_interrupted_optimizer_step_tried_again_unscales_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the transaction's retry does: the second try skips the unscale the first one completed."""
    reference, model = linear(), linear()
    expected = stepper(reference, "fp16", grad_clip=1.0)
    expected.forward_backward(batch())
    expected.optimizer_step()
    s = stepper(model, "fp16", grad_clip=1.0)
    oom_between_unscale_and_step(monkeypatch, s)
    assert s.unscaled and not s.clipped
    assert s.optimizer_step().applied is True
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_state_tensors_cover_parameters_gradients_and_optimizer_state() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    optimizer = torch.optim.Adam(model.parameters())
    s = Stepper(model, optimizer, DeviceMemory(CPU, None), "fp32")
    ids = {id(t) for t in s.state_tensors()}
    assert all(id(t) in ids for t in [*model.parameters(), *model.buffers()])
    s.forward_backward(batch())
    assert all(id(p.grad) in {id(t) for t in s.state_tensors()} for p in model.parameters())
    s.optimizer_step()
    moments = [v for st in optimizer.state.values() for k, v in st.items() if k != "step"]
    held = {id(t) for t in s.state_tensors()}
    assert moments and all(id(m) in held for m in moments)
    # Adam's step counters are 0-dim host tensors (unless capturable or fused): no device memory on a GPU.
    counters = [st["step"] for st in optimizer.state.values()]
    assert counters and not any(id(c) in held for c in counters)


def test_pending_loss_is_the_weighted_sum_of_the_micro_losses() -> None:
    model = linear()
    s = stepper(model)
    first, second = batch(8, seed=1), batch(8, seed=2)
    a = s.forward_backward(first, 0.75)
    b = s.forward_backward(second, 0.25)
    assert s.pending_loss() == pytest.approx(float(0.75 * a + 0.25 * b), rel=1e-6)
    s.optimizer_step()
    assert s.pending_loss() == 0.0
    s.forward_backward(first, 1.0)
    s.discard_step()  # a failed step's losses are forgotten with its gradients
    c = s.forward_backward(second, 1.0)
    assert s.pending_loss() == pytest.approx(float(c), rel=1e-6)


def test_materialise_gradients_gives_every_trainable_parameter_one() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    s = stepper(model)
    s.forward_backward(((torch.randn(2, 4)), torch.tensor([0, 1])))
    model[0].weight.grad = None
    s.materialise_gradients()
    assert torch.equal(model[0].weight.grad, torch.zeros_like(model[0].weight))


def test_a_step_on_fake_tensors_reads_no_values_and_places_the_runtime_first() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from autobatch.step.cudakernels import KernelPolicy

    with FakeTensorMode(allow_non_fake_inputs=True):
        model = nn.Linear(4, 3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        workspace = torch.empty(1 << 20, dtype=torch.uint8)
        policy = KernelPolicy(80)
        s = Stepper(model, optimizer, DeviceMemory(CPU, None), "bf16", values=False, kernels=policy,
                    runtime=[workspace], skip_nonfinite=False)  # fmt: skip
        s.forward_backward(batch())
        assert s.pending_loss() == 0.0  # float() of a fake loss would raise
        assert s.optimizer_step().applied
    assert s.weight_tensors()[0] is workspace  # resident before the weights, as after the first matmul
    assert s.state_tensors()[0] is workspace
