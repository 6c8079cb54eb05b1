"""Tests for autobatch.step.state: each piece a training step changes is put back bit for bit."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from autobatch.step.state import snapshot
from tests.models import CNN


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 2, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def cnn() -> CNN:
    torch.manual_seed(0)
    return CNN()


def test_parameters_and_buffers(cnn: CNN) -> None:
    train_steps(cnn, torch.optim.SGD(cnn.parameters(), lr=0.1))
    params = {n: p.detach().clone() for n, p in cnn.named_parameters()}
    buffers = {n: b.clone() for n, b in cnn.named_buffers()}
    storages = [t.data_ptr() for t in [*cnn.parameters(), *cnn.buffers()]]
    snap = snapshot(cnn)

    train_steps(cnn, torch.optim.SGD(cnn.parameters(), lr=0.1), seed=1)
    bn = cnn.features[1]
    assert not torch.equal(bn.running_mean, buffers["features.1.running_mean"])
    assert int(bn.num_batches_tracked) == 4
    snap.restore()

    for n, p in cnn.named_parameters():
        assert torch.equal(p, params[n]), n
    for n, b in cnn.named_buffers():
        assert torch.equal(b, buffers[n]) and b.dtype == buffers[n].dtype, n
    assert int(bn.num_batches_tracked) == 2
    # Restored in place: references the user holds stay valid.
    assert [t.data_ptr() for t in [*cnn.parameters(), *cnn.buffers()]] == storages


def test_snapshot_is_a_host_copy_not_a_reference(cnn: CNN) -> None:
    snap = snapshot(cnn)
    for tensor, saved, _, _ in snap.tensors:
        assert saved.device.type == "cpu"
        assert saved.data_ptr() != tensor.data_ptr()


def test_requires_grad_and_gradients(cnn: CNN) -> None:
    cnn.head.requires_grad_(False)
    weight = cnn.features[0].weight
    weight.grad = torch.full_like(weight, 0.5)
    snap = snapshot(cnn)

    cnn.head.requires_grad_(True)
    cnn.features[0].bias.requires_grad_(False)
    weight.grad.add_(1.0)  # changed in place
    cnn.features[1].weight.grad = torch.ones_like(cnn.features[1].weight)  # created
    snap.restore()

    assert not cnn.head.weight.requires_grad and not cnn.head.bias.requires_grad
    assert cnn.features[0].bias.requires_grad
    assert weight.grad is not None and torch.equal(weight.grad, torch.full_like(weight, 0.5))
    assert cnn.features[1].weight.grad is None
    assert all(p.grad is None for n, p in cnn.named_parameters() if n != "features.0.weight")


def test_train_and_eval_modes(cnn: CNN) -> None:
    cnn.train()
    cnn.features[4].eval()
    modes = [m.training for m in cnn.modules()]
    snap = snapshot(cnn)
    cnn.eval()
    cnn.head.train()
    snap.restore()
    assert [m.training for m in cnn.modules()] == modes


def test_tied_weights_are_saved_once_and_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied
    before = model[0].weight.detach().clone()
    snap = snapshot(model)
    assert len(snap.tensors) == 1
    with torch.no_grad():
        model[1].weight.mul_(3)
    snap.restore()
    assert torch.equal(model[0].weight, before)
    assert model[1].weight is model[0].weight


def test_optimizer_state_and_param_groups(cnn: CNN) -> None:
    optimizer = torch.optim.Adam(
        [
            {"params": cnn.features.parameters(), "lr": 1e-2},
            {"params": cnn.head.parameters(), "lr": 1e-3, "weight_decay": 0.1},
        ]
    )
    train_steps(cnn, optimizer)
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    params = [list(g["params"]) for g in optimizer.param_groups]
    snap = snapshot(cnn, optimizer)

    train_steps(cnn, optimizer, seed=1)
    optimizer.param_groups[0]["lr"] = 5.0
    optimizer.param_groups[1]["extra"] = "added"
    del optimizer.param_groups[1]["weight_decay"]
    snap.restore()

    assert {id(p) for p in optimizer.state} == set(state)
    for p, s in optimizer.state.items():
        assert s.keys() == state[id(p)].keys()
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]) and v.dtype == state[id(p)][k].dtype, k
    assert [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups] == groups
    assert [list(g["params"]) for g in optimizer.param_groups] == params
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], params[0], strict=True))


def test_optimizer_state_created_after_the_snapshot_is_removed(cnn: CNN) -> None:
    optimizer = torch.optim.Adam(cnn.parameters())
    snap = snapshot(cnn, optimizer)
    train_steps(cnn, optimizer)
    assert len(optimizer.state) > 0
    snap.restore()
    assert len(optimizer.state) == 0
    assert optimizer.state_dict()["state"] == {}


def test_state_of_a_newly_trained_parameter_is_removed(cnn: CNN) -> None:
    optimizer = torch.optim.SGD(cnn.parameters(), lr=0.1, momentum=0.9)
    cnn.head.requires_grad_(False)
    train_steps(cnn, optimizer)  # momentum buffers for everything but the head
    snap = snapshot(cnn, optimizer)
    cnn.head.requires_grad_(True)
    train_steps(cnn, optimizer)
    assert cnn.head.weight in optimizer.state
    snap.restore()
    assert cnn.head.weight not in optimizer.state
    assert cnn.features[0].weight in optimizer.state


def test_grad_scaler_state() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    for _ in range(2):
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    before = scaler.state_dict()
    assert before["_growth_tracker"] == 2
    snap = snapshot(model, optimizer, scaler)

    for _ in range(2):  # the scale grows, the tracker wraps
        scaler.scale(model(torch.randn(3, 4)).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    scaler.unscale_(optimizer)  # leaves a per-optimizer stage behind
    assert scaler.state_dict() != before
    snap.restore()

    assert scaler.state_dict() == before
    # The per-optimizer stage is gone: a new step can unscale again.
    scaler.scale(model(torch.randn(3, 4)).sum()).backward()
    scaler.unscale_(optimizer)


def test_uninitialised_grad_scaler_stays_uninitialised() -> None:
    model = nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    snap = snapshot(model, None, scaler)
    scaler.scale(model(torch.randn(3, 4)).sum())  # creates the scale tensor lazily
    scaler.update(2.0)
    snap.restore()
    assert scaler._scale is None
    assert scaler.get_scale() == 8.0


def test_random_number_generators() -> None:
    model = nn.Linear(2, 2)  # its initialisation draws from the generator: made first
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    snap = snapshot(model)
    torch.rand(100)
    random.random()
    np.random.rand(100)
    snap.restore()
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_restore_twice_gives_the_same_state(cnn: CNN) -> None:
    optimizer = torch.optim.Adam(cnn.parameters())
    train_steps(cnn, optimizer)
    snap = snapshot(cnn, optimizer)
    train_steps(cnn, optimizer, seed=1)
    snap.restore()
    first = [p.detach().clone() for p in cnn.parameters()]
    first_state = [v.clone() for s in optimizer.state.values() for v in s.values()]
    train_steps(cnn, optimizer, seed=2)
    snap.restore()
    assert all(torch.equal(a, b) for a, b in zip(first, cnn.parameters(), strict=True))
    again = [v for s in optimizer.state.values() for v in s.values()]
    assert all(torch.equal(a, b) for a, b in zip(first_state, again, strict=True))


def test_replaced_optimizer_state_tensor_is_restored_as_a_copy(cnn: CNN) -> None:
    optimizer = torch.optim.Adam(cnn.parameters())
    train_steps(cnn, optimizer)
    param = cnn.head.weight
    exp_avg = optimizer.state[param]["exp_avg"].clone()
    snap = snapshot(cnn, optimizer)
    optimizer.state[param]["exp_avg"] = torch.zeros(3)  # a different shape: cannot be written in place
    snap.restore()
    restored = optimizer.state[param]["exp_avg"]
    assert torch.equal(restored, exp_avg) and restored.shape == param.shape


def test_cuda_is_left_alone_without_cuda() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    snap = snapshot(nn.Linear(2, 2))
    assert "cuda" not in snap.rng
    snap.restore()
    assert not torch.cuda.is_initialized()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_generator() -> None:
    torch.manual_seed(0)
    model = CNN().cuda()
    optimizer = torch.optim.Adam(model.parameters())
    snap = snapshot(model, optimizer)
    for _, saved, _, _ in snap.tensors:
        assert saved.device.type == "cpu"  # the copies cost no device memory
    params = [p.detach().clone() for p in model.parameters()]
    expected = torch.rand(3, device="cuda")
    snap.restore()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long, device="cuda")).backward()
    optimizer.step()
    snap.restore()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert len(optimizer.state) == 0
    assert torch.equal(torch.rand(3, device="cuda"), expected)
