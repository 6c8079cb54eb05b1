"""Tests for autobatch.memory.runtime: what CUDA's caching allocator holds outside a step's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autobatch import NoBatchFitsError, probe
from autobatch.memory.cards import cublas_workspaces
from autobatch.memory.runtime import held_outside

MiB = 1 << 20


def test_nothing_is_held_outside_off_cuda() -> None:
    """The CPU (and an emulated device on it) holds no workspace the cap would count."""
    assert held_outside(torch.device("cpu"), [torch.ones(1024)], "bf16") == 0


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_counts_cublas_workspaces_and_unknown_tensors_but_not_known_ones() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    sm = torch.cuda.get_device_capability(device)
    workspace = cublas_workspaces(sm[0] * 10 + sm[1])[0]
    base = held_outside(device, [], "fp16")
    assert base >= workspace, "the forward's cuBLAS workspace, at least"
    kept = torch.empty(64 * MiB, dtype=torch.uint8, device=device)
    assert held_outside(device, [kept], "fp16") == base  # a tensor the step knows is its own
    assert held_outside(device, [], "fp16") == base + 64 * MiB  # one it does not is outside it
    del kept


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_holds_its_steps_to_the_cap_less_what_is_held_outside() -> None:
    """Under a cap below what the runtime holds, nothing fits and the figure needed counts it; above it,
    the replay predicts the answer, so the probe costs at most one out-of-memory."""
    device = torch.device("cuda", torch.cuda.current_device())
    model = _mlp().to(device)
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(8192, 512, generator=g), torch.randint(0, 10, (8192,), generator=g))
    outside = held_outside(device, list(model.parameters()), "fp16")
    with pytest.raises(NoBatchFitsError) as caught:
        probe(model, data, memory_limit=outside, precision="fp16", cache=False)
    assert caught.value.needed_bytes is not None and caught.value.needed_bytes > outside
    result = probe(model, data, memory_limit=outside + 48 * MiB, precision="fp16", cache=False)
    assert result.capped_by is None and result.ooms <= 1, result.summary()
    assert result.fixed_bytes is not None and result.fixed_bytes >= outside  # training's back-off sees it
